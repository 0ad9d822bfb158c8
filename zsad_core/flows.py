"""Planar normalizing flows on a diagonal-Gaussian base (Rezende & Mohamed, 2015), as Bayes-PFL uses them.

    z_0 = mu + eps * sqrt(var),                         eps ~ N(0, I)
    z_k = z_{k-1} + u_k tanh(w_k . z_{k-1} + b_k),       k = 1..K
    log|det J_k| = log(|1 + u_k . psi_k| + 1e-5),        psi_k = (1 - tanh^2(w_k . z_{k-1} + b_k)) w_k

No invertibility constraint is put on u (the official code has none). The KL term is the one of
Bayes-PFL's `binary_loss_function`: the standard-normal prior on z_K and the Gaussian q(z_0), both
without the 2*pi constant and with +1e-8.
"""
from __future__ import annotations

import torch


def sample_gaussian(mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Reparameterised sample z_0 = mu + eps * sqrt(var) (broadcasting)."""
    return mu + eps * var.sqrt()


def planar_flow(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """K planar steps on z [..., E] with u, w [..., K, E] and b [..., K] (broadcast against z).

    Returns (z_K [..., E], sum_k log|det J_k| [...]).
    """
    log_det = torch.zeros_like(z[..., 0])
    for k in range(u.shape[-2]):
        u_k, w_k, b_k = u[..., k, :], w[..., k, :], b[..., k:k + 1]
        h = torch.tanh((w_k * z).sum(-1, keepdim=True) + b_k)
        psi = w_k * (1 - h ** 2)  # the derivative is taken at z_{k-1}
        log_det = log_det + torch.log(torch.abs(1 + (psi * u_k).sum(-1)) + 1e-5)
        z = z + u_k * h
    return z, log_det


def flow_kl(z0, mu, var, zk, log_det, batch: int, broadcast: bool = True) -> torch.Tensor:
    """Monte-Carlo KL of one flow: [sum_rows(log q(z_0) - log p(z_K)) - sum log|det|] / batch.

    z0, mu, var, zk [n, E], log_det [n]; batch is the number of images. For an image-agnostic flow
    (n = 1) the official code compares its one sample against a prior of shape [batch, E], so the
    density terms count `batch` times and only the log-det is divided by the batch
    (`broadcast=True`); `broadcast=False` gives the single sample's own KL, independent of the batch.
    """
    log_q = (-0.5 * (var.log() + (z0 - mu) ** 2 / var)).sum(-1) + 1e-8
    log_p = (-0.5 * zk ** 2).sum(-1) + 1e-8
    if not broadcast:
        batch = z0.shape[0]
    density = (log_q - log_p).expand(batch) if z0.shape[0] == 1 else log_q - log_p
    return (density.sum() - log_det.sum()) / batch
