"""Bayes-PFL: Bayesian prompt flow learning (Qu et al., CVPR 2025), as the official code runs it.

Prompts. A bank of B (=3) learnable prompts, each P (=5) context vectors c and Q (=5) state vectors
s (one state set per class: normal, abnormal), replaces the word "X" of "X <class name>":

    [SOT, c_1+z_c .. c_P+z_c, s_1+z_s .. s_Q+z_s, <class name>, EOT]  -> CLIP text tower
    t = L2(ln_final(x)[EOT + P+Q-1] @ text_projection)

The offsets z are samples of prompt flows: a Gaussian base and K (=10) planar steps (zsad_core.flows)

    image-specific (ISD), context words:  (mu, var) = Enc_c(g),  u, w, b = Linear(g),  z_c = f_K..f_1(z_0)
    image-agnostic (IAD), state words:    (mu, var) = Enc_s(x_n), free u, w, b          (and x_a for abnormal)
    z_0 = mu + eps sqrt(var),  f_k(z) = z + u_k tanh(w_k.z + b_k)

with g = ln_post(cls) @ proj (CLIP's global embedding, not normalised) and x_n, x_a learned inputs of
the state encoder Enc_s, which both state flows share.

Heads, for the layers l = 6, 12, 18, 24 (raw residual stream, class token dropped, no ln_post):

    image logits  pro = exp(T_img) <L2(class_mapping(t)), L2(v)>,  v = g (stage 1)
                                                                  or image_mapping(g + fuse(x_6..x_24)) (stage 2)
    RCA           F_l = L2(W_l x_l),  t'_l = L2(t + MHA_4 heads(q = Conv1x1(t), k = v = F_l; scale Wt^-0.5))
    patch logits  exp(T_pix) F_l t'_l^T,  bilinear (align_corners=True) to S x S

Test, R Monte-Carlo rounds (all B.R prompt pairs of all images of a batch go through the text tower at
once): text score = mean_i softmax(pro_normal_i, pro_abnormal_i)[abnormal]; map = mean over the
4 layers and B.R pairs of the abnormal softmax after up-sampling ("image ensemble"). Per class
(`finalize`): map smoothed by a Gaussian (sigma 8, scipy reflect); score = 0.5 minmax(text score) +
0.5 minmax(mean of the top-2000 pixels of the UNSMOOTHED map; 20 for small-object classes), the
min-max over the class's test images, float32, +1e-8.

Training, one bank index p per batch: stage 1 = CE(pro_p pair) + sum_l [focal + dice](softmax of the
up-sampled pair p) + 0.01 (KL_c + KL_n + KL_a) + orthogonality of the B embeddings per class; stage 2
(after the stage-1 plateau) = CE only, with the stage-2 image head, training class_mapping,
image_mapping and fuse.

Official quirks reproduced by default:
* CLIP runs with exact GELU (not the QuickGELU it was trained with); bicubic antialiased pos-embed.
* The encoders return "var" = exp(h/2), so samples have std exp(h/4) (consistent with log q).
* Image-agnostic samples are drawn at the first test image and cached for every later image
  (option state_cache=False: each image its own).
* RCA scales by the full text width, its query is the un-mapped text embedding.
* State-flow KL: one sample against a prior of batch size, so its density terms count once per image
  and only its log-det is divided by the batch (option state_kl_broadcast=False: the sample's own KL).
* Focal = foreground mean + background mean over the batch; Dice over the whole batch, foreground only.
* The first optimiser step has lr 0 (transformers' cosine schedule with linear warm-up from 0).
* Decoders, p_mu and the reconstruction term exist and are computed but never trained or used.
* The image score is min-max normalised over the class's test images (option
  image_score=unnormalized: 0.5 text score + 0.5 top-k mean, meaningful for a single image).
* Image head stage from the checkpoint file name `epoch_post_<epoch>_<stage>.pth`, else 2
  (option stage=1|2 forces one).
The paper's image score ("text score + map maximum") is not offered: its exact form was not available
offline; the official per-class formula above produced the published numbers.

Named options for the paper's ablations (none exists in the official code):
* ensemble=text: average the B.R unit embeddings per class, normalise, align once (paper's text ensemble).
* context_dist / state_dist = isd | iad | none: which distribution the context / state words sample
  (official: context isd, state iad). isd = the image-specific flow's sample; iad = the class's
  image-agnostic flow sample (normal or abnormal); none = no offset, the learned prompt bank alone.
  Training adds the KL of the flows that are used.
Training switches: bf16 (autocast) and checkpointing (text blocks and the full-resolution losses are
recomputed in backward); the maps of a training step are only up-sampled for the selected pair.

Randomness: without injected draws a torch Generator seeded with `seed` draws, per image, the R
context eps, then R normal, then R abnormal eps (the official order); training draws eps_context
[B,E], eps_normal [1,E], eps_abnormal [1,E], then the bank index. `set_draws` / `zsad predict
--draws` replays recorded draws (README of the golden: "Injecting the randomness").
Module attribute names follow the official checkpoint keys (`Context_Prompting`), without its aliases.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, OptionError
from ..flows import flow_kl, planar_flow, sample_gaussian
from ..losses import dice_loss_batch, focal_loss_fg_bg, orthogonality_loss
from ..prompts import bayespfl_sentence
from ..maps import gaussian_filter
from .base import Method, Prediction, read_official_checkpoint, register

SMALL_OBJECT_CLASSES = {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"}
FLOWS = ("PFL_context", "PFL_normal", "PFL_abnormal")
# The official flow modules hold the shared encoders/decoders, so its checkpoint repeats them.
ALIASES = {"PFL_context.encoder.": "context_encoder.", "PFL_context.decoder.": "context_decoder.",
           "PFL_normal.encoder.": "state_encoder.", "PFL_normal.decoder.": "state_decoder.",
           "PFL_abnormal.encoder.": "state_encoder.", "PFL_abnormal.decoder.": "state_decoder."}


# ----------------------------------------------------------------------------------------- modules
class MLP(nn.Module):
    """Linear, Softplus, Linear, Softplus, Linear (keys `module.{0,2,4}`)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(dim_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                                    nn.Softplus(), nn.Linear(hidden, dim_out))

    def forward(self, x):
        return self.module(x)


class GaussianEncoder(nn.Module):
    """x -> (mu, var) of a flow's base Gaussian; var = exp(h/2) of the second MLP's output h (official)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = MLP(dim, hidden, dim)
        self.weight_log_variance = MLP(dim, hidden, dim)

    def forward(self, x):
        return self.weight_mean(x), torch.exp(0.5 * self.weight_log_variance(x))


class Decoder(nn.Module):
    """The abandoned reconstruction branch: never trained or used, kept for the checkpoint."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = MLP(dim, hidden, dim)

    def forward(self, z):
        return self.weight_mean(z)


class ImageSpecificFlow(nn.Module):
    """Planar-flow parameters amortised from the image: u, w = Linear(g) [K, E], b = Linear(g) [K]."""

    def __init__(self, dim: int, num_flows: int):
        super().__init__()
        self.num_flows = num_flows
        self.p_mu = nn.Sequential(nn.Linear(dim, dim))  # head of the unused decoder
        self.amor_u = nn.Linear(dim, num_flows * dim)
        self.amor_w = nn.Linear(dim, num_flows * dim)
        self.amor_b = nn.Linear(dim, num_flows)

    def forward(self, g):
        n = g.shape[0]
        return self.amor_u(g).view(n, self.num_flows, -1), self.amor_w(g).view(n, self.num_flows, -1), self.amor_b(g)


class ImageAgnosticFlow(nn.Module):
    """Free planar-flow parameters (official shapes) and the learned input `state` of the state encoder."""

    def __init__(self, dim: int, num_flows: int):
        super().__init__()
        self.amor_u = nn.Parameter(torch.randn(1, num_flows, dim, 1))
        self.amor_w = nn.Parameter(torch.randn(1, num_flows, 1, dim))
        self.amor_b = nn.Parameter(torch.randn(1, num_flows, 1, 1))
        self.state = nn.Parameter(torch.randn(1, dim))
        self.p_mu = nn.Sequential(nn.Linear(dim, dim))  # head of the unused decoder

    def forward(self):
        """u, w [K, E] and b [K]."""
        return self.amor_u[0, :, :, 0], self.amor_w[0, :, 0], self.amor_b[0, :, 0, 0]


class LayerFusion(nn.Module):
    """Stage-2 image feature from the patch tokens of all layers: attention pooling of a linear fusion."""

    def __init__(self, vision_width: int, num_layers: int, text_width: int):
        super().__init__()
        self.fuse_modules = nn.Linear(vision_width * num_layers, vision_width // 2)
        self.compress = nn.Linear(vision_width // 2, 1)
        self.post_process = nn.Linear(vision_width // 2, text_width)

    def forward(self, patches):
        x = self.fuse_modules(torch.cat(patches, dim=-1))
        weights = self.compress(x).softmax(dim=1)  # over tokens
        return self.post_process((weights * x).sum(dim=1))


class RCA(nn.Module):
    """Residual cross-modal attention: text embeddings attend to one layer's projected patch features."""

    def __init__(self, vision_width: int, text_width: int, num_layers: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q_proj_pre = nn.Conv1d(text_width, text_width, kernel_size=1)
        self.linear_proj = nn.ModuleList(nn.Linear(vision_width, text_width, bias=False) for _ in range(num_layers))

    def forward(self, text, tokens, layer: int):
        """text [B, M, C], tokens [B, N, Wv] -> (t' [B, M, C], F [B, N, C])."""
        feats = F.normalize(self.linear_proj[layer](tokens), dim=-1)
        query = self.q_proj_pre(text.transpose(1, 2)).transpose(1, 2)
        b, m, c = query.shape
        split = lambda x: x.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)
        attended = F.scaled_dot_product_attention(split(query), split(feats), split(feats), scale=c ** -0.5)
        return F.normalize(attended.transpose(1, 2).reshape(b, m, c) + text, dim=-1), feats


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """transformers' get_cosine_schedule_with_warmup (half a cosine): factor step/warmup during the
    warm-up (0 at the first step), then 0.5 (1 + cos(pi progress)) down to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


# ------------------------------------------------------------------------------------------ method
@register
class BayesPFL(Method):
    name = "bayespfl"
    activation = "gelu"
    image_convention = "squash"
    mask_convention = "bilinear"
    default_image_size = 518
    stages = ("stage1", "stage2")
    recipe = {
        "stage1": {"epochs": 30, "batch_size": 32, "seed": 333, "image_size": 518, "optimizer": "Adam",
                   "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                   "lr": {"prompt": 1e-3, "temperature": 1e-2, "flow": 1e-3, "other": 1e-4},
                   "schedule": "cosine with linear warm-up (transformers), warm-up int(0.1 steps_per_epoch "
                               "epochs) of steps_per_epoch epochs steps, stepped every iteration",
                   "until": "3 epochs without validation pixel-AP gain (patience 3; VisA products when training "
                            "on MVTec and vice versa), then restore the best parameters and go to stage2",
                   "augmentation": "albumentations Rotate, RandomRotate90, RandomBrightnessContrast, GaussNoise, "
                                   "Blur/ColorJitter (p 0.5 each); MVTec 2x2 mosaic p 0.4",
                   "ema_alpha": 0.6},
        "stage2": {"epochs": 30, "epochs_shared_with": "stage1",  # train.sh's 30 epochs cover both stages
                   "batch_size": 32, "seed": 333, "image_size": 518, "optimizer": "Adam", "betas": (0.5, 0.999),
                   "lr": 1e-4, "params": ("class_mapping", "image_mapping", "fuse"), "schedule": None,
                   "until": "3 epochs without validation image-AP gain (patience 3)"},
    }

    @dataclass
    class Options:
        samples: int | None = None  # R Monte-Carlo rounds at test; None: 10 (test.sh) or the R of injected draws
        seed: int = 333  # seed of the sampling generator (--seed of train.sh / test.sh)
        stage: Literal["auto", "1", "2"] = "auto"  # image head; auto: the checkpoint's stage, else 2
        ensemble: Literal["image", "text"] = "image"  # image: official; text: the paper's text ensemble
        context_dist: Literal["isd", "iad", "none"] = "isd"  # what the context words sample (official isd)
        state_dist: Literal["isd", "iad", "none"] = "iad"  # what the state words sample (official iad)
        state_cache: bool = True  # official: the first test image's state samples serve every image
        image_score: Literal["class_minmax", "unnormalized"] = "class_minmax"
        alpha: float = 0.5  # weight of the text score in the image score
        sigma: float = 8.0  # Gaussian smoothing of the final map
        topk: int | None = None  # None: 2000 pixels, 20 for the small-object classes
        state_kl_broadcast: bool = True  # official state-KL quirk (see the module docstring)
        bf16: bool = False  # training: bf16 autocast
        checkpointing: bool = False  # training: activation checkpointing
        layers: tuple[int, ...] = (6, 12, 18, 24)
        prompt_num: int = 3  # B, prompts in the bank
        context_len: int = 5  # P
        state_len: int = 5  # Q
        num_flows: int = 10  # K

    def __init__(self, backbone, options=None, image_size: int | None = None):
        super().__init__(backbone, options, image_size)
        o = self.options
        wv, wt, e = backbone.vision_width, backbone.text_width, backbone.embed_dim
        if e != wt:
            raise OptionError(f"bayespfl adds flow samples (embed dim {e}) to token embeddings (text width {wt}); "
                              "use a CLIP whose embed dim equals its text width (all OpenAI ViTs)")
        if not o.layers or not all(1 <= layer <= backbone.vision_layers for layer in o.layers):
            raise OptionError(f"option layers={o.layers}: blocks 1..{backbone.vision_layers} of this backbone "
                              f"(ViT-B: --set layers=3,6,9,12)")
        self.prompt_context = nn.Parameter(torch.empty(o.prompt_num, o.context_len, wt))
        self.prompt_state_normal = nn.Parameter(torch.empty(o.prompt_num, o.state_len, wt))
        self.prompt_state_abnormal = nn.Parameter(torch.empty(o.prompt_num, o.state_len, wt))
        self.temperature_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.temperature_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_encoder = GaussianEncoder(e, wv // 2)
        self.context_decoder = Decoder(e, wv // 2)
        self.state_encoder = GaussianEncoder(e, wv // 2)
        self.state_decoder = Decoder(e, wv // 2)
        self.PFL_context = ImageSpecificFlow(e, o.num_flows)
        self.PFL_normal = ImageAgnosticFlow(e, o.num_flows)
        self.PFL_abnormal = ImageAgnosticFlow(e, o.num_flows)
        self.fuse = LayerFusion(wv, len(o.layers), wt)
        self.RCA = RCA(wv, wt, len(o.layers))
        self.class_mapping = nn.Linear(wt, wt)
        self.image_mapping = nn.Linear(wt, wt)
        self.reset_parameters()
        self.trained_stage: int | None = None  # the stage the parameters come from (image head of stage=auto)
        self._draws: dict | None = None
        self.reset_sampling()

    def reset_parameters(self) -> None:
        """The official initialisation (not its random stream): Linear normal(0, 0.02) and bias 0,
        prompts trunc_normal(0 / +0.5 / -0.5, 0.02), image-agnostic flows randn, RCA's conv default."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("backbone"):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for param, mean in ((self.prompt_context, 0.0), (self.prompt_state_normal, 0.5),
                            (self.prompt_state_abnormal, -0.5)):
            nn.init.trunc_normal_(param, mean=mean, std=0.02)
        for flow in (self.PFL_normal, self.PFL_abnormal):
            for param in (flow.amor_u, flow.amor_w, flow.amor_b, flow.state):
                nn.init.normal_(param)
        self.RCA.q_proj_pre.reset_parameters()
        nn.init.constant_(self.temperature_pixel, math.log(1 / 0.07))
        nn.init.constant_(self.temperature_image, math.log(1 / 0.07))

    # ------------------------------------------------------------------ randomness
    def reset_sampling(self) -> None:
        """Start sampling afresh: re-seed the generator, forget the cached image-agnostic samples and
        rewind injected draws to their first image."""
        self._generator = None
        self._state_cache = None
        self._draw_cursor = 0

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.options.seed)
        return self._generator

    def set_draws(self, draws) -> None:
        """Replay recorded standard-normal draws (a .safetensors path or a dict of tensors).

        Test: eps_context, eps_normal, eps_abnormal [N, R, 1, E] (or [N, R, E]); row i serves the i-th
        image since the draws were set (the state samples come from row 0 with state_cache).
        Training: eps_context [B, E], eps_normal and eps_abnormal [1, E], optionally index_prompt [1];
        every training step replays them.
        """
        if isinstance(draws, (str, Path)):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                draws = load_file(str(draws))
            except (SafetensorError, OSError) as err:
                raise OptionError(f"{draws}: not a readable safetensors draws file ({err})") from None
        missing = [k for k in ("eps_context", "eps_normal", "eps_abnormal") if k not in draws]
        if missing:
            raise OptionError(f"draws lack {', '.join(missing)}; a bayespfl draws file holds eps_context, "
                              "eps_normal, eps_abnormal (and optionally index_prompt)")
        self._draws = {k: v.float() if k != "index_prompt" else v.long() for k, v in draws.items()}
        self.reset_sampling()

    def num_samples(self) -> int:
        """R at test: the option, else the R of injected test draws, else 10 (test.sh)."""
        drawn = self._draws["eps_context"].shape[1] if self._draws and self._draws["eps_context"].dim() >= 3 else None
        if self.options.samples is not None and self.options.samples < 1:
            raise OptionError(f"option samples={self.options.samples}: at least 1 Monte-Carlo round")
        if self.options.samples is not None:
            if drawn is not None and drawn != self.options.samples:
                raise OptionError(f"the draws hold R={drawn} samples per image, not samples={self.options.samples}; "
                                  f"drop --set samples or pass samples={drawn}")
            return self.options.samples
        return drawn or 10

    def _test_eps(self, batch: int, samples: int, device):
        """(context, normal, abnormal) standard-normal draws, each [batch, R, E]: image i, sample j."""
        e = self.backbone.embed_dim
        if self._draws is None:
            eps = torch.randn(batch, 3, samples, e, generator=self.generator)  # per image: ctx R, normal R, abnormal R
            return [x.to(device) for x in eps.unbind(1)]
        start, out = self._draw_cursor, []
        for key in ("eps_context", "eps_normal", "eps_abnormal"):
            eps = self._draws[key]
            eps = eps.squeeze(2) if eps.dim() == 4 else eps
            if eps.dim() != 3 or eps.shape[-1] != e:
                raise OptionError(f"draws: {key} {list(self._draws[key].shape)} is no test draw; expected "
                                  f"[images, R, 1, {e}]")
            if eps.shape[0] < start + batch:
                raise OptionError(f"draws: {key} covers {eps.shape[0]} images, this run needs {start + batch}")
            out.append(eps[start:start + batch].to(device))
        self._draw_cursor += batch
        return out

    def _train_eps(self, batch: int, device):
        """eps_context [B, E], eps_normal [1, E], eps_abnormal [1, E] and the bank index (official order)."""
        e, d = self.backbone.embed_dim, self._draws
        if d is None:
            eps = [torch.randn(n, e, generator=self.generator) for n in (batch, 1, 1)]
            index = int(torch.randint(0, self.options.prompt_num, (1,), generator=self.generator))
        else:
            eps = [d["eps_context"], d["eps_normal"], d["eps_abnormal"]]
            if [list(x.shape) for x in eps] != [[batch, e], [1, e], [1, e]]:
                raise OptionError(f"draws {[list(x.shape) for x in eps]} are no training draws for batch {batch}; "
                                  f"expected eps_context [{batch}, {e}], eps_normal/eps_abnormal [1, {e}]")
            index = (int(d["index_prompt"].reshape(-1)[0]) if "index_prompt" in d else
                     int(torch.randint(0, self.options.prompt_num, (1,), generator=self.generator)))
        return [x.to(device) for x in eps] + [index]

    # ------------------------------------------------------------------ building blocks
    def encode_image(self, images):
        """g [B, E] = ln_post(cls) @ proj and the raw residual stream of the feature layers, cls dropped."""
        self.backbone.set_activation(self.run_activation)
        out = self.backbone.encode_image_layers(images, self.options.layers, interpolation="bicubic")
        return self.backbone.global_embedding(out, ln_post=True), [out.tokens[i][:, 1:] for i in self.options.layers]

    def context_flow(self, g, eps) -> dict:
        """Image-specific samples: g [B, E], eps [B, R, E] -> zk [B, R, E] (and mu, var, u, w, b, z0, log_det)."""
        mu, var = self.context_encoder(g)
        u, w, b = self.PFL_context(g)
        z0 = sample_gaussian(mu[:, None], var[:, None], eps)
        zk, log_det = planar_flow(z0, u[:, None], w[:, None], b[:, None])
        return {"mu": mu, "var": var, "u": u, "w": w, "b": b, "z0": z0, "zk": zk, "log_det": log_det}

    def state_flow(self, flow: ImageAgnosticFlow, eps) -> dict:
        """Image-agnostic samples of one state flow: eps [..., E] -> zk [..., E] (and mu, var [1, E], z0, log_det)."""
        mu, var = self.state_encoder(flow.state)
        z0 = sample_gaussian(mu, var, eps)
        zk, log_det = planar_flow(z0, *flow())
        return {"mu": mu, "var": var, "z0": z0, "zk": zk, "log_det": log_det}

    def prompt_offsets(self, context_zk, normal_zk, abnormal_zk):
        """Offsets of the context and the state words, each [B, S, 2, E] (class axis: normal, abnormal),
        from samples [B, S, E] (image-specific) and [B or 1, S, E] (image-agnostic)."""
        isd = context_zk[:, :, None].expand(-1, -1, 2, -1)
        iad = torch.stack([normal_zk, abnormal_zk], dim=2).expand_as(isd)
        choice = {"isd": isd, "iad": iad, "none": torch.zeros_like(isd)}
        return choice[self.options.context_dist], choice[self.options.state_dist]

    def text_embeddings(self, class_names, context_offset, state_offset, checkpoint_blocks: bool = False):
        """Unit embeddings [B, 2 S P, E] of the prompts of every image b, sample s, class c and bank p, at
        index c S P + s P + p; the offsets [B, S, 2, E] are added to every context / state word."""
        b = context_offset.shape[0]
        ids = self.backbone.tokenize([bayespfl_sentence(c) for c in class_names])
        words = self.backbone.token_embeddings(ids)  # [B, L, D]
        context = self.prompt_context + context_offset[:, :, :, None, None]  # [B, S, 2, P, n_ctx, D]
        states = torch.stack([self.prompt_state_normal, self.prompt_state_abnormal]) + state_offset[:, :, :, None, None]
        learned = torch.cat([context, states], dim=-2)
        n, (length, width) = learned.shape[-2], words.shape[1:]
        eot = ids.argmax(dim=-1)
        if int(eot.max()) > length - n:
            raise OptionError(f"class name {class_names[int(eot.argmax())]!r} is too long for {n} prompt tokens")
        # Causal attention: the rows up to the last EOT never see the padding after it, so it is cut
        # (the same features up to float rounding; the text tower is most of Bayes-PFL's cost).
        length = int(eot.max()) + n
        lead = learned.shape[:4]
        sequences = torch.cat([words[:, None, None, None, :1].expand(*lead, 1, width), learned,
                               words[:, None, None, None, 2:length - n + 1].expand(*lead, length - n - 1, width)], -2)
        eot = (eot + n - 1)[:, None].expand(b, lead[1:].numel()).reshape(-1)  # "x" became n tokens
        feats = self.backbone.encode_text_embeddings(sequences.reshape(-1, length, width), eot,
                                                     checkpoint_blocks=checkpoint_blocks)
        feats = F.normalize(feats, dim=-1).view(*lead, -1).transpose(1, 2)  # [B, 2, S, P, E]
        return feats.reshape(b, -1, feats.shape[-1])

    def image_logits(self, text, g, patches, stage: int):
        """pro [B, M] = exp(T_img) <L2(class_mapping(t)), L2(v)>; v = g (stage 1) or image_mapping(g + fuse)."""
        text = F.normalize(self.class_mapping(text), dim=-1)
        v = g if stage == 1 else self.image_mapping(g + self.fuse(patches))
        return self.temperature_image.exp() * (text @ F.normalize(v, dim=-1)[..., None])[..., 0]

    def pixel_logits(self, text, patches):
        """Per layer: (t' [B, M, E], F [B, N, E], logits exp(T_pix) F t'^T as [B, M, h, h])."""
        out = []
        for layer, tokens in enumerate(patches):
            updated, feats = self.RCA(text, tokens, layer)
            logits = self.temperature_pixel.exp() * feats @ updated.transpose(1, 2)
            h = math.isqrt(logits.shape[1])
            out.append((updated, feats, logits.transpose(1, 2).reshape(logits.shape[0], -1, h, h)))
        return out

    def upsampled_margin(self, logits):
        """Abnormal minus normal logit of each pair [B, M/2, S, S], bilinear (align_corners) to S x S.

        softmax(normal, abnormal)[abnormal] = sigmoid(margin), and up-sampling is linear, so up-sampling
        the margin equals the official softmax of the up-sampled pair (to float rounding) at half the memory.
        """
        n = logits.shape[1] // 2
        return F.interpolate(logits[:, n:] - logits[:, :n], size=self.image_size, mode="bilinear",
                             align_corners=True)

    def topk_for(self, class_name: str) -> int:
        if self.options.topk is not None:
            return self.options.topk
        return 20 if class_name in SMALL_OBJECT_CLASSES else 2000

    def head_stage(self) -> int:
        return int(self.options.stage) if self.options.stage != "auto" else (self.trained_stage or 2)

    # ------------------------------------------------------------------ inference
    def infer(self, images, class_names) -> dict:
        """Every test-time tensor of a batch: the flows, text embeddings, logits, maps and scores."""
        o = self.options
        g, patches = self.encode_image(images)
        samples = self.num_samples()
        eps_context, eps_normal, eps_abnormal = self._test_eps(len(images), samples, g.device)
        context = self.context_flow(g, eps_context)
        normal, abnormal = self.state_flow(self.PFL_normal, eps_normal), self.state_flow(self.PFL_abnormal, eps_abnormal)
        normal_zk, abnormal_zk = normal["zk"], abnormal["zk"]
        if o.state_cache:  # official: the first test image's image-agnostic samples serve every image
            if self._state_cache is None or self._state_cache[0].shape[1] != samples:  # R changed: draw anew
                self._state_cache = (normal_zk[:1], abnormal_zk[:1])
            normal_zk, abnormal_zk = self._state_cache
        text = self.text_embeddings(class_names, *self.prompt_offsets(context["zk"], normal_zk, abnormal_zk))
        if o.ensemble == "text":
            text = F.normalize(text.view(len(images), 2, -1, text.shape[-1]).mean(2), dim=-1)
        pro = self.image_logits(text, g, patches, self.head_stage())
        layers = self.pixel_logits(text, patches)
        layer_maps = torch.stack([torch.sigmoid(self.upsampled_margin(logits)).mean(1) for _, _, logits in layers], 1)
        maps = layer_maps.mean(1)  # the mean over all layers and pairs (image ensemble)
        half = pro.shape[1] // 2
        ks = torch.tensor([min(self.topk_for(c), maps[0].numel()) for c in class_names], device=maps.device)
        top = maps.flatten(1).topk(int(ks.max()), dim=1).values
        topk_means = (top * (torch.arange(top.shape[1], device=top.device) < ks[:, None])).sum(1) / ks
        return {"text_scores": torch.sigmoid(pro[:, half:] - pro[:, :half]).mean(1), "anomaly_maps": maps,
                "topk_means": topk_means, "layer_maps": layer_maps, "pro_img": pro, "text_embeddings": text, "global_features": g,
                "context": context, "normal": normal, "abnormal": abnormal, "layers": layers,
                "state_samples": (normal_zk, abnormal_zk)}

    def forward(self, images, class_names):
        out = self.infer(images, class_names)
        return {"image_scores": out["text_scores"], "anomaly_maps": out["anomaly_maps"],
                "text_scores": out["text_scores"], "topk_means": out["topk_means"]}

    def finalize(self, raw):
        """Official per-class scoring: smoothed maps; 0.5 minmax(text score) + 0.5 minmax(top-k mean)."""
        o = self.options
        maps = torch.cat([gaussian_filter(chunk.float(), o.sigma) for chunk in raw["anomaly_maps"].split(16)])
        text, topk = raw["text_scores"].float(), raw["topk_means"].float()
        if o.image_score == "class_minmax":
            text, topk = minmax(text), minmax(topk)
        scores = o.alpha * text + (1 - o.alpha) * topk
        return Prediction(scores, maps, {"text_scores": raw["text_scores"], "topk_means": raw["topk_means"]})

    # ------------------------------------------------------------------ training
    def training_forward(self, batch: dict, stage: str):
        """One official training step: (loss terms incl. "total", intermediates)."""
        if stage not in self.stages:
            raise OptionError(f"unknown stage {stage!r}; bayespfl trains {', '.join(self.stages)}")
        o, device = self.options, self.backbone.device
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        n_img, bank = len(images), o.prompt_num
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=o.bf16):
            with torch.no_grad():
                g, patches = self.encode_image(images)
            eps_context, eps_normal, eps_abnormal, index = self._train_eps(n_img, device)
            context = self.context_flow(g, eps_context[:, None])
            normal, abnormal = self.state_flow(self.PFL_normal, eps_normal), self.state_flow(self.PFL_abnormal, eps_abnormal)
            offsets = self.prompt_offsets(context["zk"], normal["zk"][None], abnormal["zk"][None])
            with torch.set_grad_enabled(torch.is_grad_enabled() and stage == "stage1"):  # stage 2 trains the heads only
                text = self.text_embeddings(batch["class_names"], *offsets, checkpoint_blocks=o.checkpointing)
            pro = self.image_logits(text, g, patches, 1 if stage == "stage1" else 2)
            pair = [index, index + bank]
            loss_class = F.cross_entropy(pro[:, pair].float(), labels)
            mid = {"index_prompt": index, "global_features": g, "text_embeddings": text, "pro_img": pro,
                   "context": context, "normal": normal, "abnormal": abnormal}
            if stage == "stage2":
                return {"loss_class": loss_class, "total": loss_class}, mid
            layers = self.pixel_logits(text, patches)
        masks = batch["masks"].to(device).float()
        seg = [checkpoint(self.segmentation_losses, logits[:, pair].float(), masks, use_reentrant=False)
               if o.checkpointing else self.segmentation_losses(logits[:, pair].float(), masks)
               for _, _, logits in layers]
        focal, dice = torch.stack([f for f, _ in seg]), torch.stack([d for _, d in seg])
        uses = {o.context_dist, o.state_dist}
        zero = loss_class.new_zeros(())
        kl_context = (flow_kl(context["z0"][:, 0].float(), context["mu"].float(), context["var"].float(),
                              context["zk"][:, 0].float(), context["log_det"][:, 0].float(), n_img)
                      if "isd" in uses else zero)
        kl_states = [flow_kl(f["z0"].float(), f["mu"].float(), f["var"].float(), f["zk"].float(),
                             f["log_det"].float(), n_img, broadcast=o.state_kl_broadcast) if "iad" in uses else zero
                     for f in (normal, abnormal)]
        dist_reg = 0.01 * (kl_context + kl_states[0] + kl_states[1])
        orthogonality = orthogonality_loss(text[:, :bank].float()) + orthogonality_loss(text[:, bank:].float())
        with torch.no_grad():  # the abandoned reconstruction term: computed, never added
            reconstruction = self.PFL_context.p_mu(self.context_decoder(context["zk"][:, 0].float()))
            rec = ((reconstruction.float() - g.float()) ** 2).sum() / n_img
        terms = {"loss_class": loss_class, "loss_focal": focal.sum(), "loss_dice": dice.sum(),
                 "loss_seg": focal.sum() + dice.sum(), "kl_context": kl_context, "kl_normal": kl_states[0],
                 "kl_abnormal": kl_states[1], "loss_dist_reg": dist_reg, "loss_orthogonal": orthogonality,
                 "rec_unused": rec}
        terms["total"] = loss_class + terms["loss_seg"] + dist_reg + orthogonality
        mid.update(layers=layers, focal_per_layer=focal, dice_per_layer=dice, reconstruction=reconstruction)
        return terms, mid

    def segmentation_losses(self, pair_logits, masks):
        """Focal and Dice of softmax(normal, abnormal) of the selected pair [B, 2, h, h] at full resolution."""
        margin = self.upsampled_margin(pair_logits)[:, 0]
        probs = torch.stack([torch.sigmoid(-margin), torch.sigmoid(margin)], dim=1)
        return focal_loss_fg_bg(probs, masks), dice_loss_batch(probs[:, 1], masks)

    def training_loss(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        return self.training_forward(batch, stage)[0]

    def named_learnable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def trainable_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        if stage == "stage2":
            return [*self.class_mapping.parameters(), *self.image_mapping.parameters(), *self.fuse.parameters()]
        return [p for _, p in self.named_learnable_parameters()]

    def optimizer_groups(self) -> list[dict]:
        """The official stage-1 groups: prompts 1e-3, temperatures 1e-2, flow parameters 1e-3, the rest 1e-4."""
        lr = self.recipe["stage1"]["lr"]
        groups = {"prompt": [], "temperature": [], "flow": [], "other": []}
        for name, param in self.named_learnable_parameters():
            if "prompt" in name:
                groups["prompt"].append(param)
            elif "PFL" in name and "encoder" not in name and "decoder" not in name:
                groups["flow"].append(param)
            elif "temperature" in name:
                groups["temperature"].append(param)
            else:
                groups["other"].append(param)
        return [{"params": groups[k], "lr": lr[k], "name": k} for k in ("prompt", "temperature", "flow", "other")]

    def make_optimizer(self, stage: str, steps_per_epoch: int, epochs: int):
        betas = self.recipe["stage1"]["betas"]
        if stage == "stage1":
            optimizer = torch.optim.Adam(self.optimizer_groups(), lr=1e-4, betas=betas, eps=1e-8)
            warmup = int(0.1 * steps_per_epoch * epochs)  # official expression order
            scheduler = cosine_with_warmup(optimizer, warmup, steps_per_epoch * epochs)
        elif stage == "stage2":
            optimizer = torch.optim.Adam(self.trainable_parameters("stage2"), lr=self.recipe["stage2"]["lr"],
                                         betas=betas)
            scheduler = None
        else:
            raise OptionError(f"unknown stage {stage!r}; bayespfl trains {', '.join(self.stages)}")
        self.trained_stage = self.stages.index(stage) + 1
        return optimizer, scheduler

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict:
        return {**super().config(), "trained_stage": self.trained_stage}

    def load_checkpoint(self, path) -> None:
        super().load_checkpoint(path)
        if Path(path).suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                self.trained_stage = json.loads((f.metadata() or {}).get("config", "{}")).get("trained_stage")
        self.reset_sampling()

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The 131 keys of the official `{'MyModel': state_dict}`, aliases included (same tensors)."""
        own, out = self.learnable_state(), {}
        for key, value in own.items():
            flow = key.split(".")[0]
            if flow in FLOWS and key == f"{flow}.p_mu.0.weight":  # official order: encoder, decoder, then p_mu
                for alias, target in ALIASES.items():
                    if alias.startswith(flow + "."):
                        out.update({alias + k[len(target):]: v for k, v in own.items() if k.startswith(target)})
            out[key] = value
        return out

    def export_official(self, path) -> None:
        torch.save({"MyModel": self.official_state_dict()}, str(path))

    def load_official(self, path: Path) -> None:
        state = read_official_checkpoint(path, "MyModel", "Bayes-PFL")
        expected = self.official_state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise CheckpointError(f"{path}: not a Bayes-PFL checkpoint for layers {self.options.layers} "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the "
                                  "epoch_post_*.pth file the official train.py saved")
        for key, value in expected.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{path}: {key} is {list(state[key].shape)}, this model expects {list(value.shape)}; "
                                      f"use the backbone it was trained with and matching --set prompt_num/"
                                      f"context_len/state_len/num_flows/layers")
        for alias, target in ALIASES.items():
            for key in (k for k in expected if k.startswith(alias)):
                if not torch.equal(state[key], state[target + key[len(alias):]]):
                    raise CheckpointError(f"{path}: {key} differs from its shared module {target + key[len(alias):]}; "
                                          "the file is inconsistent")
        self.load_state_dict({k: state[k] for k in self.learnable_state()}, strict=False)
        name = Path(path).name
        stage = name.removesuffix(".pth").split("_")[-1] if "epoch_post" in name else ""
        self.trained_stage = int(stage) if stage in ("1", "2") else 2
