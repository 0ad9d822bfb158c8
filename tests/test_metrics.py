"""zsad_core.metrics: the definitions against brute force and sklearn, the NaN / warning policy, constant
scores, bad input."""
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from zsad_core import metrics as M


def brute_force_ranking(scores, labels):
    """AUROC as the Mann-Whitney count, AP and F1-max over every distinct threshold, in exact fractions."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    auroc = Fraction(sum(2 * (p > n) + (p == n) for p in pos for n in neg), 2 * len(pos) * len(neg))
    ap, f1, prev_recall = Fraction(0), Fraction(0), Fraction(0)
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if y and s >= t)
        fp = sum(1 for s, y in zip(scores, labels) if not y and s >= t)
        recall = Fraction(tp, len(pos))
        ap += (recall - prev_recall) * Fraction(tp, tp + fp)
        f1 = max(f1, Fraction(2 * tp, tp + fp + len(pos)))
        prev_recall = recall
    return float(auroc), float(ap), float(f1)


@pytest.mark.parametrize("seed", range(6))
def test_ranking_metrics_equal_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, n).astype(np.float32) / 5  # many ties, also across classes
    got = M.ranking_metrics(scores, labels)
    expected = brute_force_ranking(scores.tolist(), labels.tolist())
    for key, value in zip(("image_auroc", "image_ap", "image_f1max"), expected):
        assert abs(got[key] - value) < 1e-12, key
    assert abs(got["image_auroc"] - roc_auc_score(labels, scores)) < 1e-12
    assert abs(got["image_ap"] - average_precision_score(labels, scores)) < 1e-12


def brute_force_aupro(maps, masks, limit, connectivity):
    """PRO and FPR at every distinct score from per-region loops, then the trapezoid with interpolation."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    regions = []
    for m, mask in zip(maps, masks):
        labeled, n = ndimage.label(mask, structure)
        regions += [m[labeled == k] for k in range(1, n + 1)]
    normal = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        points.append((np.mean(normal >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points[:-1], points[1:]):
        if f0 >= limit:
            break
        if f1 > limit:
            p1 = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
            f1 = limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / limit


@pytest.mark.parametrize("limit,connectivity", [(0.3, 8), (0.3, 4), (0.05, 8), (1.0, 8)])
def test_aupro_equals_brute_force(limit, connectivity):
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 12, 12), np.uint8)
    masks[1, 2:5, 2:5] = 1
    masks[1, 5, 5] = 1  # touches the square at a corner only: one region with 8-, two with 4-connectivity
    masks[2, 7:11, 1:3] = 1
    masks[3, 0, 11] = 1
    maps = (rng.integers(0, 30, masks.shape) + 10 * masks).astype(np.float32) / 40  # ties included
    expected = brute_force_aupro(maps, masks, limit, connectivity)
    assert abs(M.aupro(maps, masks, fpr_limit=limit, connectivity=connectivity) - expected) < 1e-12


def test_pro_curve_runs_from_origin_to_one_one():
    maps = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[0, 3:7, 3:7] = 1
    fpr, pro = M.pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and fpr[-1] == 1.0 and abs(pro[-1] - 1) < 1e-12
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert len(fpr) == len(np.unique(maps)) + 1  # one point per distinct score


@pytest.mark.parametrize("n_pos,n_neg", [(3, 5), (1, 99), (40, 2)])
def test_constant_scores_are_well_defined(n_pos, n_neg):
    p = n_pos / (n_pos + n_neg)
    labels = np.array([1] * n_pos + [0] * n_neg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant scorer is not an undefined case
        got = M.ranking_metrics(np.full(labels.size, 0.5, np.float32), labels)
        maps = np.full((2, 8, 8), 0.25, np.float32)
        masks = np.zeros(maps.shape, np.uint8)
        masks[1, :2, :3] = 1
        aupro = M.aupro(maps, masks)
    assert got["image_auroc"] == 0.5
    assert abs(got["image_ap"] - p) < 1e-15
    assert abs(got["image_f1max"] - 2 * p / (1 + p)) < 1e-15
    assert abs(aupro - 0.15) < 1e-12


def test_undefined_metrics_are_nan_with_a_warning_never_0_or_1():
    scores = np.array([0.1, 0.7, 0.4])
    for labels in ([1, 1, 1], [0, 0, 0]):
        for fn in (M.auroc, M.average_precision, M.f1_max):
            with pytest.warns(M.UndefinedMetricWarning, match="undefined"):
                assert math.isnan(fn(scores, labels))
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(M.UndefinedMetricWarning, match="no anomalous GT region"):
        assert math.isnan(M.aupro(maps, np.zeros(maps.shape)))
    with pytest.warns(M.UndefinedMetricWarning, match="no normal pixel"):
        assert math.isnan(M.aupro(maps, np.ones(maps.shape)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = M.pixel_metrics(maps, np.zeros(maps.shape))
    assert all(math.isnan(v) for v in values.values())
    assert [str(w.message).split(" is undefined")[0] for w in caught] == list(values)


def test_defined_metrics_do_not_warn():
    maps = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[2, 2:4, 2:4] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = M.evaluate_category(maps, masks, [0, 0, 1], legacy=True)
    assert all(0 <= v <= 1 for v in values.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    scores = np.array([0.1, bad, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        M.auroc(scores, [0, 1, 1])
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, 1, 1] = bad
    masks = np.zeros(maps.shape, np.uint8)
    masks[1, 0, 0] = 1
    for fn in (M.aupro, M.aupro_legacy, M.pixel_metrics):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(maps, masks)


def test_masks_are_binarized_as_nonzero():
    rng = np.random.default_rng(2)
    maps = rng.random((3, 10, 10)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[1, 2:6, 3:7] = 1
    masks[2, 0:2, 0:9] = 1
    as_255 = M.evaluate_category(maps, masks * 255, [0, 1, 1], legacy=True)
    as_float = M.evaluate_category(maps, masks.astype(np.float32) * 0.7, [0, 1, 1], legacy=True)
    assert M.evaluate_category(maps, masks, [0, 1, 1], legacy=True) == as_255 == as_float


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="differs from anomaly maps shape"):
        M.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="labels"):
        M.auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="connectivity"):
        M.aupro(np.zeros((1, 4, 4)), np.eye(4)[None], connectivity=6)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.zeros((1, 4, 4)), np.eye(4)[None], fpr_limit=0)


def test_rank_handles_negative_zero_and_extreme_floats():
    scores = np.array([-0.0, 0.0, -1.5, 2.0, -1e-30, 3.4e38, -3.4e38, 0.5, 0.5, -0.0], np.float32)
    order, block_ends = M._rank(scores)
    assert np.array_equal(scores[order], np.sort(scores)[::-1])
    # blocks: 3.4e38 | 2 | 0.5 0.5 | 0 -0 -0 | -1e-30 | -1.5 | -3.4e38
    assert block_ends.tolist() == [0, 1, 3, 6, 7, 8, 9]


def test_macro_average_skips_nan_and_counts():
    assert M.macro_average([0.5, math.nan, 1.0]) == (0.75, 2)
    assert M.macro_average({"a": 0.2, "b": 0.4}) == (pytest.approx(0.3), 2)
    with pytest.warns(M.UndefinedMetricWarning):
        mean, n = M.macro_average([math.nan, math.nan])
    assert math.isnan(mean) and n == 0


def test_default_image_score_is_the_map_maximum():
    rng = np.random.default_rng(4)
    maps = rng.random((6, 8, 8)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[3:, 1:3, 1:3] = 1
    labels = [0, 0, 0, 1, 1, 1]
    assert M.evaluate_category(maps, masks, labels) == M.evaluate_category(maps, masks, labels, maps.max(axis=(1, 2)))
