"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning for zero-shot anomaly detection.

Text. Two learnable prompts, independent of the object (zsad_core.prompt_learner):

    g_n = [SOT] V_1..V_12 object.           g_a = [SOT] W_1..W_12 damaged object.
    T   = normalise(text_encoder([g_n; g_a]))                  [2, E], row 0 normal, row 1 abnormal

with deep prompts (depth 9, length 4) overwriting token rows 1..4 before text blocks 2..9.

Vision. CLIP with DPAM from block 6 on: besides the original path o, a path v <- v + out_proj(
softmax(V V^T / sqrt(d)) V) (V from ln_1(o), no MLP). Patch tokens of feature layer l:
P_l = ln_post(v_l) @ proj; global embedding g = o_24[cls] @ proj (no ln_post).

Scores (tau = 0.07):

    s(x)   = softmax(<g/|g|, T> / tau)[abnormal]                          (global branch only)
    S_l    = softmax(<P_l/|P_l|, T> / tau)                     [1+N, 2] per token
    M(x)   = G_sigma=4( sum_l up(S_l)[abnormal] )              bilinear upsampling to 518 x 518

Training (glocal loss, one stage, text features recomputed every step, CLIP frozen):

    L = CE(<g/|g|, T> / tau, y) + lambda * sum_l [ Focal(up(S_l), m) + Dice(up(S_l)_a, m) + Dice(up(S_l)_n, 1 - m) ]

Official quirks reproduced by default (github.com/zqhang/AnomalyCLIP at 45ed4dd):
* Configurations (option `config`): `main` (default; train.sh/test.sh: feature layer 24 only,
  lambda = 4; all published numbers), `multilayer` (argparse defaults / paper: layers 6, 12, 18, 24,
  lambda = 4), `prefix_bug` (code before the 2025-04-13 fix: layers 6, 12, 18, 24 all read the
  final V-V state of block 24, because the collected tensor was updated in place; lambda = 1, i.e.
  exactly 4 x the main map and the main gradients).
* The deep prompts are cast to float16 inside the float32 text encoder (`deep_prompts_fp16`).
* The global embedding skips ln_post (`global_ln_post=True`: CLIP's standard embedding, issue #14).
* The layer map is (S_a + 1 - S_n) / 2 (= S_a); layer maps are summed, not averaged.
* The temperature 0.07 is hard-coded (CLIP's logit scale is ignored).
* Images are squashed to 518 x 518 (PIL bicubic), the positional embedding is resized bilinearly
  without antialias; QuickGELU; the Gaussian is scipy's (reflect, truncate 4) on float32 maps.
* The `compound_prompt_projections` are dead weights kept for the checkpoint format.
Not reproduced: the official cross entropy squeezes the logits, so a last batch of one image
crashes there; here it works. Not offered: DPAM's unused `ffn=True` variant. The official
`--feature_map_layer` (a lower bound on the layer index, 0 = all) is what `layers` expresses.

Options (zsad predict --set KEY=VALUE), the paper's ablations and variants:
* `dpam`: `vv` (official), `qq`, `kk` (the paper's ablation; no official code), `none` (plain CLIP
  tokens of the original path, i.e. Q-K attention), `ensemble` (the rebuttal's "ensemble2",
  Appendix D Table 12: the token logits <P/|P|, T> / tau of Q-K (original path), Q-Q, K-K and V-V
  features are averaged before the softmax; no official code, four vision passes).
* `prompts`: `object_agnostic` (official) or `object_aware` (the class name replaces "object";
  the fixed token buffers of the checkpoint, which encode "... object." / "... damaged object.", are
  then rebuilt per class from the backbone's token embeddings of "X x12 {class}." / "X x12 damaged
  {class}.", exactly what the official constructor would store for that word; the learned context
  and deep prompts are kept).
* `loss`: `glocal` (official), `global` (CE only), `local` (lambda * local only), `global_dice` (CE +
  lambda * the two Dice terms, no focal; the rebuttal's "global + Dice", Appendix D Table 14).
* `depth` (deep prompts before text blocks 2..depth; 1 = none), `deep_length`, `n_ctx`,
  `deep_prompts_fp16` (False: the float32 values, as the paper describes).
* `layers`, `local_weight` override the configuration's feature layers and lambda; `sigma` the
  Gaussian (test.py --sigma).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbone import VisionOutput, self_attention
from ..errors import CheckpointError, OptionError
from ..losses import segmentation_loss_terms
from ..maps import gaussian_filter, patch_map, text_probabilities
from ..prompt_learner import PromptLearner
from .base import Method, read_official_checkpoint, register

TEMPERATURE = 0.07  # hard-coded in the official code
DPAM_START = 6  # DPAM_layer=20 replaces the last 19 of the 24 blocks
ENSEMBLE = (None, "qq", "kk", "vv")  # dpam=ensemble: Q-K (the original path), Q-Q, K-K, V-V


@dataclass(frozen=True)
class Config:
    layers: tuple[int, ...]  # feature layers (1-based), as the official --features_list names them
    local_weight: float  # lambda
    taps_alias_last: bool = False  # the pre-fix in-place aliasing: every layer reads the last block


CONFIGS = {
    "main": Config(layers=(24,), local_weight=4.0),
    "multilayer": Config(layers=(6, 12, 18, 24), local_weight=4.0),
    "prefix_bug": Config(layers=(6, 12, 18, 24), local_weight=1.0, taps_alias_last=True),
}


class AnomalyCLIPFamily:
    """What FAPrompt shares with AnomalyCLIP besides the prompt learner: the official conventions
    (QuickGELU, squashed 518 px inputs, bilinear masks, object-agnostic prompts), one Adam over the
    learnable prompt parameters with the recipe's lr/betas/eps and no schedule, and the vision pass of
    the frozen CLIP."""

    activation = "quick_gelu"
    image_convention = "squash"
    mask_convention = "bilinear"
    default_image_size = 518
    uses_class_name = False
    # the official train.py of both repositories: the same optimizer, epochs, batch and seed
    stages = ("prompts",)
    recipe = {"prompts": {"optimizer": "Adam", "lr": 1e-3, "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                          "schedule": None, "epochs": 15, "batch_size": 8, "shuffle": True, "seed": 111,
                          "split": "test", "save_every_epochs": 1}}

    def make_optimizer(self, stage: str, steps_per_epoch: int, epochs: int):
        r = self.recipe["prompts"]
        return torch.optim.Adam(self.trainable_parameters(stage), lr=r["lr"], betas=r["betas"], eps=r["eps"],
                                weight_decay=r["weight_decay"]), None

    def frozen_vision(self, images: torch.Tensor):
        self.backbone.set_activation(self.run_activation)
        with torch.no_grad():  # CLIP is frozen; the official vision pass runs under no_grad
            return self.encode_image(images)


@register
class AnomalyCLIP(AnomalyCLIPFamily, Method):
    name = "anomalyclip"

    @dataclass
    class Options:
        config: Literal["main", "multilayer", "prefix_bug"] = "main"
        dpam: Literal["vv", "qq", "kk", "none", "ensemble"] = "vv"
        prompts: Literal["object_agnostic", "object_aware"] = "object_agnostic"
        loss: Literal["glocal", "global", "local", "global_dice"] = "glocal"
        depth: int = 9
        deep_length: int = 4
        n_ctx: int = 12
        deep_prompts_fp16: bool = True
        global_ln_post: bool = False
        layers: tuple[int, ...] | None = None  # None: the configuration's
        local_weight: float | None = None  # None: the configuration's
        sigma: float = 4.0

    def __init__(self, backbone, options=None, image_size=None):
        super().__init__(backbone, options, image_size)
        o = self.options
        config = CONFIGS[o.config]
        self.layers = tuple(o.layers) if o.layers else config.layers
        last = backbone.vision_layers
        if not self.layers or not all(1 <= layer <= last for layer in self.layers):
            raise OptionError(f"option layers={self.layers}: feature layers must lie in 1..{last}")
        # the block whose tokens each feature layer actually reads
        self.read_layers = tuple(last for _ in self.layers) if config.taps_alias_last else self.layers
        self.local_weight = config.local_weight if o.local_weight is None else float(o.local_weight)
        self.uses_class_name = o.prompts == "object_aware"
        try:
            self.prompt_learner = PromptLearner(backbone, n_ctx_normal=o.n_ctx, n_ctx_abnormal=o.n_ctx,
                                                depth=o.depth, deep_length=o.deep_length, owner="AnomalyCLIP")
        except ValueError as err:
            raise OptionError(f"anomalyclip options: {err}") from None

    # ------------------------------------------------------------------ text
    def text_embeddings(self, words: list[str | None]) -> torch.Tensor:
        """Unnormalised [normal, abnormal] text features [C, 2, E], one row per distinct word
        (None: the stored object-agnostic buffers)."""
        learner = self.prompt_learner
        return torch.cat([learner.encode(self.backbone, learner.buffers_for(self.backbone, w),
                                         deep_prompts_fp16=self.options.deep_prompts_fp16) for w in words])

    def text_features(self, class_names: list[str]) -> torch.Tensor:
        """Normalised T per image, [B, 2, E] (object-agnostic: one T for every image, [1, 2, E])."""
        if not self.uses_class_name:
            raw = self.text_embeddings([None])
            return raw / raw.norm(dim=-1, keepdim=True)
        words = sorted(set(class_names))
        raw = self.text_embeddings(words)
        text = raw / raw.norm(dim=-1, keepdim=True)
        return text[[words.index(c) for c in class_names]]

    # ------------------------------------------------------------------ vision
    def encode_image(self, images: torch.Tensor):
        """DPAM vision pass: VisionOutput with ln_post+proj tokens of the read layers, `final` = o.
        dpam=ensemble: one pass per member; `extras["members"]` holds each member's tokens."""
        if self.options.dpam == "ensemble":
            return self._ensemble_pass(images)
        dpam = None if self.options.dpam == "none" else self.options.dpam
        return self.backbone.encode_image_layers(images, sorted(set(self.read_layers)), interpolation="bilinear",
                                                 dpam=dpam, dpam_start=DPAM_START, ln_post=True, proj=True)

    def _ensemble_pass(self, images: torch.Tensor):
        """The ensemble's members in one pass: the original path o (Q-K) and three DPAM paths (Q-Q, K-K,
        V-V) beside it, each exactly as `encode_image_layers` computes it alone (they share o)."""
        bb = self.backbone
        layers = set(self.read_layers)
        x = bb.embed_image(images, "bilinear")
        paths = {kind: None for kind in ENSEMBLE if kind is not None}
        taps = {kind: {} for kind in ENSEMBLE}
        for i, block in enumerate(bb.visual.transformer.resblocks, start=1):
            if i >= DPAM_START:
                h = block.ln_1(x)
                for kind, v in paths.items():
                    paths[kind] = (x if v is None else v) + block.attn.out_proj(self_attention(block, h, kind))
            x = block(x)
            if i in layers:
                taps[None][i] = x
                for kind, v in paths.items():
                    taps[kind][i] = x if v is None else v
        members = [{i: bb.project_tokens(t, ln_post=True, proj=True) for i, t in taps[k].items()} for k in ENSEMBLE]
        grid = int(round((x.shape[1] - 1) ** 0.5))
        return VisionOutput(tokens=members[ENSEMBLE.index("vv")], final=x, grid=grid, extras={"members": members})

    def token_probabilities(self, vision, layer: int, text: torch.Tensor) -> torch.Tensor:
        """S_l = softmax(<P_l/|P_l|, T> / tau), [B, 1+N, 2]; dpam=ensemble averages the members' logits."""
        members = vision.extras.get("members")
        if members is None:
            return text_probabilities(vision.tokens[layer], text, TEMPERATURE)
        logits = 0
        for tokens in members:
            p = tokens[layer] / tokens[layer].norm(dim=-1, keepdim=True)
            logits = logits + p @ text.transpose(-1, -2) / TEMPERATURE
        return (logits / len(members)).softmax(dim=-1)

    def global_features(self, vision) -> torch.Tensor:
        return self.backbone.global_embedding(vision, ln_post=self.options.global_ln_post)

    def image_logits(self, vision, text: torch.Tensor) -> torch.Tensor:
        """<g/|g|, T> / tau, [B, 2]."""
        g = self.global_features(vision)
        g = g / g.norm(dim=-1, keepdim=True)
        return (g[:, None] @ text.transpose(-1, -2))[:, 0] / TEMPERATURE

    def layer_similarities(self, vision, text: torch.Tensor) -> dict[int, torch.Tensor]:
        """S_l = softmax(<P_l/|P_l|, T> / tau), [B, 1+N, 2] per distinct read layer."""
        return {layer: self.token_probabilities(vision, layer, text) for layer in set(self.read_layers)}

    # ------------------------------------------------------------------ inference
    def outputs(self, vision, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything test.py computes from one vision pass and T, keyed by name."""
        logits = self.image_logits(vision, text)
        probs = logits.softmax(dim=-1)
        similarity = self.layer_similarities(vision, text)
        fused = 0
        for layer in self.read_layers:
            up = patch_map(similarity[layer], self.image_size)
            fused = fused + (up[:, 1] + 1 - up[:, 0]) / 2  # = up[:, 1] (official expression)
        return {"image_scores": probs[:, 1], "text_probs": probs, "similarity": similarity, "fused_map": fused,
                "anomaly_maps": gaussian_filter(fused, self.options.sigma)}

    def infer(self, images: torch.Tensor, class_names: list[str]) -> dict[str, torch.Tensor]:
        self.backbone.set_activation(self.run_activation)
        return self.outputs(self.encode_image(images), self.text_features(class_names))

    def forward(self, images, class_names):
        out = self.infer(images, class_names)
        return {k: out[k] for k in ("image_scores", "anomaly_maps", "text_probs")}

    # ------------------------------------------------------------------ training
    def trainable_parameters(self, stage: str | None = None):
        # all prompt-learner parameters, as the official optimizer; the dead projections get no grad
        return list(self.prompt_learner.parameters())

    def training_loss(self, batch: dict, stage: str = "prompts") -> dict[str, torch.Tensor]:
        vision = self.frozen_vision(batch["images"])
        return self.loss_terms(vision, self.text_features(batch["class_names"]), batch["labels"], batch["masks"])

    def loss_terms(self, vision, text: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict:
        """The glocal loss terms (scalars) in train.py's order of accumulation; "total" is back-propagated."""
        terms = {"image_ce": F.cross_entropy(self.image_logits(vision, text), labels.long())}
        if self.options.loss == "global":
            terms["total"] = terms["image_ce"]
            return terms
        local = 0
        for layer, read in zip(self.layers, self.read_layers):
            probs = patch_map(self.token_probabilities(vision, read, text), self.image_size)
            for name, value in segmentation_loss_terms(probs, masks).items():
                if name == "focal" and self.options.loss == "global_dice":
                    continue
                terms[f"layer{layer}.{name}"] = value
                local = local + value
        terms["local_sum"] = local
        terms["local_weighted"] = self.local_weight * local
        terms["total"] = terms["local_weighted"] + (terms["image_ce"] if self.options.loss != "local" else 0)
        return terms

    # ------------------------------------------------------------------ checkpoints
    def load_official(self, path) -> None:
        """`{"prompt_learner": state_dict}` (the released epoch_N.pth files), loaded strictly."""
        state = read_official_checkpoint(path, "prompt_learner", "AnomalyCLIP")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: 'prompt_learner' is not a state dict; pass an official AnomalyCLIP checkpoint")
        self.prompt_learner.load_official_state(state, path)

    def export_official(self, path) -> None:
        torch.save({"prompt_learner": self.prompt_learner.official_state_dict()}, str(path))

    def load_learnable_state(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "prompt_learner."
        self.prompt_learner.load_official_state(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "zsad checkpoint")
