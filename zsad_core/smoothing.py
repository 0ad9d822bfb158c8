"""Gaussian smoothing of anomaly maps, equal to `scipy.ndimage.gaussian_filter(maps, sigma, axes=(-2, -1))`.

scipy's defaults: kernel exp(-x^2 / 2 sigma^2) normalised, radius int(truncate * sigma + 0.5) with
truncate 4, mode 'reflect' (the edge pixel is repeated: d c b a | a b c d | d c b a), one 1-D pass
per axis (rows first) computed in float64 and stored in the input's dtype after each pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Source index of every position of a line of length n padded by `radius` (scipy 'reflect')."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_filter2d(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Smooth the last two dimensions of maps [..., H, W] like scipy's gaussian_filter."""
    if sigma <= 0:
        return maps
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    out = maps
    for dim in (-2, -1):
        lines = out.movedim(dim, -1)
        shape = lines.shape
        padded = lines.reshape(-1, 1, shape[-1]).double()[..., _reflect_index(shape[-1], radius, maps.device)]
        lines = F.conv1d(padded, kernel).reshape(shape).to(maps.dtype)
        out = lines.movedim(-1, dim)
    return out.contiguous()
