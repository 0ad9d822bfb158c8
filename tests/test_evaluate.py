"""zsad evaluate: per-category metrics with provenance, and resume after an interruption."""
import json
import shutil

import pytest

from conftest import GOLDEN
from zsad_core import evaluate as evaluate_module
from zsad_core.cli import main


@pytest.fixture()
def mvtec_copy(tmp_path):
    """The four golden inputs laid out as a two-category MVTec-style dataset."""
    root = tmp_path / "data"
    for cls, defect in (("brick", "scratch"), ("gravel", "stain")):
        for folder, name in (("good", f"{cls}_good"), (defect, f"{cls}_{defect}")):
            (root / cls / "test" / folder).mkdir(parents=True)
            shutil.copyfile(GOLDEN / "inputs" / f"{name}.png", root / cls / "test" / folder / "000.png")
        (root / cls / "ground_truth" / defect).mkdir(parents=True)
        shutil.copyfile(GOLDEN / "inputs" / f"{cls}_{defect}_mask.png",
                        root / cls / "ground_truth" / defect / "000_mask.png")
    return root


def run_evaluate(root, out, *extra):
    return main(["evaluate", "--method", "aprilgan", "--backbone", "tiny", "--dataset", "golden_four",
                 "--root", str(root), "--image-size", "112", "--out", str(out), *extra])


def test_metrics_per_category_with_provenance(mvtec_copy, tmp_path):
    assert run_evaluate(mvtec_copy, tmp_path / "out", "--legacy") == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(result["per_category"]) == ["brick", "gravel"]
    for metrics in result["per_category"].values():
        assert set(metrics) >= {"image_auroc", "pixel_auroc", "aupro", "aupro_legacy"}
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    mean = result["mean"]["pixel_auroc"]
    assert mean["n_categories"] == 2
    assert mean["mean"] == pytest.approx(sum(m["pixel_auroc"] for m in result["per_category"].values()) / 2)
    prov = result["provenance"]
    assert prov["config"]["method"] == "aprilgan" and prov["config"]["image_size"] == 112
    assert prov["config"]["backbone_fingerprint"].startswith("tiny:")
    assert "torch" in prov["packages"] and prov["code_version"]
    csv_rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("category,image_auroc") and csv_rows[-2].startswith("mean,")


def test_interrupted_run_resumes_at_the_first_unfinished_category(mvtec_copy, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert run_evaluate(mvtec_copy, reference) == 0
    original = evaluate_module.run_category
    calls = []

    def dies_on_second_category(method, dataset, **kw):
        calls.append(dataset.categories[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(method, dataset, **kw)

    monkeypatch.setattr(evaluate_module, "run_category", dies_on_second_category)
    out = tmp_path / "out"
    assert run_evaluate(mvtec_copy, out) == 130
    assert (out / "categories" / "brick.json").is_file() and not (out / "categories" / "gravel.json").exists()
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(evaluate_module, "run_category", original)
    assert run_evaluate(mvtec_copy, out) == 0
    assert "brick: done earlier, skipped" in capsys.readouterr().out
    resumed = json.loads((out / "metrics.json").read_text())["per_category"]
    assert resumed == json.loads((reference / "metrics.json").read_text())["per_category"]
