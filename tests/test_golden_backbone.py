"""Backbone pieces against the goldens: preprocessing (bit-exact), resized positional embeddings,
vision taps, the global embedding with/without ln_post, DPAM, the deep-prompt text encoder.
Tolerances are those of each golden's README."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, assert_close, golden, golden_hash, input_paths
from zsad_core.preprocess import load_images, open_image, preprocess_mask


def sha(t: torch.Tensor, dtype: str) -> str:
    return hashlib.sha256(t.to(getattr(torch, dtype)).contiguous().numpy().tobytes()).hexdigest()


def resized_u8(size: int) -> torch.Tensor:
    """[4, size, size, 3] uint8 PIL-bicubic squashed images (the AA-CLIP/Bayes-PFL stored inputs)."""
    return torch.stack([torch.from_numpy(np.array(open_image(p).resize((size, size), Image.BICUBIC)))
                        for p in input_paths()])


def masks(size: int, convention: str) -> torch.Tensor:
    return torch.stack([preprocess_mask(Image.open(p) if label else None, size, convention)
                        for p, label in zip(input_paths(masks=True), [0, 1, 0, 1])])


# ------------------------------------------------------------------ preprocessing, bit-exact
@pytest.mark.parametrize("method,key,size,convention", [
    ("anomalyclip", "inputs.safetensors:images", 518, "squash"),
    ("aprilgan", "inputs.safetensors:images", 518, "squash"),
    ("faprompt", "inference.safetensors:input.image", 518, "squash"),
    ("clip_zeroshot", "inputs.safetensors:images", 336, "clip_center"),
    ("winclip", "inputs.safetensors:images", 336, "tensor_squash"),
])
def test_images_are_bit_exact(method, key, size, convention):
    expected = golden_hash(method, key)
    images = load_images(input_paths(), size, convention)
    assert list(images.shape) == expected["shape"]
    assert sha(images, expected["dtype"]) == expected["sha256"]


@pytest.mark.parametrize("method,key,layout", [
    ("aaclip", "inputs.safetensors:image_resized_u8", "chw"),
    ("bayespfl", "inputs.safetensors:image_resized_u8", "hwc"),
])
def test_resized_uint8_images_are_bit_exact(method, key, layout):
    u8 = resized_u8(518)
    u8 = u8.permute(0, 3, 1, 2) if layout == "chw" else u8
    assert sha(u8, "uint8") == golden_hash(method, key)["sha256"]


@pytest.mark.parametrize("method,key,convention", [
    ("anomalyclip", "inputs.safetensors:masks", "bilinear"),
    ("aprilgan", "inputs.safetensors:masks", "bilinear"),
    ("faprompt", "inference.safetensors:input.gt_mask", "bilinear"),
    ("bayespfl", "inputs.safetensors:mask_loss", "bilinear"),
    ("aaclip", "inputs.safetensors:mask_u8", "nearest"),
    ("winclip", "inputs.safetensors:masks", "tensor_nearest"),
])
def test_masks_are_bit_exact(method, key, convention):
    expected = golden_hash(method, key)
    m = masks(expected["shape"][-1], convention).reshape(expected["shape"])
    assert sha(m, expected["dtype"]) == expected["sha256"]


# ------------------------------------------------------------------ positional embedding
@pytest.mark.parametrize("method,file,key,interpolation", [
    ("anomalyclip", "eval_main.safetensors", "vision.pos_embed_interp_head", "bilinear"),
    ("faprompt", "inference.safetensors", "vision.pos_embed_interp", "bilinear"),
    ("aprilgan", "inference.safetensors", "visual_positional_embedding_518", "bicubic"),
    ("aaclip", "model_and_text.safetensors", "model/visual_positional_embedding_resized", "bicubic"),
    ("bayespfl", "inputs.safetensors", "visual_positional_embedding_resized", "bicubic"),
])
def test_resized_positional_embedding_is_exact(tiny, method, file, key, interpolation):
    expected = golden(method, file)[key]
    before = tiny.visual.positional_embedding.clone()
    pos = tiny.positional_embedding(37, interpolation)
    assert torch.equal(pos[:len(expected)], expected.reshape(-1, pos.shape[-1]))
    assert torch.equal(tiny.visual.positional_embedding, before)  # the model is not mutated
    assert tiny.visual.positional_embedding.shape[0] == 577


# ------------------------------------------------------------------ vision taps (exact GELU, bicubic)
@pytest.fixture(scope="module")
def aprilgan_images():
    return load_images(input_paths(), 518, "squash")


def test_raw_residual_taps_with_exact_gelu(tiny, aprilgan_images):
    ref = golden("aprilgan", "inference.safetensors")
    tiny.set_activation("gelu")
    with torch.no_grad():
        out = tiny.encode_image_layers(aprilgan_images, [6, 12, 18, 24], interpolation="bicubic")
        pooled = tiny.global_embedding(out, ln_post=True)
    assert_close(out.tokens[6][1], ref["tokens_raw_layer6_img1"], atol=1e-5, name="layer 6")
    # The APRIL-GAN README asks "exact, or atol 1e-5" for raw tokens. Block 24 misses that by 3.4e-6
    # on 20 of 175,360 values on this machine's CPU, with stock open_clip as well: the float64
    # forward is 1.2e-5 away from the golden itself, so 1e-5 is below float32 reproducibility across
    # CPUs there. It is checked at the tolerance the Bayes-PFL README gives for the same raw CLIP
    # features (atol 2e-5, rtol 1e-4); see the issue note.
    assert_close(out.tokens[24][1], ref["tokens_raw_layer24_img1"], atol=2e-5, rtol=1e-4, name="layer 24")
    assert_close(pooled, ref["image_features_raw"], atol=1e-5, rtol=1e-4, name="image_features_raw")


def test_bayespfl_layer_subsets_and_global(tiny, aprilgan_images):
    ref = golden("bayespfl", "inference.safetensors")
    tiny.set_activation("gelu")
    with torch.no_grad():
        out = tiny.encode_image_layers(aprilgan_images, [6, 12, 18, 24])
    subset = torch.stack([out.tokens[layer][:, 1:][:, ref["patch_tokens_subset_index"]] for layer in (6, 12, 18, 24)], 1)
    assert_close(subset, ref["patch_tokens_subset"], atol=2e-5, rtol=1e-4, name="patch_tokens_subset")
    means = torch.stack([out.tokens[layer][:, 1:].mean(1) for layer in (6, 12, 18, 24)], 1)
    assert_close(means, ref["patch_tokens_mean"], atol=2e-5, rtol=1e-4, name="patch_tokens_mean")
    assert_close(tiny.global_embedding(out), ref["global_image_feature"], atol=2e-5, rtol=1e-4, name="g")


def test_quick_gelu_and_gelu_differ(tiny, aprilgan_images):
    with torch.no_grad():
        a = tiny.set_activation("gelu").encode_image(aprilgan_images[:1])
        b = tiny.set_activation("quick_gelu").encode_image(aprilgan_images[:1])
    assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------ DPAM (QuickGELU, bilinear)
def test_dpam_vv_taps_and_global_without_ln_post(tiny, aprilgan_images):
    main = golden("anomalyclip", "eval_main.safetensors")
    multi = golden("anomalyclip", "eval_multilayer.safetensors")
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        out = tiny.encode_image_layers(aprilgan_images, [6, 12, 18, 24], interpolation="bilinear", dpam="vv",
                                       dpam_start=6, ln_post=True, proj=True)
    assert_close(tiny.global_embedding(out, ln_post=False), main["vision.image_features_raw"],
                 atol=1e-4, rtol=1e-5, name="global (no ln_post)")
    assert_close(out.tokens[24][:, :40], main["layer24.patch_tokens_head"], atol=1e-4, rtol=1e-5, name="layer 24")
    assert_close(out.tokens[24].norm(dim=-1), main["layer24.patch_token_norms"], atol=1e-4, rtol=1e-5, name="norms")
    for layer in (6, 12, 18, 24):
        assert_close(out.tokens[layer][:, :16], multi[f"layer{layer}.patch_tokens_head"], atol=1e-4, rtol=1e-5,
                     name=f"multilayer {layer}")


def test_faprompt_dpam_tokens(tiny, aprilgan_images):
    ref = golden("faprompt", "inference.safetensors")
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        out = tiny.encode_image_layers(aprilgan_images, [24], interpolation="bilinear", dpam="vv",
                                       ln_post=True, proj=True)
    assert_close(out.tokens[24][:, :11], ref["patch.tokens_raw_first11"], atol=5e-5, rtol=1e-4, name="tokens")
    assert_close(out.tokens[24].norm(dim=-1), ref["patch.token_norm"], atol=5e-5, rtol=1e-4, name="norms")
    assert_close(tiny.global_embedding(out, ln_post=False), ref["image.embed_raw"], atol=5e-5, rtol=1e-4,
                 name="global")


@pytest.mark.parametrize("variant", ["qq", "kk"])
def test_dpam_variants_differ_from_vv(tiny, aprilgan_images, variant):
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        vv = tiny.encode_image_layers(aprilgan_images[:1], [24], interpolation="bilinear", dpam="vv").tokens[24]
        other = tiny.encode_image_layers(aprilgan_images[:1], [24], interpolation="bilinear", dpam=variant)
    assert other.tokens[24].shape == vv.shape
    assert (other.tokens[24] - vv).abs().max() > 1e-3
    # the original path, and so the global embedding, does not depend on the DPAM variant
    assert torch.equal(other.final, tiny.encode_image_layers(aprilgan_images[:1], interpolation="bilinear").final)


# ------------------------------------------------------------------ text encoder with deep prompts
@pytest.mark.parametrize("fp16,key", [(True, "text.features_raw"),
                                      (False, "diag.text_features_raw_without_fp16_rounding")])
def test_deep_prompt_text_encoder(tiny, fp16, key):
    ref = golden("anomalyclip", "eval_main.safetensors")
    tiny.set_activation("quick_gelu")
    deep = list(ref["text.deep_prompts_param"])
    with torch.no_grad():
        feats = tiny.encode_text_embeddings(ref["text.prompts"], ref["text.tokenized_prompts"].argmax(-1),
                                            deep_prompts=deep, deep_prompts_fp16=fp16)
    assert_close(feats, ref[key], atol=1e-5, rtol=1e-4, name=key)
    assert torch.equal(torch.stack([d.half().float() for d in deep]), ref["text.deep_prompts_as_used"])


def test_text_features_are_cached(tiny):
    tiny.set_activation("quick_gelu")
    a = tiny.encode_text(["a photo of a brick."])
    assert tiny.encode_text(["a photo of a brick."]) is a


def test_golden_data_budget():
    total = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    assert total <= 40e6, f"golden test data {total / 1e6:.1f} MB > 40 MB"
