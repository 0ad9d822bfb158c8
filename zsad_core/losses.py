"""Losses shared by the trainable methods, written as the official codes compute them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on *probabilities* (AnomalyCLIP / APRIL-GAN / FAPrompt / AA-CLIP `FocalLoss()`).

    probs [B, C, H, W] (already softmaxed, no nonlinearity applied), target [B, H, W] class indices.
    The one-hot target is clamped to [smooth, 1 - smooth]; pt = sum_c onehot_c p_c + smooth;
    loss = mean over all B*H*W pixels of -(1 - pt)^gamma log(pt) (alpha = 1).
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    onehot = torch.zeros_like(p).scatter_(1, target.reshape(-1, 1).long(), 1.0)
    onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary Dice loss `1 - mean_b (2 sum p t + s) / (sum p + sum t + s)`, per image then averaged."""
    p, t = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1).to(pred.dtype)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def segmentation_loss_terms(probs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The local loss of AnomalyCLIP (and FAPrompt) on a [B, 2, H, W] probability map (channel 0
    normal, 1 anomalous) against a {0, 1} mask [B, H, W]: focal on both channels, Dice of the
    anomalous channel against the mask and of the normal channel against its complement."""
    mask = mask.to(probs.dtype)
    return {"focal": focal_loss(probs, mask), "dice_abnormal": dice_loss(probs[:, 1], mask),
            "dice_normal": dice_loss(probs[:, 0], 1 - mask)}


def focal_loss_fg_bg(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """Bayes-PFL's focal loss: probs [B, 2, H, W] (softmaxed), target [B, H, W] in {0, 1}.

    pt = probs of the target class; loss = -(1 - pt)^gamma log(pt + eps), averaged separately over
    the foreground and the background pixels of the whole batch (sum / (count + eps)), then added.
    """
    fg = (target > 0).to(probs.dtype)
    pt = torch.where(target > 0, probs[:, 1], probs[:, 0])
    loss = -(1 - pt) ** gamma * torch.log(pt + eps)
    return (loss * fg).sum() / (fg.sum() + eps) + (loss * (1 - fg)).sum() / ((1 - fg).sum() + eps)


def dice_loss_batch(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """One Dice over the whole batch (Bayes-PFL, foreground only): 1 - (2 sum p t + eps) / (sum p + sum t + eps)."""
    target = target.to(pred.dtype)
    return 1 - (2 * (pred * target).sum() + eps) / (pred.sum() + target.sum() + eps)


def orthogonality_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """mean_{b,i,j} cos(e_bi, e_bj)^2 (1 - [i == j]) over embeddings [B, L, C]; the zeroed diagonal
    still counts in the mean (Bayes-PFL's prompt-bank diversity term)."""
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    eye = torch.eye(cos.shape[-1], device=cos.device, dtype=cos.dtype)
    return (cos ** 2 * (1 - eye)).mean()


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0) -> torch.Tensor:
    """FAPrompt's `BinaryFocalLoss(logits=True)`: bce = BCE_with_logits(logits, target) per element,
    loss = mean(alpha (1 - e^-bce)^gamma bce). FAPrompt feeds it a probability (its image score)."""
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return (alpha * (1 - torch.exp(-bce)).pow(gamma) * bce).mean()


def pairwise_cosine_loss(features: torch.Tensor) -> torch.Tensor:
    """FAPrompt's orthogonal loss: sum over all pairs k < m of |cos(f_k, f_m)| of the rows of [K, E]
    (a plain sum, no averaging)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    k, m = torch.triu_indices(len(features), len(features), offset=1, device=features.device)
    return (unit[k] * unit[m]).sum(-1).abs().sum()
