"""zsad_core.metrics_variants against what each official repository's metric code returned on the metric
golden cases (values.json), and the split of the legacy AUPRO gap (aupro_attribution.json)."""
import json
import math

import numpy as np
import pytest

from conftest import GOLDEN
from zsad_core import metrics_variants as V

METRICS_GOLDEN = GOLDEN / "metrics"
VALUES = json.loads((METRICS_GOLDEN / "values.json").read_text())
ATTRIBUTION = json.loads((METRICS_GOLDEN / "aupro_attribution.json").read_text())
CASES = list(VALUES)
IMPLEMENTATIONS = [name for name in VALUES["mixed"] if name != "canonical"]
# Double-precision reimplementations agree to rounding (the goldens' own sklearn-vs-canonical gaps are
# ~1e-16). anomalib HEAD's AUPRO runs in float32 there and in float64 here: one float32 epsilon.
ATOL = 1e-12
ATOL_FLOAT32 = float(np.finfo(np.float32).eps)


def load_case(name):
    d = np.load(METRICS_GOLDEN / "cases" / f"{name}.npz")
    return d["maps"], d["masks"], d["labels"], d["scores"]


def test_every_recorded_implementation_is_reproduced():
    assert sorted(IMPLEMENTATIONS) == sorted(V.IMPLEMENTATIONS)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_variant_matches_the_recorded_official_output(case, implementation):
    got = V.run_implementation(implementation, *load_case(case))
    recorded = VALUES[case][implementation]
    assert sorted(got) == sorted(recorded), "the same metrics as the official code computes"
    for metric, expected in recorded.items():
        value = got[metric]
        name = f"{implementation}.{case}.{metric}"
        if isinstance(expected, dict):  # the original raised: the variant raises the same exception type
            assert isinstance(value, dict), f"{name}: the original raised {expected['error']}, got {value}"
            assert value["error"].split(":")[0] == expected["error"].split(":")[0], name
            continue
        assert not isinstance(value, dict), f"{name}: raised {value['error']}, the original returned {expected}"
        if expected == "NaN":
            assert math.isnan(value), f"{name}: expected NaN, got {value}"
            continue
        atol = ATOL_FLOAT32 if (implementation, metric) == ("anomalib_head", "pixel_aupro") else ATOL
        assert abs(value - expected) <= atol, f"{name}: {value!r} vs recorded {expected!r} (atol {atol})"


@pytest.mark.parametrize("case", [c for c in ATTRIBUTION if c in VALUES])
def test_legacy_aupro_gap_attribution(case):
    maps, masks, _, _ = load_case(case)
    got = V.legacy_aupro_attribution(maps, masks)
    expected = ATTRIBUTION[case]
    for key, golden_key in (("canonical", "canonical"), ("grid_only", "grid_only"),
                            ("rescale_only", "rescale_only"), ("both", "both (reproduces cal_pro_score)")):
        assert abs(got[key] - expected[golden_key]) <= ATOL, f"{case}.{key}"


def test_percent_scales_are_kept_by_the_repo_level_functions():
    maps, masks, labels, scores = load_case("mixed")
    ada = V.adaclip_metrics(maps, masks, labels, scores)
    assert abs(ada["image_auroc"] - 84.375) < 1e-9
    aa = V.aa_clip_metrics(np.ones_like(maps), masks, labels, scores)
    assert aa["image_auroc"] == round(0.84375, 4) * 100


def test_anomalib_aupr_quirks():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    perfect = np.arange(8, dtype=np.float32) / 10
    assert abs(V.aupr_anomalib(perfect, labels) - 0.9625) < 1e-7  # not 1: the segment into recall 1
    constant = np.full(8, 0.5, np.float32)
    assert abs(V.aupr_anomalib(constant, labels) - (1 + 5 / 8) / 2) < 1e-7  # (1 + prevalence) / 2
