"""zsad_core.metrics against the metric goldens: every case and canonical value (AUPRO at other FPR limits
and with 4-connectivity included), the 200-threshold legacy AUPRO against the official cal_pro_score's
recorded outputs, and the mean over categories of the aggregate example."""
import json
import math
import warnings

import numpy as np
import pytest

from conftest import GOLDEN
from zsad_core import metrics as M

METRICS_GOLDEN = GOLDEN / "metrics"
CANONICAL = json.loads((METRICS_GOLDEN / "canonical_values.json").read_text())
VALUES = json.loads((METRICS_GOLDEN / "values.json").read_text())
AGGREGATE = json.loads((METRICS_GOLDEN / "aggregate_example.json").read_text())
CASES = list(CANONICAL)
# The goldens' canonical implementation agrees with an exact rational brute force to < 1e-12.
ATOL = 1e-12


def load_case(name):
    d = np.load(METRICS_GOLDEN / "cases" / f"{name}.npz")
    return d["maps"], d["masks"], d["labels"], d["scores"]


def golden_float(v):
    return math.nan if v == "NaN" else float(v)


def assert_metric(actual, expected, atol=ATOL, name=""):
    expected = golden_float(expected)
    if math.isnan(expected):
        assert math.isnan(actual), f"{name}: expected NaN (undefined), got {actual}"
    else:
        assert abs(actual - expected) <= atol, f"{name}: {actual!r} vs golden {expected!r} (atol {atol})"


def canonical_values(case):
    maps, masks, labels, scores = load_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        out = M.evaluate_category(maps, masks, labels, scores)
        out["pixel_aupro"] = out.pop("aupro")
        out["pixel_aupro_4conn"] = M.aupro(maps, masks, connectivity=4)
        for limit in (0.05, 0.1, 1.0):
            out[f"pixel_aupro@{limit}"] = M.aupro(maps, masks, fpr_limit=limit)
    return out


def test_every_case_file_is_covered():
    files = sorted(p.stem for p in (METRICS_GOLDEN / "cases").glob("*.npz"))
    assert files == sorted(CASES) == sorted(VALUES)
    assert all(len(CANONICAL[c]) == 11 for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_canonical_values(case):
    actual = canonical_values(case)
    for metric, expected in CANONICAL[case].items():
        assert_metric(actual[metric], expected, name=f"{case}.{metric}")


@pytest.mark.parametrize("case", CASES)
def test_single_metric_functions_agree_with_the_category_evaluation(case):
    maps, masks, labels, scores = load_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        pairs = [(M.auroc(scores, labels), "image_auroc"), (M.average_precision(scores, labels), "image_ap"),
                 (M.f1_max(scores, labels), "image_f1max"), (M.auroc(maps.ravel(), masks.ravel()), "pixel_auroc"),
                 (M.average_precision(maps.ravel(), masks.ravel()), "pixel_ap"),
                 (M.f1_max(maps.ravel(), masks.ravel()), "pixel_f1max"), (M.aupro(maps, masks), "pixel_aupro")]
    for value, metric in pairs:
        assert_metric(value, CANONICAL[case][metric], name=f"{case}.{metric}")


@pytest.mark.parametrize("case", CASES)
def test_float64_maps_give_the_same_values(case):
    """The float32 fast sort and the generic argsort path rank identically (the order inside a tie block,
    and so the float sum of 1/|C|, may differ: ~1e-15)."""
    maps, masks, labels, scores = load_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        a = M.pixel_metrics(maps, masks)
        b = M.pixel_metrics(maps.astype(np.float64), masks)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= ATOL, k


@pytest.mark.parametrize("implementation", ["anomalyclip", "faprompt", "april_gan"])
@pytest.mark.parametrize("case", CASES)
def test_legacy_aupro_reproduces_cal_pro_score(case, implementation):
    """The recorded outputs of the official cal_pro_score (identical in the three repositories)."""
    maps, masks, _, _ = load_case(case)
    expected = VALUES[case][implementation]["pixel_aupro"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = M.aupro_legacy(maps, masks)
    if isinstance(expected, dict):
        # The original raises on constant maps (its threshold grid has step 0); zsad returns NaN and warns.
        assert case == "constant" and "arange" in expected["error"]
        assert math.isnan(value)
        assert any(issubclass(w.category, M.UndefinedMetricWarning) and "constant" in str(w.message) for w in caught)
    else:
        assert_metric(value, expected, name=f"{case}.aupro_legacy")


def test_legacy_aupro_depends_on_the_score_range_and_canonical_does_not():
    mixed, outlier = load_case("mixed"), load_case("outlier_pixel")
    assert M.aupro(*mixed[:2]) == M.aupro(*outlier[:2])
    assert M.aupro_legacy(*mixed[:2]) - M.aupro_legacy(*outlier[:2]) > 0.04


def test_aggregate_example_nan_skipping_mean():
    categories = AGGREGATE["categories"]
    per_category = {c: canonical_values(c) for c in categories}
    for metric, expected in AGGREGATE["canonical_nan_skipping"].items():
        mean, n = M.macro_average({c: per_category[c][metric] for c in categories})
        assert n == expected["n_categories"]
        assert abs(mean - expected["mean"]) <= ATOL, metric
    plain = AGGREGATE["plain np.mean over all categories of the canonical values (NaN propagates)"]
    for metric in plain:
        assert math.isnan(np.mean([per_category[c][metric] for c in categories])) and plain[metric] == "NaN"


def test_evaluate_categories_on_the_aggregate_example_as_one_dataset():
    categories = AGGREGATE["categories"]
    cases = [load_case(c) for c in categories]
    maps, masks, labels, scores = (np.concatenate([case[i] for case in cases]) for i in range(4))
    names = np.concatenate([[c] * len(case[2]) for c, case in zip(categories, cases)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_category, means = M.evaluate_categories(maps, masks, labels, scores, names)
    messages = [str(w.message) for w in caught if issubclass(w.category, M.UndefinedMetricWarning)]
    assert len(messages) == len(caught) == 7  # 3 image metrics of one category, 4 pixel metrics of another
    assert any(m.startswith("category 'no_normal_images': image_auroc is undefined") for m in messages)
    assert list(per_category) == categories
    for metric, expected in AGGREGATE["canonical_nan_skipping"].items():
        key = "aupro" if metric == "pixel_aupro" else metric
        assert means[key]["n_categories"] == expected["n_categories"]
        assert abs(means[key]["mean"] - expected["mean"]) <= ATOL, metric
