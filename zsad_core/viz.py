"""Pictures: heat-map overlays and image grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .preprocess import OPENAI_MEAN, OPENAI_STD


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] model input -> uint8 [H, W, 3] for display."""
    mean = torch.tensor(OPENAI_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_STD)[:, None, None]
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def heat_overlay(image: torch.Tensor, anomaly_map: torch.Tensor, vmin: float, vmax: float,
                 alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a colour-mapped anomaly map over the (denormalised) model input; one shared [vmin, vmax]
    keeps maps of one call comparable."""
    import matplotlib

    rgb = denormalize(image)
    m = anomaly_map.detach().cpu().float().numpy()
    if m.shape != rgb.shape[:2]:
        m = np.array(Image.fromarray(m).resize(rgb.shape[1::-1], Image.BILINEAR))
    scaled = np.clip((m - vmin) / (vmax - vmin), 0, 1) if vmax > vmin else np.zeros_like(m)
    heat = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.float32)
    return Image.fromarray((alpha * heat + (1 - alpha) * rgb).round().astype(np.uint8))


def map_grid(images: torch.Tensor, masks: torch.Tensor, columns: dict, row_titles=None, size: float = 2.0):
    """A figure: one row per image (input, ground truth, then one heat-map overlay per entry of
    `columns` {title: maps [N,S,S]}), each map column on its own colour scale."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 2 + len(columns), figsize=(size * (2 + len(columns)), size * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(denormalize(images[i]))
        axes[i, 1].imshow(masks[i].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        for j, (title, maps) in enumerate(columns.items(), start=2):
            axes[i, j].imshow(heat_overlay(images[i], maps[i], float(maps.min()), float(maps.max())))
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
        if row_titles:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=8)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("ground truth", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def patch_selection_grid(images: torch.Tensor, selections: dict, grid: int, heat: torch.Tensor | None = None,
                         row_titles=None, size: float = 2.0, color: str = "white"):
    """A figure: one row per image, one column per entry of `selections` {title: patch indices [N, M]}
    (row-major on the grid x grid patch grid), each patch outlined on the image, or on the heat-map
    overlay of `heat` [N, S, S] (one colour scale for the whole figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n, side = len(images), images.shape[-1]
    cell = side / grid
    lo, hi = (float(heat.min()), float(heat.max())) if heat is not None else (0.0, 1.0)
    fig, axes = plt.subplots(n, len(selections), figsize=(size * len(selections), size * n), squeeze=False)
    for i in range(n):
        shown = heat_overlay(images[i], heat[i], lo, hi) if heat is not None else denormalize(images[i])
        for j, (title, indices) in enumerate(selections.items()):
            ax = axes[i, j]
            ax.imshow(shown)
            for p in torch.as_tensor(indices[i]).flatten().tolist():
                row, col = divmod(int(p), grid)
                ax.add_patch(Rectangle((col * cell, row * cell), cell, cell, fill=False, edgecolor=color, lw=1.5))
            if i == 0:
                ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if row_titles:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def sweep_figure(sweeps: dict, ylabel: str = "%", size: float = 3.0):
    """A figure: one panel per hyper-parameter sweep {x-axis label: DataFrame (index: the swept values,
    columns: metrics)}, one line per metric."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(size * len(sweeps), size * 0.85), squeeze=False)
    for ax, (label, frame) in zip(axes[0], sweeps.items()):
        for metric in frame.columns:
            ax.plot(list(frame.index), frame[metric].to_numpy(dtype=float), marker="o", label=str(metric))
        ax.set_xticks(list(frame.index))
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return fig
