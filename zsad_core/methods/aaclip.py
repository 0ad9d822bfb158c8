"""AA-CLIP: anomaly-aware CLIP by two-stage adaptation (Ma et al., CVPR 2025; github.com/Mwxinnn/AA-CLIP).

CLIP runs frozen with exact GELU (the official `create_model` drops QuickGELU), 518 px squashed inputs and
the bicubic antialiased positional embedding. Learnable parts, all bias-free Linear layers:

    residual adapter after text blocks 1..3 and vision blocks 1..6 (on the block output x):
        a = LeakyReLU_0.01(W x),   a <- a * ||x|| / ||a||,   x <- lam a + (1 - lam) x          lam = 0.1
    text feature      t(p) = LeakyReLU(W_t ln_final(x_EOT(p)))      (replaces CLIP's text_projection)
    anchors           T_s = norm(mean_{p in s} norm(t(p))),   T = [T_N, T_A]  in R^{E x 2}
    patch features    F_l = norm(P_l ln_post(z_l))   l in {6, 12, 18, 24}   (seg_proj, no activation)
    global feature    d = mean_patches norm(P_d ln_post(z_24))             (det_proj, not re-normalised)

Inference: s_l = 100 F_l T,  A_l = (s_l[A] + 1 - s_l[N]) / 2 on the patch grid, Gaussian blur (7x7, sigma 1),
bilinear (align_corners) to the image size, M = sum_l A_l; raw image score r = ((d T)[A] + 1) / 2.
`finalize` is the official per-class `metrics_eval`: M' = minmax(M) over all maps of the class (skipped
when max M == 1), r' = minmax(r), image score = 0.5 max M' + 0.5 r' (Industrial) or max M' (Medical).

Stage 1 ("text", trains the text adapter): DPAM "surgery" CLIP whose last 19 blocks (6..24) use the
attention out_proj(softmax(v v^T / sqrt(d_head)) v) (residual and MLP kept, a single path),
    f_l = norm(ln_post(z'_l) proj) + norm(g)        g = plain CLIP's global image embedding
    P_l = softmax_2(up_bilinear(100 f_l T)),   L_seg(P, m) = Focal(P, m) + Dice(P_N, 1 - m) + Dice(P_A, m)
    L_1 = L_seg(P_24) + 0.1 (mean_b <T_N, T_A>)^2
Stage 2 ("image", trains adapters, seg_proj, det_proj; T fixed from stage 1):
    L_2 = CE(d T, y) + sum_l L_seg(softmax_2(up_bilinear(100 F_l T)))

Official quirks reproduced by default (golden: shared/goldens/aaclip, README section 4):
* DPAM softmax over the *images of the batch* at each token (an LND tensor read as NLD), so stage-1
  features depend on the batch; with batch 1 the block is out_proj(v). `dpam_softmax="tokens"` fixes it.
* Stage 1 back-propagates only level 24 (`loss =` reassigned in the level loop); `stage1_levels="all"` sums.
* The disentangle loss squares the batch mean of <T_N, T_A> (paper: |<T_N, T_A>|^2 per class).
* The paper's adapter "Norm" is a rescale to the input token's norm; text_projection is discarded.
* Training uses softmax probabilities, inference (s_A + 1 - s_N) / 2 blurred at patch resolution.
* Image scores are normalised over the images of a class (a single image: the min-max part is 0
  instead of the official NaN); maps are returned raw (`normalize_maps=True`: metrics_eval's min-max).
* Loading a folder: `text_adapter.pth` (none: plain CLIP text with text_projection, as test.py) and the
  lexicographically last `image_adapter_*.pth` (image_adapter_10 sorts before image_adapter_2).
* The adapted vision tower computes attention explicitly, as the official nn.MultiheadAttention call
  (need_weights=True) does; `fused_attention=True` uses open_clip's faster kernel (other float32 rounding).
Options: `domain="medical"` (blur 9x9, sigma 1.5; image score = max pixel), `relu=True` (official --relu:
LeakyReLU after seg_proj/det_proj), adapter weights/depths, the disentangle weight and the feature levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import self_attention
from ..errors import CheckpointError, OptionError
from ..losses import dice_loss, focal_loss
from ..prompts import aaclip_prompts
from .base import Method, Prediction, register


class Projection(nn.Module):
    """Bias-free Linear, optionally + LeakyReLU(0.01); `fc` keeps the official key layout
    (SimpleAdapter / SimpleProj: `fc.0.weight` with the activation, `fc.weight` without)."""

    def __init__(self, c_in: int, c_out: int, activation: bool):
        super().__init__()
        linear = nn.Linear(c_in, c_out, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU(0.01)) if activation else linear

    def forward(self, x):
        return self.fc(x)


def residual_adapter(x: torch.Tensor, adapter: nn.Module, weight: float) -> torch.Tensor:
    """x <- w a + (1 - w) x with a = adapter(x) rescaled to the L2 norm of each input token."""
    a = adapter(x)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return weight * a + (1 - weight) * x


def official_attention(block, h: torch.Tensor) -> torch.Tensor:
    """A block's attention as the official code computes it (nn.MultiheadAttention with need_weights=True):
    explicit softmax(q k^T / sqrt(d)) v. open_clip asks for need_weights=False, which under autograd runs a
    fused kernel with other float32 rounding; in the golden's stage-2 step that rounding puts one token of
    adapter 3 on the other side of the LeakyReLU kink (a 4.7e-5 gradient error). Costs T x T memory per head."""
    return block.attn.out_proj(self_attention(block, h, "qk"))


def gaussian_blur2d(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma)) with its reflect border, on [B, C, H, W]:
    the normalised 1-D kernel exp(-t^2 / 2 sigma^2), t = -(k//2)..k//2, along the width, then the height."""
    t = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - kernel_size // 2
    kernel = torch.exp(-t.pow(2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c, r = x.shape[1], kernel_size // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """metrics_eval's normalisation: (x - min) / (max - min) unless max == 1 (0 where all values are equal)."""
    if x.max() == 1:
        return x
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


@dataclass
class VisualFeatures:
    """Adapted vision tower outputs: per level (in `levels` order) patch tokens [B, N, ...]."""

    residual: list  # residual stream after the level's block (adapters included), the input of ln_post
    seg_tokens: list  # norm(seg_proj(ln_post(.))) [B, N, E]
    det_feature: torch.Tensor  # [B, E]
    grid: int


BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}  # (kernel size, sigma) of test.py per domain


@register
class AACLIP(Method):
    name = "aaclip"
    activation = "gelu"
    image_convention = "squash"
    mask_convention = "nearest"
    default_image_size = 518

    @dataclass
    class Options:
        domain: Literal["industrial", "medical"] = "industrial"  # blur 7/1 and 0.5 max + 0.5 image; 9/1.5, max
        dpam_softmax: Literal["batch", "tokens"] = "batch"  # official quirk: softmax over the batch's images
        stage1_levels: Literal["last", "all"] = "last"  # official: only level 24 enters the stage-1 backward
        normalize_maps: bool = False  # True: anomaly maps min-max normalised over the class (metrics_eval)
        relu: bool = False  # official --relu: LeakyReLU after seg_proj and det_proj
        levels: tuple[int, ...] = (6, 12, 18, 24)
        text_adapt_weight: float = 0.1
        image_adapt_weight: float = 0.1
        text_adapt_until: int = 3
        image_adapt_until: int = 6
        dpam_blocks: int = 19  # official --surgery_until_layer 20: the last 19 blocks get V-V attention
        disentangle_weight: float = 0.1  # official --text_norm_weight
        fused_attention: bool = False  # True: open_clip's fused attention (less memory; other float32 rounding)

    stages = ("text", "image")
    recipe = {
        "text": {"trains": "text_adapter", "optimizer": "Adam", "lr": 1e-5, "betas": (0.5, 0.999), "eps": 1e-8,
                 "weight_decay": 0.0, "schedule": None, "epochs": 5, "batch_size": 16, "shuffle": True, "seed": 111,
                 "augmentation": "rotation 30 deg p.5, translate .15 p.5, h/v flips p.5 (image and mask)"},
        "image": {"trains": "image_adapter", "optimizer": "Adam", "lr": 5e-4, "betas": (0.5, 0.999), "eps": 1e-8,
                  "weight_decay": 0.0, "schedule": "MultiStepLR(milestones=[16000, 32000], gamma=0.5) per iteration",
                  "scheduler_interval": "step", "epochs": 20, "batch_size": 2, "shuffle": True, "seed": 111,
                  "augmentation": "stage-1 augmentation + ColorJitter brightness/contrast/saturation .5, each p .7"},
    }

    def __init__(self, backbone, options=None, image_size=None):
        super().__init__(backbone, options, image_size)
        o = self.options
        self.levels = tuple(int(i) for i in o.levels)
        depth = backbone.vision_layers
        if not self.levels or not all(1 <= i <= depth for i in self.levels):
            raise OptionError(f"option levels={o.levels}: choose blocks in 1..{depth} (official: 6,12,18,24)")
        if not (0 <= o.image_adapt_until <= depth and 0 <= o.text_adapt_until <= backbone.text_layers
                and 0 <= o.dpam_blocks <= depth):
            raise OptionError(f"options image_adapt_until / text_adapt_until / dpam_blocks exceed the backbone "
                              f"({depth} vision, {backbone.text_layers} text blocks)")
        vw, tw, e = backbone.vision_width, backbone.text_width, backbone.embed_dim
        self.image_adapter = nn.ModuleDict({
            "layer_adapters": nn.ModuleList([Projection(vw, vw, True) for _ in range(o.image_adapt_until)]),
            "seg_proj": nn.ModuleList([Projection(vw, e, o.relu) for _ in self.levels]),
            "det_proj": Projection(vw, e, o.relu),
        })
        self.text_adapter = nn.ModuleList([Projection(tw, tw, True) for _ in range(o.text_adapt_until)]
                                          + [Projection(tw, e, True)])
        for p in [*self.image_adapter.parameters(), *self.text_adapter.parameters()]:
            nn.init.xavier_uniform_(p)  # official init; the adapted model is not plain CLIP at init
        # False: anchors from plain CLIP (text_projection), as test.py without text_adapter.pth
        self.register_buffer("text_adapted", torch.tensor(True))
        self._anchor_cache: dict = {}

    def _ready(self):
        self.backbone.set_activation(self.run_activation)

    # ------------------------------------------------------------------ text
    def _text_block_hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i <= self.options.text_adapt_until:
            return residual_adapter(x, self.text_adapter[i - 1], self.options.text_adapt_weight)
        return x

    def text_eot_features(self, prompts, adapted: bool | None = None) -> torch.Tensor:
        """ln_final of the EOT token, [N, text width], with or without the text adapters.

        The padding after the last EOT is cut (as Backbone.encode_text): attention is causal and the
        adapters act per token, so the EOT rows are the same up to float rounding, ~5x faster."""
        self._ready()
        adapted = bool(self.text_adapted) if adapted is None else adapted
        bb = self.backbone
        ids = bb.tokenize(prompts)
        eot = ids.argmax(dim=-1)
        ids = ids[:, :int(eot.max()) + 1]
        return bb.encode_text_embeddings(bb.token_embeddings(ids), eot, projection=False,
                                         after_block=self._text_block_hook if adapted else None)

    def encode_prompts(self, prompts, adapted: bool | None = None) -> torch.Tensor:
        """Text features [N, E], not normalised: adapted (text_adapter[-1] projection) or plain CLIP."""
        adapted = bool(self.text_adapted) if adapted is None else adapted
        eot = self.text_eot_features(prompts, adapted)
        return self.text_adapter[-1](eot) if adapted else eot @ self.backbone.model.text_projection

    def prompt_embeddings(self, object_word: str, adapted: bool | None = None) -> tuple[list[str], torch.Tensor]:
        """(the 16 prompt strings, normal first, and their L2-normalised embeddings [16, E])."""
        normal, abnormal = aaclip_prompts(object_word)
        return normal + abnormal, F.normalize(self.encode_prompts(normal + abnormal, adapted), dim=-1)

    def _compute_anchors(self, object_word: str, adapted: bool) -> torch.Tensor:
        _, embeddings = self.prompt_embeddings(object_word, adapted)
        n_normal = len(aaclip_prompts(object_word)[0])
        columns = [F.normalize(e.mean(0), dim=-1) for e in (embeddings[:n_normal], embeddings[n_normal:])]
        return torch.stack(columns, dim=1)

    def text_anchors(self, object_word: str, adapted: bool | None = None, grad: bool = False) -> torch.Tensor:
        """T [E, 2] (column 0 normal, 1 abnormal). Without grad it is cached until the text adapter changes."""
        adapted = bool(self.text_adapted) if adapted is None else adapted
        if grad:
            return self._compute_anchors(object_word, adapted)
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's _version
        key = (object_word, adapted, self.backbone.activation,
               tuple((p.data_ptr(), p._version) for p in self.text_adapter.parameters()))
        if key not in self._anchor_cache:
            with torch.no_grad():
                anchors = self._compute_anchors(object_word, adapted)
            self._anchor_cache = {k: v for k, v in self._anchor_cache.items() if k[1:] == key[1:]}
            self._anchor_cache[key] = anchors
        return self._anchor_cache[key]

    def anchors_for(self, class_names, grad: bool = False) -> torch.Tensor:
        """Per-image anchors [B, E, 2] (each class computed once, in order of first appearance)."""
        table = {n: self.text_anchors(n, grad=grad) for n in dict.fromkeys(class_names)}
        return torch.stack([table[n] for n in class_names])

    # ------------------------------------------------------------------ vision
    def _image_block_hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i <= self.options.image_adapt_until:
            return residual_adapter(x, self.image_adapter["layer_adapters"][i - 1], self.options.image_adapt_weight)
        return x

    def encode_image(self, images: torch.Tensor) -> VisualFeatures:
        """The adapted vision tower: per-level seg tokens and the detection feature."""
        self._ready()
        bb = self.backbone
        explicit = None if self.options.fused_attention else dict.fromkeys(range(1, bb.vision_layers + 1),
                                                                            official_attention)
        out = bb.encode_image_layers(images, self.levels, interpolation="bicubic", after_block=self._image_block_hook,
                                     attention=explicit)
        residual = [out.tokens[i][:, 1:] for i in self.levels]
        normed = [bb.visual.ln_post(z) for z in residual]
        seg = [F.normalize(proj(z), dim=-1) for proj, z in zip(self.image_adapter["seg_proj"], normed)]
        det = F.normalize(self.image_adapter["det_proj"](normed[-1]), dim=-1).mean(dim=1)
        return VisualFeatures(residual, seg, det, out.grid)

    def patch_features(self, images: torch.Tensor, adapted: bool = True) -> list[torch.Tensor]:
        """Per-level unit patch features [B, N, E]: adapted seg tokens, or plain CLIP's norm(ln_post(z) proj)."""
        if adapted:
            return self.encode_image(images).seg_tokens
        self._ready()
        out = self.backbone.encode_image_layers(images, self.levels, ln_post=True, proj=True)
        return [F.normalize(out.tokens[i][:, 1:], dim=-1) for i in self.levels]

    # ------------------------------------------------------------------ embedding-space hooks
    def analysis_prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        return aaclip_prompts(class_name)

    @torch.no_grad()
    def analysis_text_embeddings(self, class_name: str, adapted: bool | None = None):
        """(normal [6, E], abnormal [10, E]) unit prompt embeddings: the adapted text space (anchors T are
        their normalised means) or, adapted=False, plain CLIP with text_projection."""
        _, embeddings = self.prompt_embeddings(class_name, adapted)
        n_normal = len(aaclip_prompts(class_name)[0])
        return embeddings[:n_normal], embeddings[n_normal:]

    @torch.no_grad()
    def analysis_patch_embeddings(self, images: torch.Tensor, adapted: bool = True, level: int | None = None):
        """Unit patch features [B, N, E] of one level (default the last, 24): the adapted seg tokens
        F_l, or (adapted=False) plain CLIP's norm(ln_post(z_l) proj)."""
        features = self.patch_features(images.to(self.backbone.device), adapted)
        return features[self.levels.index(level) if level is not None else -1]

    def _surgery_attention(self, block, h: torch.Tensor) -> torch.Tensor:
        if self.options.dpam_softmax == "batch":  # official: attention across the batch's images per token
            return block.attn.out_proj(self_attention(block, h.transpose(0, 1), "vv")).transpose(0, 1)
        return block.attn.out_proj(self_attention(block, h, "vv"))

    @torch.no_grad()
    def surgery_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Stage-1 features f_l [B, N, E], the surgery model's block outputs [B, 1+N, W] per level and
        plain CLIP's global embedding g [B, E] (before normalisation)."""
        self._ready()
        bb, depth = self.backbone, self.backbone.vision_layers
        vv = {i: self._surgery_attention for i in range(depth - self.options.dpam_blocks + 1, depth + 1)}
        out = bb.encode_image_layers(images, self.levels, interpolation="bicubic", attention=vv)
        g = bb.encode_image(images, interpolation="bicubic")
        taps = [out.tokens[i] for i in self.levels]
        unit_g = F.normalize(g, dim=-1)[:, None]
        return [F.normalize(bb.project_tokens(t[:, 1:]), dim=-1) + unit_g for t in taps], taps, g

    # ------------------------------------------------------------------ maps and scores
    @staticmethod
    def similarity_logits(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """100 f T on the patch grid: features [B, N, E], anchors [B, E, 2] -> [B, 2, g, g]."""
        s = 100.0 * (features @ anchors)
        b, n, _ = s.shape
        g = int(round(n ** 0.5))
        return s.permute(0, 2, 1).reshape(b, 2, g, g)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def score(self, features: VisualFeatures, anchors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw inference outputs (batch first) from the vision features and per-image anchors [B, E, 2]."""
        logits = torch.stack([self.similarity_logits(f, anchors) for f in features.seg_tokens], dim=1)
        level_maps = (logits[:, :, 1] + 1 - logits[:, :, 0]) / 2  # [B, L, g, g]
        b, n_levels, g, _ = level_maps.shape
        k, sigma = BLUR[self.options.domain]
        smoothed = gaussian_blur2d(level_maps.reshape(b * n_levels, 1, g, g), k, sigma).reshape(b, n_levels, g, g)
        fused = self.upsample(smoothed).sum(dim=1)
        raw_score = ((features.det_feature[:, None] @ anchors)[:, 0, 1] + 1) / 2
        return {"image_scores": raw_score, "anomaly_maps": fused, "level_maps": level_maps,
                "level_maps_smoothed": smoothed, "det_feature": features.det_feature}

    def forward(self, images, class_names):
        return self.score(self.encode_image(images), self.anchors_for(class_names))

    def finalize(self, raw):
        """metrics_eval over the images of one class: min-max the maps jointly and the raw image scores."""
        maps, image = minmax(raw["anomaly_maps"]), minmax(raw["image_scores"])
        max_pixel = maps.amax(dim=(1, 2))
        scores = max_pixel if self.options.domain == "medical" else max_pixel * 0.5 + image * 0.5
        extras = {k: v for k, v in raw.items() if k not in ("image_scores", "anomaly_maps")}
        extras["image_score_raw"] = raw["image_scores"]
        return Prediction(scores.float(), maps if self.options.normalize_maps else raw["anomaly_maps"], extras)

    # ------------------------------------------------------------------ training
    def segmentation_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax over (normal, abnormal) of the logits upsampled to the image size, [B, 2, S, S]."""
        return self.upsample(logits).softmax(dim=1)

    @staticmethod
    def seg_loss_terms(probs: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Focal(P, m), Dice(P_N, 1 - m), Dice(P_A, m)); the official seg loss is their sum."""
        return focal_loss(probs, masks), dice_loss(probs[:, 0], 1 - masks), dice_loss(probs[:, 1], masks)

    def _level_losses(self, features, anchors, masks, with_grad) -> dict:
        logits = self.similarity_logits(features, anchors)
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            probs = self.segmentation_probs(logits)
            terms = self.seg_loss_terms(probs, masks.to(probs.dtype))
        return {"logits": logits, "probs": probs, "terms": terms, "seg": terms[0] + terms[1] + terms[2]}

    def text_stage_outputs(self, batch: dict) -> dict:
        """Stage 1: anchors with grad, frozen surgery features, per-level seg losses and the disentangle loss."""
        anchors = self.anchors_for(batch["class_names"], grad=torch.is_grad_enabled())
        features, taps, clip_global = self.surgery_features(batch["images"])
        all_levels = self.options.stage1_levels == "all"
        levels = [self._level_losses(f, anchors, batch["masks"], all_levels or i == len(features) - 1)
                  for i, f in enumerate(features)]
        disentangle = (anchors[:, :, 0] * anchors[:, :, 1]).sum(dim=1).mean() ** 2
        seg = sum(lv["seg"] for lv in levels) if all_levels else levels[-1]["seg"]
        total = seg + self.options.disentangle_weight * disentangle
        return {"anchors": anchors, "features": features, "surgery_taps": taps, "clip_global": clip_global,
                "levels": levels,
                "seg": seg, "disentangle": disentangle, "total": total}

    def image_stage_outputs(self, batch: dict) -> dict:
        """Stage 2: fixed anchors, adapted features, CE on d T plus the seg loss of every level."""
        anchors = self.anchors_for(batch["class_names"])
        features = self.encode_image(batch["images"])
        cls_logits = (features.det_feature[:, None] @ anchors)[:, 0]
        ce = F.cross_entropy(cls_logits, batch["labels"])
        levels = [self._level_losses(f, anchors, batch["masks"], True) for f in features.seg_tokens]
        seg = sum(lv["seg"] for lv in levels)
        return {"anchors": anchors, "features": features, "cls_logits": cls_logits, "levels": levels,
                "ce": ce, "seg": seg, "total": ce + seg}

    def training_loss(self, batch, stage):
        if stage not in self.stages:
            raise OptionError(f"unknown stage {stage!r} for aaclip; stages: {', '.join(self.stages)}")
        out = self.text_stage_outputs(batch) if stage == "text" else self.image_stage_outputs(batch)
        terms = {"total": out["total"], "seg": out["seg"]}
        terms.update({"disentangle": out["disentangle"]} if stage == "text" else {"ce": out["ce"]})
        for level, lv in zip(self.levels, out["levels"]):
            for name, value in zip(("focal", "dice_normal", "dice_abnormal"), lv["terms"]):
                terms[f"level{level}_{name}"] = value
        return terms

    def trainable_parameters(self, stage=None):
        if stage == "text":
            return list(self.text_adapter.parameters())
        if stage == "image":
            return list(self.image_adapter.parameters())
        return [*self.text_adapter.parameters(), *self.image_adapter.parameters()]

    def make_optimizer(self, stage, steps_per_epoch=None, epochs=None):
        """Adam(betas 0.5, 0.999) per stage; stage 2 halves the lr at iterations 16000 and 32000."""
        r = self.recipe[stage]
        optimizer = torch.optim.Adam(self.trainable_parameters(stage), lr=r["lr"], betas=r["betas"], eps=r["eps"],
                                     weight_decay=r["weight_decay"])
        if stage == "text":
            return optimizer, None
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16000, 32000], gamma=0.5)

    # ------------------------------------------------------------------ official checkpoints
    def load_official(self, path: Path) -> None:
        """A folder as test.py reads it (text_adapter.pth + the lexicographically last image_adapter_*.pth;
        no text_adapter.pth: plain CLIP text), or one file (replaces only the part it holds)."""
        path = Path(path)
        if path.is_dir():
            images = sorted(str(p) for p in path.glob("image_adapter_*.pth"))
            if not images:
                raise CheckpointError(f"{path}: no image_adapter_*.pth in this folder; pass the folder the official "
                                      "AA-CLIP train.py wrote (text_adapter.pth + image_adapter_N.pth)")
            text = path / "text_adapter.pth"
            if text.is_file():
                self._load_official_file(text)
            else:
                self.text_adapted.fill_(False)
            self._load_official_file(Path(images[-1]))
        else:
            self._load_official_file(path)

    def _load_official_file(self, path: Path) -> None:
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - every unreadable file gets the same clear message
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err.__class__.__name__}); pass the "
                                  "official AA-CLIP text_adapter.pth / image_adapter_N.pth, their folder, or a zsad "
                                  ".safetensors checkpoint") from None
        parts = [k for k in ("text_adapter", "image_adapter") if isinstance(ckpt, dict) and k in ckpt]
        if not parts:
            found = ", ".join(map(str, list(ckpt)[:5])) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: not an official AA-CLIP checkpoint (expected key 'text_adapter' or "
                                  f"'image_adapter', found {found}); pass text_adapter.pth / image_adapter_N.pth "
                                  "or the folder holding them")
        for part in parts:
            module = getattr(self, part)
            state = ckpt[part]
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
            if got != expected:
                hint = ""
                if part == "image_adapter" and any(k.endswith("fc.0.weight") for k in got if "proj" in k):
                    hint = " It was trained with --relu: add --set relu=true."
                elif set(got) == set(expected):
                    hint = " The shapes belong to another backbone: pass the matching --backbone."
                raise CheckpointError(f"{path}: {part} does not fit this model (expected {len(expected)} tensors "
                                      f"like {next(iter(expected.items()))}, found {len(got)}).{hint}")
            with torch.no_grad():
                module.load_state_dict(state)
            if part == "text_adapter":
                self.text_adapted.fill_(True)

    def export_official(self, path, *, text_epoch: int = 0, image_epoch: int = 0, text_optimizer=None,
                        image_optimizer=None) -> None:
        """Write a folder in the official layout: text_adapter.pth {"epoch", "text_adapter", "text_optimizer"}
        (left out when the text is plain CLIP) and image_adapter.pth + image_adapter_{epoch}.pth {"epoch",
        "image_adapter", "image_optimizer"}. Optimizer states default to fresh official Adams."""
        path = Path(path)
        if path.suffix == ".pth":
            raise OptionError(f"{path}: AA-CLIP's official checkpoint is a folder; pass a folder name")
        path.mkdir(parents=True, exist_ok=True)
        target = path / f"image_adapter_{image_epoch}.pth"
        others = [p.name for p in path.glob("image_adapter_*.pth") if p != target]
        if others:
            raise OptionError(f"{path}: already holds {', '.join(sorted(others))}; the official loader would pick "
                              "the last one, so export into an empty folder")
        cpu = lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # noqa: E731
        if bool(self.text_adapted):
            opt = text_optimizer if text_optimizer is not None else self.make_optimizer("text")[0]
            torch.save({"epoch": text_epoch, "text_adapter": cpu(self.text_adapter),
                        "text_optimizer": opt.state_dict()}, path / "text_adapter.pth")
        opt = image_optimizer if image_optimizer is not None else self.make_optimizer("image")[0]
        record = {"epoch": image_epoch, "image_adapter": cpu(self.image_adapter), "image_optimizer": opt.state_dict()}
        torch.save(record, path / "image_adapter.pth")
        torch.save(record, target)
