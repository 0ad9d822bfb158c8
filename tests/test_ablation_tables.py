"""Notebook helpers: paper-shaped tables beside the reported numbers, ablation runs and tables, the
training-step comparison (AnomalyCLIP's pre-fix code against the layer-24 configuration), batched maps."""
import math
from pathlib import Path

import matplotlib
import pytest
import torch

from zsad_core.ablation import Variant, ablation_table, plot_ablation, run_ablation, training_step_difference
from zsad_core.errors import ZsadError
from zsad_core.methods import create_method
from zsad_core.tables import beside_paper_rows, dataset_table

matplotlib.use("Agg")
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_legacy")


def result(value: float) -> dict:
    return {"mean": {m: {"mean": value, "n_categories": 3} for m in METRICS}}


def test_dataset_table_rows_are_datasets_in_percent():
    table = dataset_table({"synth_industrial_b": result(0.61234), "synth_medical": result(0.5)}, METRICS)
    assert list(table.index) == ["synth_industrial_b", "synth_medical"]
    assert list(table.columns) == ["I-AUROC", "I-AP", "P-AUROC", "AUPRO", "AUPRO (legacy)"]
    assert table.loc["synth_industrial_b", "AUPRO"] == 61.2


def test_beside_paper_rows_puts_our_row_beside_the_papers_row_with_marks():
    sources = {"paper": dict(paper="AnomalyCLIP", table="Table 1 (industrial ZSAD)", method="AnomalyCLIP"),
               "released": dict(paper="AnomalyCLIP", method="AnomalyCLIP (released checkpoint)")}
    table = beside_paper_rows({"synth_industrial_b": result(0.5), "visa": result(0.9)}, sources, METRICS,
                               ours_label="zsad (paper)")
    rows = list(table.index)
    assert rows[0] == ("synth_industrial_b", "zsad (paper)")  # not in the paper: first
    i = rows.index(("VisA", "zsad (paper)"))
    assert rows[i + 1:i + 3] == [("VisA", "paper"), ("VisA", "released")]
    assert table.loc[("VisA", "paper"), "I-AUROC"] == 82.1 and table.loc[("VisA", "paper"), "mark"] == "PRIMARY"
    assert table.loc[("VisA", "released"), "AUPRO"] == 86.7 and table.loc[("VisA", "released"), "mark"] == "REPO-LOG"
    assert math.isnan(table.loc[("VisA", "paper"), "AUPRO (legacy)"])  # only zsad computes both AUPROs
    assert not any("/" in ds for ds, _ in rows)  # per-class log rows left out
    assert {ds for ds, _ in rows} >= {"MVTec AD", "MPDD", "BTAD", "SDD", "DAGM", "DTD-Synthetic"}


def test_beside_paper_rows_medical_shape():
    table = beside_paper_rows({"covid19_radiography": result(0.7)},
                               {"paper": dict(paper="AnomalyCLIP", table="Table 2 (medical ZSAD)", method="AnomalyCLIP")})
    assert table.loc[("COVID-19", "paper"), "I-AUROC"] == 80.1
    assert math.isnan(table.loc[("ISIC", "paper"), "I-AUROC"]) and table.loc[("ISIC", "paper"), "P-AUROC"] == 89.7


class FakeMethod:
    def __init__(self, options):
        self.options, self.loaded = options, None

    def load_checkpoint(self, path):
        self.loaded = Path(path)


class FakeWorkbook:
    def __init__(self, tmp_path):
        self.tmp, self.calls = tmp_path, []

    def method(self, name, options=()):
        return FakeMethod(list(options))

    def train(self, method, tag="", epochs=None, max_steps=None):
        self.calls.append(("train", tag, epochs, max_steps))
        return {"out_dir": str(self.tmp / tag), "history": [{"epoch": 1}]}

    def evaluate(self, method, dataset, tag="", legacy=False):
        self.calls.append(("evaluate", tag, dataset))
        return result(0.5 + 0.1 * len(method.options))


def test_run_ablation_trains_loads_and_reuses_weights(tmp_path):
    wb = FakeWorkbook(tmp_path)
    variants = [Variant("V-V (official)", "reference", checkpoint=tmp_path / "ref.safetensors", paper_method="AnomalyCLIP (full)"),
                Variant("Q-Q", "attention", ["dpam=qq"]),
                Variant("pre-fix", "layers", ["config=prefix_bug"], weights_from="V-V (official)")]
    runs = run_ablation(wb, "anomalyclip", variants, "synth_industrial_b", epochs=1)
    assert list(runs) == ["V-V (official)", "Q-Q", "pre-fix"]
    assert runs["V-V (official)"].method.loaded == tmp_path / "ref.safetensors"
    assert runs["pre-fix"].method.loaded == tmp_path / "ref.safetensors"
    assert runs["Q-Q"].checkpoint == tmp_path / "ablation-q-q-e1" / "last.safetensors"
    assert [c for c in wb.calls if c[0] == "train"] == [("train", "ablation-q-q-e1", 1, None)]
    assert ("evaluate", "ablation-pre-fix-e1", "synth_industrial_b") in wb.calls

    table = ablation_table(runs, paper="AnomalyCLIP", paper_datasets=["MVTec AD", "VisA"])
    assert list(table.index) == [("reference", "V-V (official)"), ("attention", "Q-Q"), ("layers", "pre-fix")]
    assert table.loc[("attention", "Q-Q"), "I-AUROC"] == 60.0
    assert table.loc[("reference", "V-V (official)"), "VisA P-AUROC"] == 95.5
    assert table.loc[("reference", "V-V (official)"), "mark"] == "AUTHOR-REBUTTAL"
    assert math.isnan(table.loc[("attention", "Q-Q"), "MVTec AD I-AUROC"]) and table.loc[("attention", "Q-Q"), "mark"] == ""
    fig = plot_ablation(table, ["I-AUROC", "VisA P-AUROC"], title="t")
    assert len(fig.axes) == 2

    n_calls = len(wb.calls)
    again = run_ablation(wb, "anomalyclip", variants[1:2] + [Variant("Q-Q again", "other", ["dpam=qq"], weights_from="Q-Q")],
                         "synth_industrial_b", epochs=1)
    assert again["Q-Q again"].result is again["Q-Q"].result and len(wb.calls) == n_calls + 2  # no second evaluation
    capped = run_ablation(wb, "anomalyclip", variants[1:2], "synth_industrial_b", epochs=1, max_steps=2)
    assert capped["Q-Q"].checkpoint == tmp_path / "ablation-q-q-e1-s2" / "last.safetensors"
    assert wb.calls[-2] == ("train", "ablation-q-q-e1-s2", 1, 2)

    with pytest.raises(ZsadError, match="earlier variant"):
        run_ablation(wb, "anomalyclip", [Variant("a", "g", weights_from="b")], "x")
    with pytest.raises(ZsadError, match="distinct"):
        run_ablation(wb, "anomalyclip", [Variant("a b", "g"), Variant("a-b", "g")], "x")


def test_pre_fix_training_step_equals_layer_24(tiny):
    """The official fix's promise: the pre-fix code (4 copies of layer 24, lambda 1) trains exactly like
    layer 24 with lambda 4, and its maps are 4 x the layer-24 maps."""
    torch.manual_seed(0)
    fixed = create_method("anomalyclip", tiny, image_size=112)
    pre_fix = create_method("anomalyclip", tiny, options=["config=prefix_bug"], image_size=112)
    pre_fix.load_state_dict(fixed.state_dict())
    images = torch.randn(2, 3, 112, 112)
    masks = torch.zeros(2, 112, 112)
    masks[1, 30:60, 40:70] = 1
    batch = {"images": images, "masks": masks, "labels": torch.tensor([0, 1]), "class_names": ["a", "b"]}
    step = training_step_difference(fixed, pre_fix, batch)
    assert step["total_a"] == pytest.approx(step["total_b"], rel=1e-6)
    assert step["max_grad_difference"] <= 1e-6 * step["max_grad"] and step["max_grad"] > 0
    assert all(p.grad is None for p in fixed.prompt_learner.parameters())

    from zsad_core.workbook import Workbook

    wb = Workbook.__new__(Workbook)
    wb.device = "cpu"
    examples = {"images": images, "class_names": ["a", "b"]}
    batched = wb.maps(pre_fix, examples, batched=True)
    assert torch.allclose(batched, wb.maps(pre_fix, examples), atol=1e-6)  # AnomalyCLIP: same maps
    assert torch.allclose(batched, 4 * wb.maps(fixed, examples, batched=True), rtol=1e-5)
