"""The deterministic tiny CLIP used by the `smoke` profile and every faithfulness test.

Random (untrained) weights with the *depth* of ViT-L/14@336 and a width of 128, so that every layer
index the papers use (feature layers 6/12/18/24, DPAM over the last blocks, text prompt depth 9)
stays valid while a forward pass is cheap on a CPU. The recipe (shared/goldens/clip_tiny/README.md)
is reproduced here byte for byte; `tests/test_tiny_clip.py` checks every tensor's sha256.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SEED = 20261128

TINY_CONFIG = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 336, "layers": 24, "width": 128, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 12},
}

_LAYERNORM_PARTS = ("ln_pre.", "ln_post.", "ln_1.", "ln_2.", "ln_final.")
_BIAS_SUFFIXES = ("in_proj_bias", "out_proj.bias", "c_fc.bias", "c_proj.bias")
_EMBEDDINGS = ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
               "visual.class_embedding")


def _std(name: str, shape: tuple[int, ...]) -> float | None:
    """Standard deviation of a key's normal draw; None for the constant tensors."""
    if name == "logit_scale" or any(part in name for part in _LAYERNORM_PARTS):
        return None
    if name.endswith(_BIAS_SUFFIXES) or name in _EMBEDDINGS:
        return 0.02
    if name in ("visual.proj", "text_projection"):
        return shape[0] ** -0.5  # [width, embed_dim]
    if name == "visual.conv1.weight":
        return float(np.prod(shape[1:])) ** -0.5
    return shape[1] ** -0.5  # 2-D [out, in] weight


def tiny_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Weights of the recipe for the given key -> shape table (open_clip key names)."""
    state = {}
    for i, name in enumerate(sorted(shapes)):
        shape = tuple(shapes[name])
        std = _std(name, shape)
        if name == "logit_scale":
            value = np.full(shape, math.log(1 / 0.07), dtype=np.float64)
        elif std is None:  # LayerNorm
            value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
        else:
            value = np.random.RandomState(SEED + i).standard_normal(shape) * std
        state[name] = torch.from_numpy(np.ascontiguousarray(value.astype(np.float32)))
    return state


def build_tiny_clip():
    """An open_clip `CLIP` (QuickGELU, native 336 px) holding the recipe's weights, in eval mode."""
    import open_clip

    model = open_clip.model.CLIP(**{k: v for k, v in TINY_CONFIG.items()})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(tiny_state_dict(shapes), strict=True)
    return model.eval()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's float32 little-endian C-order bytes (the recipe's checksum)."""
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()).hexdigest()
