"""Patch-level text similarity -> pixel anomaly maps, as the prompt-learning methods compute them.

    S_j = softmax_c(<f_j / |f_j|, t_c> / tau)          per token j, over the text classes c
    M   = bilinear_upsample(S[patches] on the grid)     [B, C, size, size], align_corners=False
    G_sigma(M)                                          scipy.ndimage.gaussian_filter semantics

`gaussian_filter` reproduces scipy.ndimage.gaussian_filter on float32 maps (mode 'reflect', i.e.
the edge sample is repeated, truncate 4.0, kernel radius int(4 sigma + 0.5)) in torch, batched and
on any device: like scipy it filters along H then W, accumulates in float64 and rounds to float32
after each axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def text_probabilities(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(<f/|f|, t> / temperature) over the text rows.

    features [B, N, E] (unnormalised tokens or [B, 1, E] global embeddings); text [B or 1, C, E],
    already L2-normalised. Returns [B, N, C]."""
    features = features / features.norm(dim=-1, keepdim=True)
    return (features @ text.transpose(-1, -2) / temperature).softmax(dim=-1)


def patch_map(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1+N, C] token similarities (class token first) -> [B, C, size, size] by bilinear upsampling
    of the sqrt(N) x sqrt(N) patch grid (row-major)."""
    patches = similarity[:, 1:]
    grid = int(round(patches.shape[1] ** 0.5))
    if grid * grid != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    patches = patches.reshape(patches.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    return F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian, float64, radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / float(sigma) ** 2 * x ** 2)
    return phi / phi.sum()


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a line padded by `radius` on both sides in scipy's 'reflect' mode (d c b a | a b c d)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx < n, idx, 2 * n - 1 - idx)


def _filter_last_axis(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    radius = (kernel.numel() - 1) // 2
    n = x.shape[-1]
    padded = x.index_select(-1, _reflect_index(n, radius, x.device))
    out = F.conv1d(padded.reshape(-1, 1, n + 2 * radius), kernel.to(x.device).view(1, 1, -1))
    return out.reshape(x.shape)


def gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) applied to each [H, W] map of a [..., H, W] tensor."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate)
    dtype = maps.dtype
    x = _filter_last_axis(maps.double().transpose(-1, -2), kernel).to(dtype)  # axis 0 (H) first
    x = _filter_last_axis(x.double().transpose(-1, -2), kernel).to(dtype)  # then axis 1 (W)
    return x
