"""Workbook helpers of the method notebooks: the paper-shaped table beside the paper's numbers, and
train-and-evaluate runs of option variants (ablations) with configuration-derived tags."""
import math

from zsad_core.paper_tables import paper_numbers
from zsad_core.workbook import Workbook, option_tag


def result(**means):
    """An evaluate() result with the given means (fractions)."""
    return {"mean": {k: {"mean": v, "n_categories": 1} for k, v in means.items()}}


def test_option_tag_is_folder_safe_and_distinct():
    assert option_tag([]) == "default"
    assert option_tag(["n_abnormal=5"]) == "n_abnormal5"
    assert option_tag(["dap_selection=top_m", "top_m=5"]) == "dap_selectiontop_m-top_m5"
    assert option_tag(["layers=6,12 / 18"]) == "layers61218"
    assert option_tag(["oc_weight=0"]) != option_tag(["oc_weight=0.1"])


def test_beside_paper_table_follows_the_paper_rows_with_marks():
    ours = {"visa": result(image_auroc=0.8, image_ap=0.85, pixel_auroc=0.9, aupro=0.7),
            "dagm2007": result(image_auroc=0.5, image_ap=0.5, pixel_auroc=0.5, aupro=0.5)}
    table = Workbook.beside_paper_table(ours, paper="FAPrompt", method="FAPrompt")
    reported = paper_numbers(paper="FAPrompt", method="FAPrompt")
    # the paper's rows in its order, then ours that the paper does not report
    assert list(table.index) == list(dict.fromkeys(reported.dataset)) + ["DAGM"]
    assert table.loc["VisA", ("our data", "")] == "visa"
    assert table.loc["VisA", ("I-AUROC", "ours")] == 80.0
    assert table.loc["VisA", ("I-AUROC", "paper")] == 83.3
    assert table.loc["VisA", ("mark", "")] == "SECONDARY (single source)"
    # rows without our data, and numbers the paper does not report, stay empty
    assert table.loc["MPDD", ("our data", "")] == "-" and math.isnan(table.loc["MPDD", ("I-AUROC", "ours")])
    assert math.isnan(table.loc["HeadCT", ("P-AUROC", "paper")])
    assert table.loc["DAGM", ("mark", "")] == "-" and table.loc["DAGM", ("AUPRO", "ours")] == 50.0


def test_beside_paper_table_stand_ins_fill_rows_by_domain():
    ours = {"synth_industrial_b": result(image_auroc=0.6, pixel_auroc=0.7),
            "synth_medical": result(image_auroc=0.4, pixel_auroc=0.3)}
    table = Workbook.beside_paper_table(ours, metrics=("image_auroc", "pixel_auroc"),
                                        stand_in={"industrial": "synth_industrial_b", "medical": "synth_medical"},
                                        paper="FAPrompt", method="FAPrompt")
    assert table.loc["MVTec AD", ("our data", "")] == "synth_industrial_b"
    assert table.loc["BTAD", ("P-AUROC", "ours")] == 70.0
    assert table.loc["Kvasir", ("our data", "")] == "synth_medical"
    assert table.loc["Kvasir", ("P-AUROC", "ours")] == 30.0
    # the synthetic domains themselves are no paper rows: they appear only as stand-ins
    assert "synth_medical" not in table.index and len(table) == len(set(paper_numbers(paper="FAPrompt").dataset))
    assert list(table.columns.get_level_values(0)) == ["our data", "I-AUROC", "I-AUROC", "P-AUROC", "P-AUROC", "mark"]


class _Recorder(Workbook):
    """A workbook whose method / train / evaluate only record their calls."""

    def __init__(self):  # noqa: D401 - no profile, backbone or folders needed
        self.calls = []

    def method(self, name, options=(), checkpoint=None, **kw):
        self.calls.append(("method", name, tuple(options), checkpoint))
        return object()

    def train(self, method, tag="", dataset=None, epochs=None, **kw):
        self.calls.append(("train", tag, dataset, epochs))

    def evaluate(self, method, dataset, tag="", **kw):
        self.calls.append(("evaluate", dataset, tag))
        return {"tag": tag}


def test_train_and_evaluate_tags_follow_the_configuration(tmp_path):
    wb = _Recorder()
    _, r = wb.train_and_evaluate("faprompt", "visa", ["n_abnormal=5"], epochs=1)
    assert r["tag"] == "n_abnormal5-e1"
    assert wb.calls == [("method", "faprompt", ("n_abnormal=5",), None), ("train", "n_abnormal5-e1", None, 1),
                        ("evaluate", "visa", "n_abnormal5-e1")]
    ckpt = tmp_path / "weights.safetensors"
    ckpt.write_bytes(b"0")
    wb.calls = []
    _, plain = wb.train_and_evaluate("faprompt", "visa", [], checkpoint=ckpt)
    _, scored = wb.train_and_evaluate("faprompt", "visa", ["image_score=paper"], checkpoint=ckpt)
    assert [c[0] for c in wb.calls] == ["method", "evaluate"] * 2  # a checkpoint: no training
    assert plain["tag"].startswith("ckpt-") and scored["tag"] == "image_scorepaper-" + plain["tag"]
    _, named = wb.train_and_evaluate("faprompt", "visa", [], tag="mine", train_dataset="mvtec_ad")
    assert named["tag"] == "mine" and ("train", "mine", "mvtec_ad", None) in wb.calls


def test_table_of_grouped_variants_has_a_two_level_index():
    results = {("K", "K = 1"): {"visa": result(image_auroc=0.5)}, ("K", "K = 10"): {"visa": result(image_auroc=0.75)}}
    table = Workbook.table(results, metrics=("image_auroc",)).droplevel(0, axis=1)
    assert list(table.index) == [("K", "K = 1"), ("K", "K = 10")]
    assert table["I-AUROC"].tolist() == [50.0, 75.0]
