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
