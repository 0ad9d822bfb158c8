"""Embedding-space analyses, for every method: how far apart normal and abnormal *text* lies, and how
normal and abnormal *patches* sit in the space the anomaly maps are computed in.

A method exposes its spaces through two hooks of `zsad_core.methods.base.Method`:
`analysis_text_embeddings(class_name) -> (normal [n, E], abnormal [m, E])` and
`analysis_patch_embeddings(images) -> [B, N, E]` (unit vectors; the defaults are plain CLIP's, methods
that adapt a space override them, e.g. AA-CLIP's adapted text encoder and seg tokens).

    spaces = {"CLIP": clip_method.analysis_text_embeddings, "AA-CLIP": aaclip.analysis_text_embeddings}
    text_similarity_table(spaces, ["brick", "wood"])          # cos(T_N, T_A) ... per class and space
    texts = {k: text_points(fn, ["brick", "wood"]) for k, fn in spaces.items()}
    patches = patch_points(aaclip.analysis_patch_embeddings(images), masks)   # mask pooled to the grid
    fig, coords = projection_figure({"text": texts["AA-CLIP"], "patches": patches})   # UMAP + t-SNE

Projections are seeded and single-threaded, so the same input gives the same picture.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

NORMAL_COLOUR, ABNORMAL_COLOUR = "#1f77b4", "#d62728"
MARKERS = "o^sDvP*Xph<>"


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------- text
def prototypes(normal, abnormal) -> tuple[np.ndarray, np.ndarray]:
    """The class prototypes (anchors) of a prompt ensemble: norm(mean_p norm(t_p)) for each side."""
    return tuple(_unit(_unit(_numpy(x)).mean(axis=0)) for x in (normal, abnormal))


def text_similarity(normal, abnormal) -> dict[str, float]:
    """Cosine statistics of normal [n, E] vs abnormal [m, E] text embeddings (any scale; normalised here).

    anchor_cos: cos(T_N, T_A) of the ensemble prototypes (the number AA-CLIP's disentangle loss drives to
    0; CLIP's anomaly-unawareness is this being close to 1); cross_mean / cross_max: over all n x m
    normal-abnormal prompt pairs; within_normal / within_abnormal: mean over distinct pairs of one side;
    gap: mean within-side similarity minus cross_mean (> 0: the two sides form separate clusters).
    """
    n, a = _unit(_numpy(normal)), _unit(_numpy(abnormal))
    t_n, t_a = prototypes(n, a)
    cross = n @ a.T

    def within(x):
        s = x @ x.T
        off = ~np.eye(len(x), dtype=bool)
        return float(s[off].mean()) if off.any() else float("nan")

    w_n, w_a = within(n), within(a)
    sides = [w for w in (w_n, w_a) if not np.isnan(w)]
    return {"anchor_cos": float(t_n @ t_a), "cross_mean": float(cross.mean()), "cross_max": float(cross.max()),
            "within_normal": w_n, "within_abnormal": w_a,
            "gap": float(np.mean(sides) - cross.mean()) if sides else float("nan")}


def text_similarity_table(spaces: dict, class_names, stats=("anchor_cos", "cross_mean", "gap"), digits: int = 3):
    """{space label: fn(class_name) -> (normal, abnormal)} -> DataFrame, one row per class (plus their
    mean), columns (statistic, space)."""
    import pandas as pd

    rows = {}
    for c in class_names:
        row = {}
        for label, fn in spaces.items():
            with torch.no_grad():
                values = text_similarity(*fn(c))
            row.update({(s, label): values[s] for s in stats})
        rows[c] = row
    table = pd.DataFrame(rows).T
    table.loc["mean"] = table.mean()
    table = table[[(s, label) for s in stats for label in spaces]]  # each statistic's spaces side by side
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table.round(digits)


# ---------------------------------------------------------------------------------------- point sets
@dataclass
class Points:
    """Vectors of one embedding space with their normal/abnormal flag and a group (class) name each."""

    vectors: np.ndarray  # [M, E], unit rows
    abnormal: np.ndarray  # [M] bool
    groups: list = field(default_factory=list)  # [M] str
    extras: dict = field(default_factory=dict)  # e.g. mask coverage per patch, image index

    def __len__(self) -> int:
        return len(self.vectors)


def text_points(fn, class_names) -> Points:
    """Per-prompt text embeddings of several classes, fn(class_name) -> (normal, abnormal)."""
    vectors, abnormal, groups = [], [], []
    for c in class_names:
        with torch.no_grad():
            n, a = fn(c)
        vectors += [_numpy(n), _numpy(a)]
        abnormal += [False] * len(n) + [True] * len(a)
        groups += [c] * (len(n) + len(a))
    return Points(_unit(np.concatenate(vectors)), np.array(abnormal), groups)


def patch_labels(masks, grid: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Masks [B, S, S] -> (coverage [B, grid*grid], abnormal [B, grid*grid]) in row-major patch order
    (the token order of a ViT): coverage is the mask's area fraction inside each patch (area pooling),
    a patch is abnormal when coverage >= threshold."""
    m = torch.as_tensor(masks).float()
    if m.dim() == 2:
        m = m[None]
    coverage = F.adaptive_avg_pool2d(m[:, None], grid)[:, 0].flatten(1).numpy()
    return coverage, coverage >= threshold


def patch_points(features, masks, threshold: float = 0.5, groups=None, drop_partial: bool = True) -> Points:
    """Patch embeddings [B, N, E] (N = grid^2, row-major) paired with their masks [B, S, S]: one point per
    patch, abnormal when the pooled mask covers >= threshold of it, normal when it covers none of it;
    patches covered partly (0 < coverage < threshold) are left out (drop_partial=False: counted normal).
    groups: one name per image. extras: coverage and image index of every kept patch."""
    f = _numpy(features)
    b, n, _ = f.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    coverage, abnormal = patch_labels(masks, grid, threshold)
    if len(coverage) != b:
        raise ValueError(f"{b} feature maps but {len(coverage)} masks")
    coverage, abnormal = coverage.reshape(-1), abnormal.reshape(-1)
    keep = abnormal | (coverage == 0) if drop_partial else np.ones_like(abnormal)
    names = np.array([g for g in (groups or ["image"] * b) for _ in range(n)], dtype=object)
    return Points(_unit(f.reshape(b * n, -1))[keep], abnormal[keep], list(names[keep]),
                  {"coverage": coverage[keep], "image": np.repeat(np.arange(b), n)[keep]})


def patch_separation(points: Points, text=None) -> dict[str, float]:
    """How well a space separates abnormal from normal patches.

    anchor_auroc: AUROC of cos(f, T_A) - cos(f, T_N), with the prototypes of text embeddings of the same
    space: `text` = (normal, abnormal), or fn(group) -> (normal, abnormal) for each point's own class
    (the zero-shot patch score, before any blur or upsampling);
    silhouette: the cosine silhouette of the normal/abnormal labelling (text-free; -1..1);
    centroid_cos: cosine between the mean normal and the mean abnormal patch.
    """
    from sklearn.metrics import silhouette_score

    from .metrics import auroc

    x, y = points.vectors, points.abnormal.astype(int)
    out = {"patches": int(len(y)), "abnormal": int(y.sum())}
    two_classes = 0 < y.sum() < len(y)
    if text is not None:
        groups = np.array(points.groups if points.groups else ["-"] * len(y), dtype=object)
        score = np.empty(len(y))
        for g in dict.fromkeys(groups):
            with torch.no_grad():
                t_n, t_a = prototypes(*(text(g) if callable(text) else text))
            sel = groups == g
            score[sel] = x[sel] @ t_a - x[sel] @ t_n
        out["anchor_auroc"] = float(auroc(score, y)) if two_classes else float("nan")
    out["silhouette"] = float(silhouette_score(x, y, metric="cosine")) if two_classes else float("nan")
    if two_classes:
        c_n, c_a = _unit(x[y == 0].mean(0)), _unit(x[y == 1].mean(0))
        out["centroid_cos"] = float(c_n @ c_a)
    else:
        out["centroid_cos"] = float("nan")
    return out


# ---------------------------------------------------------------------------------------- projections
PROJECTIONS = ("umap", "tsne")


def project(vectors, method: str = "umap", seed: int = 0, **kwargs) -> np.ndarray:
    """2-D projection of unit vectors [M, E] (Euclidean on the unit sphere = cosine geometry), seeded and
    single-threaded (deterministic). UMAP: n_neighbors min(15, M-1), min_dist 0.1, exact neighbours;
    t-SNE: PCA init, perplexity min(30, (M-1)/3). kwargs override the estimator's arguments."""
    from threadpoolctl import threadpool_limits

    x = _unit(_numpy(vectors)).astype(np.float32)
    m = len(x)
    if m < 4:
        raise ValueError(f"{m} points: a 2-D projection needs at least 4")
    with threadpool_limits(limits=1):
        if method == "umap":
            import warnings

            import umap

            from sklearn.neighbors import NearestNeighbors

            args = {"n_neighbors": min(15, m - 1), "min_dist": 0.1, "random_state": seed, "n_jobs": 1, **kwargs}
            if "precomputed_knn" not in args:
                # exact neighbours (what UMAP computes itself below 4096 points), handed over: it then skips
                # compiling its own search, which halves the one-off numba compilation (~12 s instead of ~25 s)
                dist, index = NearestNeighbors(n_neighbors=args["n_neighbors"]).fit(x).kneighbors(x)
                args["precomputed_knn"] = (index, dist.astype(np.float32), None)
            with warnings.catch_warnings():  # "n_jobs overridden by random_state", spectral-init fallbacks
                warnings.simplefilter("ignore")
                xy = umap.UMAP(**args).fit_transform(x)
        elif method == "tsne":
            from sklearn.manifold import TSNE

            args = {"perplexity": min(30.0, (m - 1) / 3), "init": "pca", "random_state": seed, **kwargs}
            xy = TSNE(**args).fit_transform(x)
        else:
            raise ValueError(f"unknown projection {method!r}; use one of {PROJECTIONS}")
    return np.asarray(xy, dtype=np.float64)


def pca_2d(x) -> np.ndarray:
    """Principal-component projection [N, D] -> [N, 2] of the raw vectors (no unit normalisation) (centred; each axis' sign chosen so that its
    largest-magnitude coordinate is positive, so reruns draw the same picture)."""
    x = torch.as_tensor(x).detach().float().cpu()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    y = x @ vh[:2].T
    if y.shape[1] < 2:
        y = torch.cat([y, torch.zeros(len(y), 2 - y.shape[1])], dim=1)
    signs = torch.sign(y.gather(0, y.abs().argmax(0, keepdim=True)))
    return (y * torch.where(signs == 0, torch.ones_like(signs), signs)).numpy()


def projection_figure(spaces: dict, methods=PROJECTIONS, seed: int = 0, size: float = 3.0, marker_by_group=True,
                      point_size: float = 14.0, title: str | None = None):
    """One row per space ({label: Points}), one column per projection; normal points blue, abnormal red,
    one marker per group (class). Returns (figure, {(label, method): coordinates [M, 2]})."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = list(spaces.items())
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(size * len(methods), size * len(rows)),
                             squeeze=False)
    coords = {}
    for i, (label, pts) in enumerate(rows):
        group_names = list(dict.fromkeys(pts.groups)) if marker_by_group and pts.groups else []
        for j, method in enumerate(methods):
            ax = axes[i, j]
            xy = coords[(label, method)] = project(pts.vectors, method, seed)
            for abnormal, colour in ((False, NORMAL_COLOUR), (True, ABNORMAL_COLOUR)):
                side = pts.abnormal == abnormal
                if group_names:
                    for k, g in enumerate(group_names):
                        sel = side & (np.array(pts.groups) == g)
                        ax.scatter(xy[sel, 0], xy[sel, 1], s=point_size, c=colour, marker=MARKERS[k % len(MARKERS)],
                                   alpha=0.75, linewidths=0)
                else:
                    ax.scatter(xy[side, 0], xy[side, 1], s=point_size, c=colour, alpha=0.6, linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title({"umap": "UMAP", "tsne": "t-SNE"}.get(method, method), fontsize=10)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
        if group_names and len(group_names) > 1:
            handles = [Line2D([], [], ls="", marker=MARKERS[k % len(MARKERS)], color="gray", label=g)
                       for k, g in enumerate(group_names)]
            axes[i, -1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                               frameon=False)
    colour_handles = [Line2D([], [], ls="", marker="o", color=NORMAL_COLOUR, label="normal"),
                      Line2D([], [], ls="", marker="o", color=ABNORMAL_COLOUR, label="abnormal")]
    fig.legend(handles=colour_handles, loc="upper center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig, coords


def similarity_figure(spaces: dict, size: float = 2.6, vmin: float | None = None, vmax: float = 1.0):
    """Heat maps of the prompt-prompt cosine matrix, normal prompts first, for each space
    {label: (normal, abnormal)} (one class): a flat matrix means the space cannot tell normal from
    abnormal. One colour scale for all panels (vmin: the smallest value shown)."""
    import matplotlib.pyplot as plt

    mats = {}
    for label, (n, a) in spaces.items():
        x = _unit(np.concatenate([_numpy(n), _numpy(a)]))
        mats[label] = (x @ x.T, len(n))
    lo = min(m.min() for m, _ in mats.values()) if vmin is None else vmin
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats) + 0.8, size), squeeze=False)
    for ax, (label, (m, n_normal)) in zip(axes[0], mats.items()):
        image = ax.imshow(m, vmin=lo, vmax=vmax, cmap="viridis")
        ax.axhline(n_normal - 0.5, color="w", lw=1)
        ax.axvline(n_normal - 0.5, color="w", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([n_normal / 2 - 0.5, n_normal + (len(m) - n_normal) / 2 - 0.5], ["normal", "abnormal"],
                     fontsize=7)
        ax.set_yticks([n_normal / 2 - 0.5, n_normal + (len(m) - n_normal) / 2 - 0.5], ["normal", "abnormal"],
                      fontsize=7, rotation=90, va="center")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine")
    return fig
