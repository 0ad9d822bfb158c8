"""End to end on synthetic data: zsad train (interrupted, then resumed from its last checkpoint), the
official export, and zsad evaluate of the trained checkpoint on the other domain."""
import json

import pytest

from zsad_core import train as train_module
from zsad_core.cli import main
from zsad_core.data.synth import ensure_synthetic


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return ensure_synthetic(root, size="1,1,2,64", domains=["synth_industrial_a", "synth_industrial_b"])


def test_train_resume_export_then_evaluate(domains, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--method", "aprilgan", "--backbone", "tiny", "--dataset", "synth_industrial_a",
            "--root", str(domains["synth_industrial_a"]), "--image-size", "56", "--epochs", "2",
            "--batch-size", "4", "--out", str(out), "--export-official"]
    original = train_module._save_state
    saves = []

    def killed_after_first_epoch(out_dir, state):
        original(out_dir, state)
        saves.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_state", killed_after_first_epoch)
    assert main(args) == 130
    assert (out / "adapters_epoch1.safetensors").is_file() and not (out / "adapters_epoch2.safetensors").exists()
    monkeypatch.setattr(train_module, "_save_state", original)
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [2]  # resumed: only the missing epoch ran
    assert (out / "official.pth").is_file()

    ev = tmp_path / "eval"
    assert main(["evaluate", "--method", "aprilgan", "--backbone", "tiny", "--checkpoint", str(out / "last.safetensors"),
                 "--dataset", "synth_industrial_b", "--root", str(domains["synth_industrial_b"]),
                 "--image-size", "56", "--out", str(ev)]) == 0
    result = json.loads((ev / "metrics.json").read_text())
    assert set(result["per_category"]) == {"gravel", "fabric", "nut"}
    assert result["mean"]["pixel_auroc"]["n_categories"] == 3
    # the official export loads too and gives the same maps
    ev2 = tmp_path / "eval_official"
    assert main(["evaluate", "--method", "aprilgan", "--backbone", "tiny", "--checkpoint", str(out / "official.pth"),
                 "--dataset", "synth_industrial_b", "--root", str(domains["synth_industrial_b"]),
                 "--image-size", "56", "--out", str(ev2)]) == 0
    assert json.loads((ev2 / "metrics.json").read_text())["per_category"] == result["per_category"]
