"""`zsad predict`: the golden scores through the command line, folder output on an unseen picture,
and one clear line for bad input."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_close, golden, input_paths
from zsad_core.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_golden_scores_through_the_cli(tmp_path):
    ref = golden("clip_zeroshot", "inference.safetensors")
    paths = [str(p) for p in input_paths()]
    for cls, sl in (("brick", slice(0, 2)), ("gravel", slice(2, 4))):
        out = tmp_path / f"{cls}.safetensors"
        assert main(["predict", "--method", "clip_zeroshot", "--backbone", "tiny", "--class-name", cls,
                     "--set", "prompts=cpe", "--out", str(out), *paths[sl]]) == 0
        scores = load_file(str(out))["image_scores"]
        assert_close(scores, ref["score_cpe"][sl], atol=1e-5, rtol=1e-4, name=cls)
        with safe_open(str(out), "pt") as f:
            record = json.loads(f.metadata()["provenance"])
        assert record["fingerprints"]["backbone"].startswith("tiny:cadbdc0a")
        assert record["config"]["options"]["prompts"] == "cpe"


def test_unseen_picture_writes_a_readable_folder(tmp_path):
    from skimage import data

    picture = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(picture)
    out = tmp_path / "pred"
    assert main(["predict", "--method", "clip_zeroshot", "--class-name", "cup", "--out", str(out), str(picture)]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["image_score"]) <= 1.0
    assert (out / "provenance.json").is_file() and (out / "predictions.safetensors").is_file()


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "zsad_core", *args], capture_output=True, text=True, cwd=REPO)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("make_args,expected", [
    (lambda tmp: ["--method", "clip_zeroshot", "--out", str(tmp / "o"), str(tmp / "missing.png")], "no such file"),
    (lambda tmp: ["--method", "clip_zeroshot", "--out", str(tmp / "o"), str(tmp / "notes.png")], "not a readable image"),
    (lambda tmp: ["--method", "nosuchmethod", "--out", str(tmp / "o"), str(input_paths()[0])], "unknown method"),
    (lambda tmp: ["--method", "clip_zeroshot", "--checkpoint", str(tmp / "notes.png"), "--out", str(tmp / "o"),
                  str(input_paths()[0])], "no learnable parameters"),
    (lambda tmp: ["--method", "clip_zeroshot", "--set", "prompts=fancy", "--out", str(tmp / "o"),
                  str(input_paths()[0])], "choose one of"),
    (lambda tmp: ["--method", "clip_zeroshot", "--backbone", str(tmp / "notes.png"), "--out", str(tmp / "o"),
                  str(input_paths()[0])], "not a readable checkpoint"),
])
def test_bad_input_is_one_clear_line(tmp_path, make_args, expected):
    (tmp_path / "notes.png").write_text("this is not an image")
    code, lines = run_cli("predict", *make_args(tmp_path))
    assert code != 0
    assert len(lines) == 1 and expected in lines[0], lines


def test_unreachable_pretrained_weights_fail_fast_with_a_fix(monkeypatch):
    from zsad_core import backbone

    monkeypatch.setattr(backbone, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(backbone.BackboneError, match="pass the file"):
        backbone.load_backbone("ViT-L-14-336:openai")


def test_local_openai_state_dict_and_open_clip_name_with_file(tmp_path, tiny):
    import torch

    from zsad_core.backbone import load_backbone

    path = tmp_path / "clip.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_backbone(str(path))
    assert loaded.vision_layers == 24 and loaded.native_image_size == 336
    x = torch.zeros(1, 3, 336, 336)
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), tiny.encode_image(x), atol=1e-6)
    random = load_backbone("ViT-B-32:random")
    assert random.vision_width == 768 and random.fingerprint == "random:ViT-B-32"


def test_list_options(capsys):
    assert main(["predict", "--method", "clip_zeroshot", "--list-options"]) == 0
    assert "prompts" in capsys.readouterr().out
