"""Anomaly-detection metrics, implemented once, as the metric goldens define them.

Image level: AUROC, AP and F1-max over one score per image. Pixel level: the same over the pooled
pixels of a category (normal images included), and AUPRO (the MVTec AD definition). Every metric is
computed per category; a dataset number is the unweighted mean over categories (`macro_average`).

Policy:
* a metric that lacks one of the two classes it ranks is undefined: it returns NaN and emits an
  `UndefinedMetricWarning` (never 0 or 1, never an exception);
* NaN or +-inf scores raise ValueError; masks are binarized as mask != 0, labels as label != 0;
* constant scores are well defined: AUROC 0.5, AP = prevalence, F1-max = 2p/(1+p), AUPRO 0.15.

All metrics rank the scores with one sort and read counts off cumulative sums at the end of each
block of equal scores (one curve point per distinct score), in float64 with integer counts.

`aupro_legacy` is the 200-threshold AUPRO of AnomalyCLIP / FAPrompt / APRIL-GAN (`cal_pro_score`),
kept to reproduce paper numbers; the other repositories' behaviours are in `metrics_variants`.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

FPR_LIMIT = 0.3
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS


class UndefinedMetricWarning(UserWarning):
    """A metric was asked for where it is undefined (a class is missing); its value is NaN."""


def _undefined(name: str, reason: str) -> float:
    warnings.warn(f"{name} is undefined: {reason}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


# ---------------------------------------------------------------------------------------------------
# Input checks


def check_scores(scores, name: str = "scores") -> np.ndarray:
    """Scores as a numeric array; NaN or inf raise ValueError (a metric on them would be meaningless)."""
    scores = np.asarray(scores)
    if scores.dtype == bool or not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"{name} must be a float array, got dtype {scores.dtype}")
    if scores.size == 0:
        raise ValueError(f"{name} are empty")
    if np.issubdtype(scores.dtype, np.floating):
        bad = np.count_nonzero(~np.isfinite(scores))
        if bad:
            raise ValueError(f"{name} contain {bad} NaN or inf value(s); fix the scorer (metrics need finite scores)")
    return scores


def check_maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps [N,H,W] (a single [H,W] map is one image) and masks of the same shape, binarized."""
    maps = check_scores(maps, "anomaly maps")
    masks = np.asarray(masks)
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim != 3:
        raise ValueError(f"anomaly maps must be [N,H,W], got shape {list(maps.shape)}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {list(masks.shape)} differs from anomaly maps shape {list(maps.shape)}")
    return maps, masks != 0


def _check_labels(scores, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    scores = check_scores(scores, f"{name} scores").ravel()
    labels = np.asarray(labels).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{name}: {labels.size} labels for {scores.size} scores")
    return scores, labels != 0


# ---------------------------------------------------------------------------------------------------
# Ranking: one sort, counts at every distinct score


def _rank(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of the scores from highest to lowest, and the position of the last element of each block of
    equal scores in that order. A threshold t_k = the k-th distinct score predicts s >= t_k, so the
    counts at t_k are cumulative sums read at the end of block k."""
    if scores.dtype == np.float32 and scores.size < 2**32:
        keys = _sortable_bits(scores)
        # Sorting (key << 32 | index) as uint64 values is ~3x faster than np.argsort (SIMD sort) and
        # yields the permutation in the low 32 bits.
        packed = (keys.astype(np.uint64) << np.uint64(32)) | np.arange(scores.size, dtype=np.uint64)
        packed.sort()
        packed = packed[::-1]
        order = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
        ranked = packed >> np.uint64(32)
    else:
        order = np.argsort(scores)[::-1]
        ranked = scores[order]
    block_ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    return order, block_ends


def _sortable_bits(scores: np.ndarray) -> np.ndarray:
    """uint32 keys that order like the float32 scores and are equal exactly when the scores are."""
    bits = (scores + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into +0.0 (they are equal scores)
    # IEEE-754 floats order like integers once negatives have all bits flipped and positives the sign bit set.
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def _counts(values: np.ndarray, order: np.ndarray, block_ends: np.ndarray) -> np.ndarray:
    """sum of `values` over {s >= t_k} for every distinct score t_k, highest first."""
    return np.cumsum(values[order], dtype=np.int64 if values.dtype == bool else None)[block_ends]


def _tp_fp(scores, labels, order=None, block_ends=None) -> tuple[np.ndarray, np.ndarray, int, int]:
    if order is None:
        order, block_ends = _rank(scores)
    tp = _counts(labels, order, block_ends)
    fp = block_ends + 1 - tp  # everything above the threshold that is not a positive
    return tp, fp, int(tp[-1]), int(fp[-1])


def _auroc(tp, fp, n_pos, n_neg) -> float:
    # Trapezoids between consecutive ROC points, (0,0) first; a tie block is one diagonal segment, so this
    # is the Mann-Whitney statistic. Twice the area is an exact integer; one division rounds it.
    tp0, fp0 = np.append(0, tp[:-1]), np.append(0, fp[:-1])
    twice_area = int(np.sum((fp - fp0) * (tp + tp0)))
    return twice_area / (2 * n_pos * n_neg)


def _average_precision(tp, fp, n_pos) -> float:
    # Step sum: sum_k (R_k - R_{k-1}) P_k, no interpolation.
    new_positives = np.diff(tp, prepend=0)
    return float(np.sum(new_positives * (tp / (tp + fp))) / n_pos)


def _f1_max(tp, fp, n_pos) -> float:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); the appended P = R = 0 point scores 0.
    return float(np.max(2 * tp / (tp + fp + n_pos)))


def _missing_class(n_pos: int, n_neg: int, what: str) -> str:
    missing = "anomalous" if n_pos == 0 else "normal"
    return f"no {missing} {what}; it needs at least one anomalous and one normal"


def _ranking_metrics(scores, labels, prefix, order=None, block_ends=None) -> dict[str, float]:
    tp, fp, n_pos, n_neg = _tp_fp(scores, labels, order, block_ends)
    names = [f"{prefix}_auroc", f"{prefix}_ap", f"{prefix}_f1max"]
    if n_pos == 0 or n_neg == 0:
        return {name: _undefined(name, _missing_class(n_pos, n_neg, f"{prefix}s")) for name in names}
    return dict(zip(names, (_auroc(tp, fp, n_pos, n_neg), _average_precision(tp, fp, n_pos), _f1_max(tp, fp, n_pos))))


def ranking_metrics(scores, labels, prefix: str = "image") -> dict[str, float]:
    """AUROC, AP and F1-max of `scores` (higher = more anomalous) against binary `labels`, from one sort.

    Keys `<prefix>_auroc`, `<prefix>_ap`, `<prefix>_f1max`; NaN (with a warning) when a class is missing."""
    scores, labels = _check_labels(scores, labels, prefix)
    return _ranking_metrics(scores, labels, prefix)


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(s_anomalous > s_normal) + 1/2 P(tie), = sklearn's roc_auc_score."""
    tp, fp, n_pos, n_neg = _tp_fp(*_check_labels(scores, labels, "auroc"))
    if n_pos == 0 or n_neg == 0:
        return _undefined("auroc", _missing_class(n_pos, n_neg, "samples"))
    return _auroc(tp, fp, n_pos, n_neg)


def average_precision(scores, labels) -> float:
    """sum_k (R_k - R_{k-1}) P_k over the distinct scores, = sklearn's average_precision_score."""
    tp, fp, n_pos, n_neg = _tp_fp(*_check_labels(scores, labels, "average precision"))
    if n_pos == 0 or n_neg == 0:
        return _undefined("average precision", _missing_class(n_pos, n_neg, "samples"))
    return _average_precision(tp, fp, n_pos)


def f1_max(scores, labels) -> float:
    """max over the distinct scores t of 2TP / (2TP + FP + FN) when predicting s >= t."""
    tp, fp, n_pos, n_neg = _tp_fp(*_check_labels(scores, labels, "f1_max"))
    if n_pos == 0 or n_neg == 0:
        return _undefined("f1_max", _missing_class(n_pos, n_neg, "samples"))
    return _f1_max(tp, fp, n_pos)


# ---------------------------------------------------------------------------------------------------
# AUPRO


def _structure(connectivity: int) -> np.ndarray:
    """2-D neighbourhood as a 3-D structure with no links between images (components belong to their image)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    plane = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = plane
    return structure


def label_regions(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of every image's binary mask, numbered 1..K over the whole stack (0 = normal)."""
    masks = np.asarray(masks) != 0
    if masks.ndim == 2:
        masks = masks[None]
    regions, n_regions = ndimage.label(masks, structure=_structure(connectivity))
    return regions, int(n_regions)


def _pro_counts(region_ids, n_regions, order, block_ends) -> tuple[np.ndarray, np.ndarray, int]:
    """At every distinct score, highest first: the FP count (normal pixels with s >= t), PRO(t), and the
    number of normal pixels."""
    region_sizes = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
    # Each region pixel carries 1/|C_k|: summed over {s >= t} and divided by K, that is PRO(t).
    pixel_weight = np.append(0.0, 1.0 / region_sizes[1:])[region_ids.ravel()]
    pro = _counts(pixel_weight, order, block_ends) / n_regions
    fp = _counts(region_ids.ravel() == 0, order, block_ends)
    return fp, pro, int(region_sizes[0])


def _pro_curve(region_ids, n_regions, order, block_ends) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, highest first, with (0,0) prepended."""
    fp, pro, n_normal = _pro_counts(region_ids, n_regions, order, block_ends)
    return np.append(0.0, fp / n_normal), np.append(0.0, pro)


def pro_curve(maps, masks, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve: FPR and PRO at every distinct score (from (0,0) to (1,1)), for plotting or integration.

    Raises ValueError where AUPRO is undefined (no GT region or no normal pixel)."""
    maps, masks = check_maps_and_masks(maps, masks)
    regions, n_regions = label_regions(masks, connectivity)
    if n_regions == 0 or np.all(regions):
        raise ValueError("the PRO curve needs at least one GT region and one normal pixel")
    order, block_ends = _rank(maps.ravel())
    return _pro_curve(regions, n_regions, order, block_ends)


def area_under_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Trapezoid area of the piecewise-linear curve over [0, fpr_limit], divided by fpr_limit.

    `fpr` must be non-decreasing and start at 0. When the limit falls between two points, the curve value
    at exactly the limit is linearly interpolated and the partial trapezoid added."""
    n_inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    area = float(np.trapezoid(pro[:n_inside], fpr[:n_inside]))
    last = n_inside - 1
    if n_inside < fpr.size and fpr[last] < fpr_limit:
        f0, f1, p0, p1 = fpr[last], fpr[n_inside], pro[last], pro[n_inside]
        pro_at_limit = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
        area += (fpr_limit - f0) * (p0 + pro_at_limit) / 2
    return float(area / fpr_limit)


def _aupro_ranked(masks, order, block_ends, fpr_limit, connectivity, name="aupro") -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    regions, n_regions = label_regions(masks, connectivity)
    if n_regions == 0:
        return _undefined(name, "no anomalous GT region in the category's masks")
    if np.all(regions):
        return _undefined(name, "no normal pixel in the category's masks")
    fpr, pro = _pro_curve(regions, n_regions, order, block_ends)
    return area_under_curve(fpr, pro, fpr_limit)


def aupro(maps, masks, fpr_limit: float = FPR_LIMIT, connectivity: int = 8) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalized to [0, 1] (MVTec AD).

    Regions are the connected components of each image's mask (8-connectivity by default, 4 optional);
    PRO(t) averages |C_k & {s >= t}| / |C_k| over all K regions of the category, FPR(t) is the fraction
    of normal pixels (outside every region) with s >= t; one point per distinct score, from (0,0)."""
    maps, masks = check_maps_and_masks(maps, masks)
    order, block_ends = _rank(maps.ravel())
    return _aupro_ranked(masks, order, block_ends, fpr_limit, connectivity)


def pixel_metrics(maps, masks, fpr_limit: float = FPR_LIMIT, connectivity: int = 8) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pixel_f1max over the pooled pixels, and aupro, from one sort of the pixels."""
    maps, masks = check_maps_and_masks(maps, masks)
    pixel_scores = maps.ravel()
    order, block_ends = _rank(pixel_scores)
    out = _ranking_metrics(pixel_scores, masks.ravel(), "pixel", order, block_ends)
    out["aupro"] = _aupro_ranked(masks, order, block_ends, fpr_limit, connectivity)
    return out


# ---------------------------------------------------------------------------------------------------
# The 200-threshold AUPRO of AnomalyCLIP / FAPrompt / APRIL-GAN (cal_pro_score), for paper numbers


def legacy_pro_points(maps, masks, n_steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds, FPR and PRO of the 200-threshold grid, in threshold order (ascending).

    The grid is np.arange(min, max, (max - min) / n_steps) in the maps' dtype (the max itself excluded),
    a pixel counts as anomalous when s > threshold, regions are 8-connected. PRO is the mean over regions
    of the region's detected fraction, FPR the fraction of normal pixels above the threshold.
    Raises ValueError on constant maps (the grid step is 0) and without regions or normal pixels."""
    maps, masks = check_maps_and_masks(maps, masks)
    low, high = maps.min(), maps.max()
    if low == high:
        raise ValueError("constant anomaly maps: the 200-threshold grid has step 0")
    thresholds = np.arange(low, high, (high - low) / n_steps)
    regions, n_regions = label_regions(masks, 8)
    if n_regions == 0 or np.all(regions):
        raise ValueError("the PRO curve needs at least one GT region and one normal pixel")
    # A pixel exceeds exactly the thresholds below it: the first `n_below` ones of the ascending grid.
    n_below = np.searchsorted(thresholds, maps.ravel(), side="left")
    n_slots = thresholds.size + 1
    hist = np.bincount(regions.ravel() * n_slots + n_below, minlength=(n_regions + 1) * n_slots)
    hist = hist.reshape(n_regions + 1, n_slots)
    at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # at_least[k, j]: pixels of k with n_below >= j
    above = at_least[:, 1:]  # above[k, j]: pixels of region k (k = 0: normal) with s > thresholds[j]
    sizes = at_least[:, 0]
    fpr = above[0] / sizes[0]
    # The mean runs along contiguous rows, so numpy sums pairwise over the regions, as the original's mean
    # over its list of per-region overlaps does (same bits).
    pro = np.ascontiguousarray((above[1:] / sizes[1:, None]).T).mean(axis=1)
    return thresholds, fpr, pro


def aupro_legacy(maps, masks, n_steps: int = 200, fpr_limit: float = FPR_LIMIT) -> float:
    """AUPRO as AnomalyCLIP, FAPrompt and APRIL-GAN compute it (their identical `cal_pro_score`).

    Keeps the grid points with FPR < fpr_limit (strictly), min-max rescales their FPRs to [0, 1] (so the
    area is normalized by the largest kept FPR, and shifted when the top threshold still has false
    positives), and integrates PRO over them with the trapezoid rule; there is no interpolation at the
    limit. The result depends on the score range (an outlier pixel coarsens the grid), unlike `aupro`.

    Where the original fails, zsad returns NaN with an UndefinedMetricWarning instead: constant maps
    (the original raises `ValueError: arange: cannot compute length`), no GT region (the original returns
    NaN), no normal pixel, or fewer than two grid points below the limit (the original raises or gives NaN).
    """
    maps, masks = check_maps_and_masks(maps, masks)
    if maps.min() == maps.max():
        return _undefined("aupro_legacy", "constant anomaly maps: the 200-threshold grid has step 0 "
                                          "(the original cal_pro_score raises ValueError)")
    regions, n_regions = label_regions(masks, 8)
    if n_regions == 0:
        return _undefined("aupro_legacy", "no anomalous GT region in the category's masks")
    if np.all(regions):
        return _undefined("aupro_legacy", "no normal pixel in the category's masks")
    _, fpr, pro = legacy_pro_points(maps, masks, n_steps)
    kept = fpr < fpr_limit
    if np.count_nonzero(kept) < 2 or fpr[kept].max() == fpr[kept].min():
        return _undefined("aupro_legacy", f"fewer than two distinct grid FPRs below {fpr_limit}")
    fpr = fpr[kept]
    rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # FPR falls as the threshold rises; integrate in the direction of increasing FPR.
    return float(-np.trapezoid(pro[kept], rescaled))


# ---------------------------------------------------------------------------------------------------
# A category and a dataset


def evaluate_category(maps, masks, labels, image_scores=None, *, legacy: bool = False) -> dict[str, float]:
    """All metrics of one category: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AUPRO (and aupro_legacy).

    `image_scores` default to each map's maximum (a modelling choice; methods pass their own)."""
    maps, masks = check_maps_and_masks(maps, masks)
    if image_scores is None:
        image_scores = maps.reshape(len(maps), -1).max(axis=1)
    image_scores = check_scores(image_scores, "image scores")
    if np.asarray(labels).size != len(maps) or image_scores.size != len(maps):
        raise ValueError(f"{len(maps)} maps but {np.asarray(labels).size} labels and {image_scores.size} image scores")
    out = ranking_metrics(image_scores, labels, "image")
    out.update(pixel_metrics(maps, masks))
    if legacy:
        out["aupro_legacy"] = aupro_legacy(maps, masks)
    return out


def macro_average(values) -> tuple[float, int]:
    """Unweighted mean over categories, skipping undefined (NaN) ones: returns (mean, n_averaged).

    `values` is a sequence of per-category values or a dict category -> value. A plain mean would turn
    one undefined category into NaN, and counting it as 0 (as AdaCLIP does) biases the mean low."""
    values = np.asarray(list(values.values()) if isinstance(values, dict) else list(values), dtype=np.float64)
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return _undefined("the mean over categories", "no category has the metric defined"), 0
    return float(np.mean(defined)), int(defined.size)


def evaluate_categories(maps, masks, labels, image_scores=None, categories=None, *,
                        legacy: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """Metrics per category and their unweighted means.

    Returns ({category: {metric: value}}, {metric: {"mean": m, "n_categories": n}}); without
    `categories` all images form one category named "all"."""
    maps, masks = check_maps_and_masks(maps, masks)
    labels = np.asarray(labels).ravel()
    if image_scores is None:
        image_scores = maps.reshape(len(maps), -1).max(axis=1)
    image_scores = check_scores(image_scores, "image scores").ravel()
    categories = np.array(["all"] * len(maps) if categories is None else categories).astype(str).ravel()
    for name, arr in (("labels", labels), ("image scores", image_scores), ("categories", categories)):
        if arr.size != len(maps):
            raise ValueError(f"{len(maps)} maps but {arr.size} {name}")
    per_category = {}
    for category in dict.fromkeys(categories.tolist()):  # first-appearance order
        sel = categories == category
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            per_category[category] = evaluate_category(maps[sel], masks[sel], labels[sel], image_scores[sel],
                                                        legacy=legacy)
        for w in caught:
            warnings.warn(f"category {category!r}: {w.message}", w.category, stacklevel=2)
    names = list(next(iter(per_category.values())))
    means = {}
    for name in names:
        mean, n = macro_average([per_category[c][name] for c in per_category])
        means[name] = {"mean": mean, "n_categories": n}
    return per_category, means
