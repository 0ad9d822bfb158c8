"""How the official repositories compute their metrics, reimplemented from the metric goldens' account.

zsad's own numbers come from `zsad_core.metrics`. This module reproduces what the metric code of each
official repository returns (its guards, its quirks, its numeric precision) so the workbook can measure
the disagreement with the canonical definitions instead of quoting it. Written for this project from the
goldens' description of each behaviour; no code of the repositories is copied.

`IMPLEMENTATIONS[name](maps, masks, labels, image_scores)` returns {metric: value} as fractions in [0,1]
(percentages divided by 100, as in the goldens' values.json), for the metrics that implementation
computes. Where the original raises, the variant raises the same exception type; `run_implementation`
turns that into {"error": "Type: message"}.

Behaviours:
* sklearn (>= 1.6): AUROC is NaN with a warning for one class; AP is 0 without positives, 1 without
  negatives; F1-max over `precision_recall_curve` is 0 / 1 there.
* `cal_pro_score` (AnomalyCLIP, FAPrompt, APRIL-GAN): the 200-threshold AUPRO (`metrics.aupro_legacy`);
  raises on constant maps, NaN without regions.
* MVTec AD script: FPRs stored in float32; without a GT region it integrates the diagonal: 0.15.
* Bayes-PFL: F1 with +1e-6 (image) / +1e-8 (pixel) in the denominator, image metrics 0 when every image
  is anomalous, AUPRO hard-coded 0; its image-only path uses the exact F1.
* AA-CLIP: min-max normalizes maps and scores (0/0 on constant input, then sklearn raises), rounds
  every metric to 4 decimals (round(x, 4) * 100), image metrics 0 with one image class; no F1, no AUPRO.
* AdaCLIP: every metric 0 when its labels have one class; x100.
* anomalib HEAD: float32 torchmetrics curves (predictions outside [0,1] go through a sigmoid first),
  AUPR = trapezoid area under the PR curve after a stable sort by recall, 0 for AUROC / AUPRO with a
  missing class; AUPRO is the MVTec algorithm.
* anomalib <= v2.2.0: the same, but AUPRO averages per-region ROC curves resampled by index.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np

from . import metrics as M


class SklearnUndefinedWarning(UserWarning):
    """What sklearn's UndefinedMetricWarning says: AUROC with one class present is NaN."""


# ---------------------------------------------------------------------------------------------------
# sklearn behaviour (scikit-learn >= 1.6), from the ranking counts


def _counts(scores, labels):
    scores, labels = M._check_labels(scores, labels, "scores")
    return M._tp_fp(scores, labels)


def sklearn_auroc(scores, labels) -> float:
    """roc_auc_score: NaN (with a warning) when one class is missing; the canonical AUROC otherwise."""
    tp, fp, n_pos, n_neg = _counts(scores, labels)
    if n_pos == 0 or n_neg == 0:
        warnings.warn("Only one class is present in y_true. ROC AUC score is not defined in that case.",
                      SklearnUndefinedWarning, stacklevel=2)
        return float("nan")
    return M._auroc(tp, fp, n_pos, n_neg)


def sklearn_ap(scores, labels) -> float:
    """average_precision_score: 0 without positives, 1 without negatives (precision is then always 1)."""
    tp, fp, n_pos, _ = _counts(scores, labels)
    return 0.0 if n_pos == 0 else M._average_precision(tp, fp, n_pos)


def pr_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """precision_recall_curve as sklearn returns it: highest threshold last, then the point (P=1, R=0);
    recall is 1 everywhere when there is no positive."""
    tp, fp, n_pos, _ = _counts(scores, labels)
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    precision = tp / (tp + fp)
    recall = np.ones_like(tp) if n_pos == 0 else tp / tp[-1]
    return np.append(precision[::-1], 1.0), np.append(recall[::-1], 0.0)


def f1_max_from_pr_curve(scores, labels, eps: float = 0.0) -> float:
    """max of 2PR / (P + R + eps) over the finite points of the PR curve (0/0 points are dropped)."""
    precision, recall = pr_curve(scores, labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = (2 * precision * recall) / (precision + recall + eps)
    return float(np.max(f1[np.isfinite(f1)]))


# ---------------------------------------------------------------------------------------------------
# AUPRO variants


def aupro_cal_pro_score(maps, masks) -> float:
    """`cal_pro_score` as the original behaves: `aupro_legacy`, but raising on constant maps (step-0 grid)
    and NaN without GT regions, as the original does."""
    maps = np.asarray(maps)
    if maps.min() == maps.max():
        raise ValueError("arange: cannot compute length (cal_pro_score on constant maps: the grid step is 0)")
    if M.label_regions(masks)[1] == 0:
        return float("nan")  # the original averages an empty list of region overlaps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        return M.aupro_legacy(maps, masks)


def aupro_mvtec_script(maps, masks, fpr_limit: float = M.FPR_LIMIT) -> float:
    """The MVTec AD evaluation script: exact curve, but FPRs stored in float32; without GT regions the PRO
    values are NaN, its trapezoid drops them and integrates the diagonal (0,0)-(1,1): 0.15, silently."""
    maps, masks = M.check_maps_and_masks(maps, masks)
    regions, n_regions = M.label_regions(masks)
    n_normal = int(np.count_nonzero(regions == 0))
    if n_regions == 0 or n_normal == 0:
        fpr, pro = np.array([0.0, 1.0]), np.array([0.0, 1.0])  # the only finite points left
    else:
        order, block_ends = M._rank(maps.ravel())
        fp, pro, _ = M._pro_counts(regions, n_regions, order, block_ends)
        fpr = (fp.astype(np.float32) / np.float32(n_normal)).astype(np.float64)
        # (0,0) first and (1,1) last, values above 1 from cumulative rounding clipped
        fpr = np.concatenate([[0.0], np.minimum(fpr, 1.0), [1.0]])
        pro = np.concatenate([[0.0], np.minimum(pro, 1.0), [1.0]])
    return M.area_under_curve(fpr, pro, fpr_limit)


def aupro_anomalib_head(maps, masks, fpr_limit: float = M.FPR_LIMIT) -> float:
    """anomalib HEAD `_AUPRO`: the canonical algorithm (in float32 there, errors <= 1e-7), but 0 instead of
    NaN when there is no GT region or no normal pixel."""
    maps, masks = M.check_maps_and_masks(maps, masks)
    regions, n_regions = M.label_regions(masks)
    if n_regions == 0 or np.all(regions):
        return 0.0
    return M.aupro(maps, masks, fpr_limit)


def legacy_aupro_attribution(maps, masks, fpr_limit: float = M.FPR_LIMIT) -> dict[str, float]:
    """Split the gap between `aupro_legacy` and `aupro` into its two causes.

    grid_only: the 200-threshold grid's points (with (0,0) and (1,1)), integrated canonically (interpolated
    at the limit, divided by it). rescale_only: the exact curve, cut at FPR < limit and min-max rescaled as
    cal_pro_score does. both: `aupro_legacy`."""
    maps, masks = M.check_maps_and_masks(maps, masks)
    _, grid_fpr, grid_pro = M.legacy_pro_points(maps, masks)
    grid_fpr = np.concatenate([[0.0], grid_fpr[::-1], [1.0]])  # ascending FPR
    grid_pro = np.concatenate([[0.0], grid_pro[::-1], [1.0]])
    order, block_ends = M._rank(maps.ravel())
    regions, n_regions = M.label_regions(masks)
    fpr, pro = M._pro_curve(regions, n_regions, order, block_ends)
    kept = fpr < fpr_limit
    rescaled = (fpr[kept] - fpr[kept].min()) / (fpr[kept].max() - fpr[kept].min())
    return {"canonical": M.area_under_curve(fpr, pro, fpr_limit),
            "grid_only": M.area_under_curve(grid_fpr, grid_pro, fpr_limit),
            "rescale_only": float(np.trapezoid(pro[kept], rescaled)),
            "both": M.aupro_legacy(maps, masks, fpr_limit=fpr_limit)}


# anomalib and torchmetrics compute in float32 torch; the emulation below does the same arithmetic.


def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n inside the block.

    The emulations run on one thread (faster on a shared CPU, and their sorts, cumulative sums and maxima do
    not depend on it) except the final trapezoid sums: torch splits sums longer than 32768 elements between
    threads, which changes the last bit, and the recorded anomalib outputs come from a 2-thread run."""
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _torch_threads(1):
            return fn(*args, **kwargs)
    return wrapper


def _formatted_predictions(scores):
    """torchmetrics' input formatting: float32, and a sigmoid when any prediction lies outside [0, 1]
    (monotone, but it merges neighbouring float32 values)."""
    torch = _torch()
    preds = torch.as_tensor(np.ascontiguousarray(scores, dtype=np.float32)).flatten()
    if not bool(torch.all((preds >= 0) & (preds <= 1))):
        preds = preds.sigmoid()
    return preds


def _torch_clf_curve(preds, target):
    """Cumulative FP and TP counts (float32) at every distinct prediction, highest first."""
    torch = _torch()
    order = torch.argsort(preds, descending=True)
    preds, target = preds[order], target[order].to(torch.float32)
    block_ends = torch.nn.functional.pad(torch.where(preds[1:] - preds[:-1])[0], [0, 1], value=preds.numel() - 1)
    tps = torch.cumsum(target, 0)[block_ends]
    fps = 1 + block_ends - tps
    return fps, tps


def _torch_roc(preds, target):
    """torchmetrics binary_roc: (0,0) first; an all-zero FPR (TPR) when there is no negative (positive)."""
    torch = _torch()
    fps, tps = _torch_clf_curve(preds, target)
    fps, tps = torch.cat([torch.zeros(1), fps]), torch.cat([torch.zeros(1), tps])
    fpr = torch.zeros_like(fps) if fps[-1] <= 0 else fps / fps[-1]
    tpr = torch.zeros_like(tps) if tps[-1] <= 0 else tps / tps[-1]
    return fpr, tpr


def _torch_auc_reordered(x, y):
    """torchmetrics auc(x, y, reorder=True): stable sort by x, then the trapezoid rule (a float32 tensor)."""
    torch = _torch()
    x, idx = torch.sort(x, stable=True)
    with _torch_threads(2):
        return torch.trapz(y[idx], x)


@_single_threaded
def auroc_anomalib(scores, labels) -> float:
    """anomalib AUROC: float32 torchmetrics ROC (sigmoid outside [0,1]); 0 when a class is missing."""
    torch = _torch()
    fpr, tpr = _torch_roc(_formatted_predictions(scores), torch.as_tensor(np.asarray(labels).ravel() != 0))
    return float(_torch_auc_reordered(fpr, tpr))


@_single_threaded
def aupr_anomalib(scores, labels) -> float:
    """anomalib AUPR: trapezoid area under the float32 PR curve after a stable sort by recall.

    The curve runs from the lowest threshold (recall 1) to the appended (R=0, P=1); the stable sort keeps
    equal-recall points in that order, lowest precision first, so the segment into recall 1 uses the lowest
    precision. Not the step-wise AP: a perfect scorer can get less than 1, a constant one (1 + p) / 2."""
    torch = _torch()
    fps, tps = _torch_clf_curve(_formatted_predictions(scores), torch.as_tensor(np.asarray(labels).ravel() != 0))
    precision = tps / (tps + fps)
    recall = torch.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    precision = torch.cat([precision.flip(0), torch.ones(1)])
    recall = torch.cat([recall.flip(0), torch.zeros(1)])
    return float(_torch_auc_reordered(recall, precision))


@_single_threaded
def f1max_anomalib(scores, labels) -> float:
    """anomalib F1Max: max of 2PR / (P + R + 1e-10) over its own float32 PR curve (no sigmoid); no undefined
    guard, so 0 without positives and 1 without negatives."""
    torch = _torch()
    preds = torch.as_tensor(np.ascontiguousarray(scores, dtype=np.float32)).flatten()
    fps, tps = _torch_clf_curve(preds, torch.as_tensor(np.asarray(labels).ravel() != 0))
    precision = torch.cat([(tps / (tps + fps)).flip(0), torch.ones(1)])
    recall = torch.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    recall = torch.cat([recall.flip(0), torch.zeros(1)])
    return float(torch.max((2 * precision * recall) / (precision + recall + 1e-10)))


def _interp_by_index(old_x, old_y, new_x):
    """anomalib's linear interpolation: slopes with +eps in the denominator, left neighbours clamped."""
    torch = _torch()
    eps = torch.finfo(old_y.dtype).eps
    slope = (old_y[1:] - old_y[:-1]) / (eps + (old_x[1:] - old_x[:-1]))
    left = torch.clamp(torch.searchsorted(old_x, new_x) - 1, 0, old_x.numel() - 2)
    return old_y[left] + slope[left] * (new_x - old_x[left])


@_single_threaded
def aupro_anomalib_v220(maps, masks, fpr_limit: float = M.FPR_LIMIT) -> float:
    """anomalib <= v2.2.0 `_AUPRO`: per-region ROC curves averaged after resampling by index.

    1. Global ROC of all pixels: the number of its points with FPR <= limit is the output size S.
    2. For every region, the ROC on (all normal pixels + that region), cut at the limit: if no point
       lies near the limit, the next point is kept and the limit's position interpolated.
    3. Each cut curve is resampled at S evenly spaced *indices* (not FPRs) and FPR and TPR are averaged
       over regions; the area (trapezoid after a stable sort by FPR) is divided by the last averaged FPR.
    NaN without regions and on constant maps (the averaged curve collapses to one point)."""
    torch = _torch()
    maps, masks = M.check_maps_and_masks(maps, masks)
    regions, n_regions = M.label_regions(masks)
    limit = torch.tensor(fpr_limit, dtype=torch.float32)
    region_ids = torch.as_tensor(regions.ravel().astype(np.int64))
    preds = torch.as_tensor(np.ascontiguousarray(maps.ravel(), dtype=np.float32))
    target = torch.as_tensor(masks.ravel())
    global_fpr, _ = _torch_roc(_formatted_predictions(preds.numpy()), target)
    size = int(torch.count_nonzero(global_fpr <= limit))
    fpr_sum, tpr_sum = torch.zeros(size), torch.zeros(size)
    new_idx = torch.arange(size, dtype=torch.float32)
    background = region_ids == 0
    for region in range(1, n_regions + 1):
        new_idx[-1] = size - 1
        in_region = region_ids == region
        pool = background | in_region
        fpr, tpr = _torch_roc(_formatted_predictions(preds[pool].numpy()), in_region[pool])
        region_limit = fpr[fpr > limit].min() if fpr[fpr <= limit].max() == 0 else limit
        kept = torch.where(fpr <= region_limit)[0]
        interpolate = not torch.allclose(fpr[kept].max(), limit)
        if interpolate:  # add the first point past the limit; the limit lies a fraction `slope` towards it
            after = torch.searchsorted(fpr, limit)
            kept = torch.cat([kept, after.reshape(1)])
            slope = 1 - (fpr[after] - limit) / (fpr[after] - fpr[after - 1])
        fpr, tpr = fpr[kept], tpr[kept]
        position = kept.float()
        position /= position.max()
        position *= new_idx.max()
        if interpolate:
            new_idx[-1] = position[-2] + (position[-1] - position[-2]) * slope
        tpr_sum += _interp_by_index(position, tpr, new_idx)
        fpr_sum += _interp_by_index(position, fpr, new_idx)
    tpr_mean, fpr_mean = tpr_sum / n_regions, fpr_sum / n_regions  # 0/0 = NaN without regions
    return float(_torch_auc_reordered(fpr_mean, tpr_mean) / fpr_mean[-1])


# ---------------------------------------------------------------------------------------------------
# The repositories' metric functions, as whole suites


def _pooled(maps, masks):
    return np.asarray(maps).ravel(), np.asarray(masks).ravel() != 0


def _minmax(x, eps=0.0):
    return (x - x.min()) / (x.max() - x.min() + eps)


def sklearn_suite(maps, masks, labels, image_scores) -> dict:
    """The plain sklearn calls (roc_auc_score, average_precision_score, max F1 over the PR curve)."""
    px, gt = _pooled(maps, masks)
    return {"image_auroc": sklearn_auroc(image_scores, labels), "image_ap": sklearn_ap(image_scores, labels),
            "image_f1max": f1_max_from_pr_curve(image_scores, labels),
            "pixel_auroc": sklearn_auroc(px, gt), "pixel_ap": sklearn_ap(px, gt),
            "pixel_f1max": f1_max_from_pr_curve(px, gt)}


def anomalyclip_suite(maps, masks, labels, image_scores) -> dict:
    """AnomalyCLIP metrics.py: image AUROC / AP, pixel AUROC (sklearn) and cal_pro_score."""
    px, gt = _pooled(maps, masks)
    return {"image_auroc": sklearn_auroc(image_scores, labels), "image_ap": sklearn_ap(image_scores, labels),
            "pixel_auroc": sklearn_auroc(px, gt), "pixel_aupro": lambda: aupro_cal_pro_score(maps, masks)}


def _faprompt_pixel_f1():
    raise NameError("name 'gt_px' is not defined")  # the original's pixel F1 branch uses undefined names


def faprompt_suite(maps, masks, labels, image_scores) -> dict:
    """FAPrompt metrics.py: AnomalyCLIP's, plus an image F1 branch; its pixel F1 branch always raises."""
    out = anomalyclip_suite(maps, masks, labels, image_scores)
    out["image_f1max"] = f1_max_from_pr_curve(image_scores, labels)
    out["pixel_f1max"] = _faprompt_pixel_f1
    return out


def april_gan_suite(maps, masks, labels, image_scores) -> dict:
    """APRIL-GAN test() metric block (zero-shot mode): sklearn metrics and cal_pro_score."""
    return {**sklearn_suite(maps, masks, labels, image_scores),
            "pixel_aupro": lambda: aupro_cal_pro_score(maps, masks)}


def bayes_pfl_suite(maps, masks, labels, image_scores) -> dict:
    """Bayes-PFL calcuate_metric_pixel with its score fusion and smoothing off (alpha=1, sigma=0)."""
    px, gt = _pooled(maps, masks)
    scores = _minmax(np.asarray(image_scores), 1e-8)
    out = {"pixel_auroc": sklearn_auroc(px, gt), "pixel_ap": sklearn_ap(px, gt),
           "pixel_f1max": f1_max_from_pr_curve(px, gt, eps=1e-8), "pixel_aupro": 0.0}
    if np.all(np.asarray(labels) != 0):  # every image anomalous: image metrics set to 0
        return {"image_auroc": 0.0, "image_ap": 0.0, "image_f1max": 0.0, **out}
    return {"image_auroc": sklearn_auroc(scores, labels), "image_ap": sklearn_ap(scores, labels),
            "image_f1max": f1_max_from_pr_curve(scores, labels, eps=1e-6), **out}


def bayes_pfl_image_only_suite(maps, masks, labels, image_scores) -> dict:
    """Bayes-PFL calcuate_metric_image (classification-only datasets): exact F1, no guard."""
    scores = _minmax(np.asarray(image_scores), 1e-8)
    return {"image_auroc": sklearn_auroc(scores, labels), "image_ap": sklearn_ap(scores, labels),
            "image_f1max": f1_max_from_pr_curve(scores, labels)}


def aa_clip_metrics(maps, masks, labels, image_scores, medical: bool = False) -> dict:
    """AA-CLIP metrics_eval, in its percent scale: min-max normalized maps and scores, image score
    0.5 * max of the normalized map + 0.5 * normalized score (the map max alone for medical data),
    round(x, 4) * 100, and image metrics 0 when the labels have one class."""
    maps, scores, labels = np.asarray(maps), np.asarray(image_scores), np.asarray(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        if maps.max() != 1:
            maps = _minmax(maps)
        if scores.max() != 1:
            scores = _minmax(scores)
    if np.isnan(maps).any() or np.isnan(scores).any():
        raise ValueError("Input contains NaN. (AA-CLIP min-max normalizes constant scores to 0/0)")
    map_max = maps.reshape(len(maps), -1).max(axis=1)
    fused = map_max if medical else map_max * 0.5 + scores * 0.5
    px, gt = _pooled(maps, masks)
    one_class = labels.max() == labels.min()
    values = {"pixel_auroc": sklearn_auroc(px, gt), "pixel_ap": sklearn_ap(px, gt),
              "image_auroc": 0 if one_class else sklearn_auroc(fused, labels),
              "image_ap": 0 if one_class else sklearn_ap(fused, labels)}
    return {k: round(v, 4) * 100 for k, v in values.items()}


def aa_clip_suite(maps, masks, labels, image_scores) -> dict:
    """AA-CLIP as fractions. image_* measure the given image score alone (a second call with maps whose
    max is 1 makes the fusion a monotone map of it); image_*_fused_pipeline are the fused pipeline."""
    def pipeline(key, score_only=False):
        call_maps = np.ones_like(np.asarray(maps)) if score_only else maps
        return lambda: aa_clip_metrics(call_maps, masks, labels, image_scores)[key] / 100

    return {"image_auroc": pipeline("image_auroc", score_only=True), "image_ap": pipeline("image_ap", score_only=True),
            "pixel_auroc": pipeline("pixel_auroc"), "pixel_ap": pipeline("pixel_ap"),
            "image_auroc_fused_pipeline": pipeline("image_auroc"), "image_ap_fused_pipeline": pipeline("image_ap")}


def adaclip_metrics(maps, masks, labels, image_scores) -> dict:
    """AdaCLIP calculate_metric, in its percent scale: every metric of a level is 0 when that level's
    labels have one class (no anomalous pixel, or no normal image)."""
    px, gt = _pooled(maps, masks)
    labels = np.asarray(labels) != 0

    def level(scores, y):
        if y.all() or not y.any():
            return 0, 0, 0
        return (sklearn_auroc(scores, y) * 100, sklearn_ap(scores, y) * 100, f1_max_from_pr_curve(scores, y) * 100)

    out = dict(zip(("pixel_auroc", "pixel_ap", "pixel_f1max"), level(px, gt)))
    out.update(zip(("image_auroc", "image_ap", "image_f1max"), level(np.asarray(image_scores), labels)))
    return out


def adaclip_suite(maps, masks, labels, image_scores) -> dict:
    return {k: v / 100 for k, v in adaclip_metrics(maps, masks, labels, image_scores).items()}


def anomalib_suite(maps, masks, labels, image_scores, aupro=aupro_anomalib_head) -> dict:
    px, gt = _pooled(maps, masks)
    return {"image_auroc": auroc_anomalib(image_scores, labels), "image_ap": aupr_anomalib(image_scores, labels),
            "image_f1max": f1max_anomalib(image_scores, labels),
            "pixel_auroc": auroc_anomalib(px, gt), "pixel_ap": aupr_anomalib(px, gt),
            "pixel_f1max": f1max_anomalib(px, gt), "pixel_aupro": lambda: aupro(maps, masks)}


IMPLEMENTATIONS = {
    "sklearn": sklearn_suite,
    "mvtec_ad_eval": lambda maps, masks, labels, scores: {"pixel_aupro": aupro_mvtec_script(maps, masks)},
    "anomalyclip": anomalyclip_suite,
    "faprompt": faprompt_suite,
    "april_gan": april_gan_suite,
    "bayes_pfl": bayes_pfl_suite,
    "bayes_pfl_image_only": bayes_pfl_image_only_suite,
    "aa_clip": aa_clip_suite,
    "adaclip": adaclip_suite,
    "anomalib_head": anomalib_suite,
    "anomalib_v2.2.0": lambda maps, masks, labels, scores: anomalib_suite(maps, masks, labels, scores,
                                                                          aupro=aupro_anomalib_v220),
}


def run_implementation(name: str, maps, masks, labels, image_scores) -> dict:
    """{metric: value or {"error": "Type: message"}} for one implementation on one category; warnings
    the emulated code would print are silenced (they are the originals', not zsad's)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            suite = IMPLEMENTATIONS[name](maps, masks, labels, image_scores)
        except Exception as err:  # noqa: BLE001 - the original aborts the whole call here
            return {"error": f"{type(err).__name__}: {err}"}
        for metric, value in suite.items():
            try:
                out[metric] = float(value() if callable(value) else value)
            except Exception as err:  # noqa: BLE001 - recorded, as the goldens record the original's error
                out[metric] = {"error": f"{type(err).__name__}: {err}"}
    return out
