"""Plain CLIP zero-shot anomaly classification (the WinCLIP paper's CLIP-AC baseline).

    s(x) = softmax(tau * [cos(f(x), t_normal), cos(f(x), t_anomalous)])[anomalous]

f is CLIP's global image embedding ln_post(cls) @ proj and each prototype t is the mean of the
L2-normalised embeddings of its prompts, normalised again (the CLIP ensemble convention). tau is
the model's logit scale (1/0.07 for OpenAI CLIP). There is no official code, so the golden was made
with stock open_clip; preprocessing is open_clip's validation transform (shortest side, centre crop).
No pixel map.

Prompt sets: `naive` ("a photo of a normal {c}." / "a photo of a anomalous {c}.", the paper's
CLIP-AC, no article correction), `damaged` ("a photo of a {c}." / "a photo of a damaged {c}."),
`cpe` (WinCLIP's 147 / 84 compositional prompts, but normalise-then-average, unlike WinCLIP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..prompts import winclip_prompts
from .base import Method, register


def prompt_set(name: str, object_word: str) -> tuple[list[str], list[str]]:
    """(normal, anomalous) prompt strings of one of the baseline's prompt sets."""
    if name == "naive":
        return [f"a photo of a normal {object_word}."], [f"a photo of a anomalous {object_word}."]
    if name == "damaged":
        return [f"a photo of a {object_word}."], [f"a photo of a damaged {object_word}."]
    return winclip_prompts(object_word)


@register
class ClipZeroShot(Method):
    name = "clip_zeroshot"
    has_maps = False
    activation = "quick_gelu"
    image_convention = "clip_center"

    @dataclass
    class Options:
        prompts: Literal["naive", "damaged", "cpe"] = "naive"
        temperature: float | None = None  # None: the model's logit_scale (1/0.07 for OpenAI CLIP)

    def text_prototypes(self, object_word: str) -> torch.Tensor:
        """[2, E] normalised prototypes (row 0 normal, row 1 anomalous); prompt features are cached."""
        rows = [F.normalize(F.normalize(self.backbone.encode_text(p), dim=-1).mean(0), dim=-1)
                for p in prompt_set(self.options.prompts, object_word)]
        return torch.stack(rows)

    def logit_scale(self) -> torch.Tensor:
        if self.options.temperature is not None:
            return torch.tensor(1.0 / self.options.temperature)
        return self.backbone.model.logit_scale.exp()

    def forward(self, images, class_names):
        features = F.normalize(self.backbone.encode_image(images), dim=-1)
        names = sorted(set(class_names))
        prototypes = torch.stack([self.text_prototypes(n) for n in names])  # [C, 2, E]
        per_image = prototypes[[names.index(n) for n in class_names]]  # [B, 2, E]
        logits = self.logit_scale() * torch.einsum("be,bke->bk", features, per_image)
        return {"image_scores": logits.softmax(dim=-1)[:, 1], "logits": logits, "image_features": features}
