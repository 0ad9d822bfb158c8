"""The tiny CLIP recipe is reproduced byte for byte (shared/goldens/clip_tiny)."""
import hashlib

from safetensors.torch import save

from conftest import golden_json
from zsad_core.tiny_clip import tensor_sha256


def test_every_tensor_matches_the_recipe_checksum(tiny):
    expected = golden_json("clip_tiny", "tensor_sha256.json")
    state = tiny.model.state_dict()
    assert set(state) == set(expected)
    mismatched = [k for k, v in expected.items()
                  if list(state[k].shape) != v["shape"] or tensor_sha256(state[k]) != v["sha256_float32_le"]]
    assert mismatched == []


def test_whole_file_checksum_and_fingerprint(tiny):
    blob = save({k: v.contiguous() for k, v in tiny.model.state_dict().items()})
    digest = hashlib.sha256(blob).hexdigest()
    assert digest == "cadbdc0aecfe90f1c2c5f582d68ff242e69c1af3fad6ec5adb1b9f2b17272597"
    assert tiny.fingerprint == "tiny:" + digest


def test_architecture_facts(tiny):
    assert (tiny.vision_layers, tiny.text_layers, tiny.vision_width, tiny.embed_dim) == (24, 12, 128, 128)
    assert (tiny.patch_size, tiny.native_grid, tiny.native_image_size) == (14, 24, 336)
    assert tiny.activation == "quick_gelu"
