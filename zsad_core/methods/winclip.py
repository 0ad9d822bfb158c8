"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero- and few-shot anomaly classification and
segmentation with windowed CLIP embeddings.

WinCLIP has no official code; the reference is anomalib's re-implementation (WinClipModel), which
produced the golden. With f the CLIP image tower and c the object word:

Text (compositional prompt ensemble, CPE). 7 normal / 4 anomalous state phrases x 21 templates:
    t_n = mean_i f_text(normal prompt i),   t_a = mean_i f_text(anomalous prompt i)
Zero-shot score of any embedding z:
    a(z) = softmax([cos(z, t_n), cos(z, t_a)] / 0.07)[anomalous]
Windows. For scale k (in patches; 2 and 3), every k x k window w at stride 1 (row-major by top-left
corner) is its own token sequence [cls, e_p for p in w], gathered from the *embedded* tokens e
(conv1 + class token + positional embedding, before ln_pre), then run through ln_pre, the whole
vision transformer, ln_post and proj: g(w). Batched as [B * n_windows, 1 + k^2, W].
Harmonic aggregation of window scores s_w onto patches:
    M_k(p) = n_p / sum_{w contains p} 1 / s_w        (n_p = number of windows containing p; inf -> 0)
Zero-shot (WinCLIP), with s = a(ln_post(cls) @ proj):
    M_0(p) = 3 / (1/s + 1/M_2(p) + 1/M_3(p)),  map = bilinear upsample of M_0,  score = s
Few-shot (WinCLIP+), with reference normal images R (k-shot):
    VAS(z; Z_R) = min_{z' in Z_R} (1 - cos(z, z')) / 2        (over all positions of all k images)
    V_1 = VAS of the patch tokens ln_post(x_p) (not projected) against all reference patch tokens,
    V_k = harmonic aggregation of the VAS of the scale-k windows against all reference windows,
    M_v = (V_1 + V_2 + V_3) / 3                                (arithmetic mean)
    map = bilinear upsample of (M_0 + M_v) / 2,  score = (s + max_p M_v(p)) / 2

anomalib behaviour reproduced by default:
* the prototypes average the raw, unnormalised prompt embeddings (`prompt_mean="raw"`);
* the template "a jpeg corrupted photo of the {}." is listed twice, so it weighs double
  (`templates="anomalib"`);
* the temperature is the fixed 0.07, not the model's logit scale; upsampling uses
  align_corners=False (APRIL-GAN's WinCLIP-style code uses True);
* zero-shot's image score is s alone (no pixel max);
* the window embeddings are computed per window as open_clip <= 2.24 did. anomalib on open_clip >= 2.26
  (batch-first) feeds the windows sequence-first, attention mixes windows and every window embedding
  collapses to one vector (anomalib issue #2571); that bug is not reproduced.
anomalib's Lightning wrapper loses the normalisation of the reference images; here references are
preprocessed exactly like the test images (as in the golden).

Options (zsad predict --set KEY=VALUE):
* `prompt_mean`: `raw` (anomalib) or `normalized` (CLIP's ensembling convention, also APRIL-GAN's:
  L2-normalise each prompt embedding before the mean).
* `templates`: `anomalib` (21, with the duplicate) or `unique` (the duplicate dropped: 20 templates,
  140 / 80 prompts).
* `scales` (default 2,3), `temperature` (default 0.07).
* `reference_images`: comma-separated normal images of the category for WinCLIP+; from Python,
  `set_references(tensor, class_name)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES, ensemble
from .base import Method, register


@dataclass
class WinclipEmbeddings:
    image: torch.Tensor  # [B, E] ln_post(cls) @ proj
    patches: torch.Tensor  # [B, N, W] ln_post of the patch tokens, not projected
    windows: dict[int, torch.Tensor]  # scale -> [B, n_windows, E]


def window_patch_index(grid: int, scale: int, device=None) -> torch.Tensor:
    """[n_windows, scale^2] patch indices of every scale x scale window at stride 1: windows
    row-major by top-left corner, patches row-major inside a window."""
    ids = torch.arange(grid * grid, device=device).reshape(grid, grid)
    return ids.unfold(0, scale, 1).unfold(1, scale, 1).reshape(-1, scale * scale)


def harmonic_aggregation(window_scores: torch.Tensor, index: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per patch: (number of windows containing it) / sum of 1/score over those windows. [B, n_patches]."""
    inverse = (1.0 / window_scores).repeat_interleave(index.shape[1], dim=1)  # aligned with index.flatten()
    total = window_scores.new_zeros(window_scores.shape[0], n_patches).index_add_(1, index.flatten(), inverse)
    count = torch.bincount(index.flatten(), minlength=n_patches).to(window_scores.dtype)
    return (count / total).nan_to_num(posinf=0.0)


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cos / T)[anomalous] of embeddings [B, M, E] against per-image prototypes text [B, 2, E]."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).transpose(-1, -2)
    return (cos / temperature).softmax(dim=-1)[..., 1]


def visual_association(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """min over all reference embeddings [R, D] of (1 - cos) / 2, for embeddings [B, M, D] -> [B, M]."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(references, dim=-1).T
    return (1 - cos).min(dim=-1).values / 2


@register
class WinCLIP(Method):
    name = "winclip"
    activation = "quick_gelu"
    image_convention = "tensor_squash"
    mask_convention = "tensor_nearest"

    @dataclass
    class Options:
        prompt_mean: Literal["raw", "normalized"] = "raw"
        templates: Literal["anomalib", "unique"] = "anomalib"
        scales: tuple[int, ...] = (2, 3)
        temperature: float = 0.07
        reference_images: tuple[str, ...] = ()

    def __init__(self, backbone, options=None, image_size: int | None = None):
        super().__init__(backbone, options, image_size)
        grid = backbone.grid_for(self.image_size)
        if not self.options.scales or not all(1 <= k <= grid for k in self.options.scales):
            raise OptionError(f"option scales={self.options.scales}: each window scale must be 1..{grid} "
                              f"patches (the grid at {self.image_size} px)")
        self._references: dict[str | None, torch.Tensor] = {}  # class name (None: any class) -> images
        self._reference_embeddings: dict[str | None, WinclipEmbeddings] = {}
        if self.options.reference_images:
            from ..preprocess import load_images

            self.set_references(load_images(self.options.reference_images, self.image_size,
                                                  self.image_convention))

    # ------------------------------------------------------------------ text
    def text_prototypes(self, object_word: str) -> torch.Tensor:
        """[2, E]: the mean prompt embedding of the normal (row 0) and anomalous (row 1) states."""
        templates = WINCLIP_TEMPLATES
        if self.options.templates == "unique":
            templates = list(dict.fromkeys(templates))
        rows = []
        for states in (WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES):
            features = self.backbone.encode_text(ensemble(states, templates, object_word))
            if self.options.prompt_mean == "normalized":
                features = F.normalize(features, dim=-1)
            rows.append(features.mean(dim=0))
        return torch.stack(rows)

    # ------------------------------------------------------------------ vision
    def encode(self, images: torch.Tensor) -> WinclipEmbeddings:
        """Image, patch and window embeddings of a batch [B, 3, S, S]."""
        bb, visual = self.backbone, self.backbone.visual
        tokens = bb.embed_image(images, ln_pre=False)  # [B, 1+N, W], what the windows are built from
        final = visual.ln_post(bb.run_vision_blocks(visual.ln_pre(tokens)))
        grid = int(round((tokens.shape[1] - 1) ** 0.5))
        windows = {k: self.window_embeddings(tokens, window_patch_index(grid, k, tokens.device))
                   for k in self.options.scales}
        return WinclipEmbeddings(image=final[:, 0] @ visual.proj, patches=final[:, 1:], windows=windows)

    def window_embeddings(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[B, n_windows, E]: each window [cls, its patches] through the vision tower as its own sequence."""
        bb, visual = self.backbone, self.backbone.visual
        cls = torch.zeros_like(index[:, :1])
        sequences = tokens[:, torch.cat([cls, index + 1], dim=1)]  # [B, n_windows, 1+k^2, W]
        b, n = sequences.shape[:2]
        out = bb.run_vision_blocks(visual.ln_pre(sequences.flatten(0, 1)))  # batch-first, one row per window
        return bb.project_tokens(out[:, 0], ln_post=True, proj=True).reshape(b, n, -1)

    # ------------------------------------------------------------------ few-shot references
    def set_references(self, images: torch.Tensor | None, class_name: str | None = None) -> None:
        """Normal reference images [k, 3, S, S] (preprocessed like the test images) of `class_name`
        (None: of any class without its own) for WinCLIP+; None removes them."""
        if images is None:
            self._references.pop(class_name, None)
        else:
            if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
                raise OptionError(f"reference images: expected a [k, 3, S, S] tensor, got {list(images.shape)}")
            self._references[class_name] = images.detach()
        self._reference_embeddings.pop(class_name, None)

    def reference_embeddings(self, class_name: str) -> WinclipEmbeddings:
        """Embeddings of the class's reference images (or of the any-class ones), computed once."""
        key = class_name if class_name in self._references else None
        if key not in self._reference_embeddings:
            with torch.no_grad():
                self._reference_embeddings[key] = self.encode(self._references[key].to(self.backbone.device))
        return self._reference_embeddings[key]

    # ------------------------------------------------------------------ scores
    def forward(self, images, class_names):
        out = self.detect(self.encode(images), class_names, images.shape[-1])
        return {k: out[k] for k in ("image_scores", "anomaly_maps", "patch_maps")}

    def detect(self, emb: WinclipEmbeddings, class_names: list[str], image_size: int) -> dict[str, torch.Tensor]:
        """All scores from the embeddings of a batch: zero-shot (`zs_*`), few-shot (`fs_*`, when the
        classes have reference images) and the final `image_scores`, `patch_maps`, `anomaly_maps`."""
        b, n_patches = emb.patches.shape[:2]
        grid = int(round(n_patches ** 0.5))
        index = {k: window_patch_index(grid, k, emb.image.device) for k in self.options.scales}
        names = sorted(set(class_names))
        prototypes = torch.stack([self.text_prototypes(n) for n in names]).to(emb.image)
        text = prototypes[[names.index(n) for n in class_names]]  # [B, 2, E]
        t = self.options.temperature

        out = {"zs_image_score": class_scores(emb.image[:, None], text, t)[:, 0]}
        maps = [out["zs_image_score"][:, None].expand(b, n_patches)]
        for k in self.options.scales:
            out[f"zs_window_scores_scale{k}"] = class_scores(emb.windows[k], text, t)
            maps.append(harmonic_aggregation(out[f"zs_window_scores_scale{k}"], index[k], n_patches))
            out[f"zs_scale_map_scale{k}"] = maps[-1].reshape(b, grid, grid)
        out["zs_patch_map"] = (len(maps) / (1 / torch.stack(maps)).sum(dim=0)).reshape(b, grid, grid)
        patch_map, score = out["zs_patch_map"], out["zs_image_score"]

        if self._references:  # WinCLIP+
            missing = [n for n in names if n not in self._references and None not in self._references]
            if missing:
                raise OptionError(f"no reference images for class {missing[0]!r}; pass them for every class of "
                                  "the batch (set_references) or none for zero-shot WinCLIP")
            references = {n: self.reference_embeddings(n) for n in names}
            out.update(self.few_shot(emb, class_names, references, index))
            patch_map = (patch_map + out["fs_visual_map"]) / 2
            score = (score + out["fs_visual_map"].amax(dim=(-2, -1))) / 2
        out["image_scores"], out["patch_maps"] = score, patch_map
        out["anomaly_maps"] = F.interpolate(patch_map[:, None], size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)[:, 0]
        return out

    def few_shot(self, emb: WinclipEmbeddings, class_names, references, index) -> dict[str, torch.Tensor]:
        """WinCLIP+ visual association maps, each class against its own reference embeddings."""
        b, n_patches = emb.patches.shape[:2]
        grid = int(round(n_patches ** 0.5))
        patch_vas = emb.patches.new_empty(b, n_patches)
        window_vas = {k: emb.windows[k].new_empty(emb.windows[k].shape[:2]) for k in self.options.scales}
        for name, ref in references.items():  # one pass per class, not per image
            rows = torch.tensor([n == name for n in class_names], device=emb.patches.device)
            patch_vas[rows] = visual_association(emb.patches[rows], ref.patches.flatten(0, 1))
            for k in self.options.scales:
                window_vas[k][rows] = visual_association(emb.windows[k][rows], ref.windows[k].flatten(0, 1))
        out = {"fs_patch_vas": patch_vas.reshape(b, grid, grid)}
        maps = [out["fs_patch_vas"]]
        for k in self.options.scales:
            out[f"fs_window_vas_scale{k}"] = window_vas[k]
            maps.append(harmonic_aggregation(window_vas[k], index[k], n_patches).reshape(b, grid, grid))
            out[f"fs_scale_map_scale{k}"] = maps[-1]
        out["fs_visual_map"] = torch.stack(maps).mean(dim=0)
        return out
