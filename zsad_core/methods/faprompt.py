"""FAPrompt (Zhu et al., 2024): fine-grained abnormality prompt learning for zero-shot anomaly detection.

FAPrompt is AnomalyCLIP's pipeline (zsad_core.methods.anomalyclip: DPAM vision tower, learnable
object-agnostic prompts with deep text prompts, focal + Dice map loss) with two additions.

Compound abnormality prompts (CAP; zsad_core.prompt_learner configured with a shared normal context):

    g_n   = [SOT] V_1..V_E object.                               E  = 5 vectors, shared
    g_a^k = [SOT] V_1..V_E A_k1..A_kE' damaged object.           E' = 2 own vectors, k = 1..K = 10
    t_n = T(g_n),  t_a^k = T(g_a^k),  T_s = normalise([t_n; mean_k t_a^k])                  [2, D]
    L_oc = sum_{k<m} |cos(t_a^k, t_a^m)|                                     (orthogonal loss)

Vision (as AnomalyCLIP's main configuration): f_j = normalise(ln_post(v_24[j]) @ proj), the V-V path
of block 24 only; g = normalise(o_24[cls] @ proj) without ln_post. With tau = 0.07:

    S_j = softmax_c(<f_j, T_s[c]> / tau)                                     static (CAP) path

Data-dependent abnormality prior (DAP): M = 10 patches P of the image, concatenated in order,
give a bias b = psi([f_p]_{p in P}) with psi = Linear(M D -> M D / 16) ReLU Linear(-> D)
(`patch_meta_net`), added to every abnormal context vector A_ki (the normal prompt has none):

    T_d = normalise([t_n; mean_k T(g_a^k with A + b)]),   D_j = softmax_c(<f_j, T_d[c]> / tau)
    L_prior = sum over the normal images of mean_d b_d^2

Scores and map (official test.py):

    s(x) = 0.5 (softmax(<g, T_d> / tau)[a] + (2 max_j S_j[a] + max_j D_j[a]) / 3)
    M(x) = G_sigma=10((up(S)_a + 1 - up(S)_n + up(D)_a + 1 - up(D)_n) / 4)      bilinear up to 518

Training (one stage, CLIP frozen, vision under no_grad, both text paths with grad):

    L = Seg(up S) + 0.5 Seg(up D) + CE(<g, T_d> / tau, y) + BFL(s(x), y) + 0.1 L_oc + L_prior
    Seg(P) = Focal(P, m) + Dice(P_a, m) + Dice(P_n, 1 - m);  BFL = binary focal loss with logits

Official quirks reproduced by default (github.com/mala-lab/FAPrompt at 7e9d9d2):
* The prior reads the *first* M patches (top row, raster order) of every image: the top-M indices of
  S[a] are computed but unused (option `dap_selection`).
* The deep prompts are cast to float16 inside the float32 text encoder (`deep_prompts_fp16=True`,
  also on GPU). The golden's main tensors were made with that cast removed: `deep_prompts_fp16=false`
  reproduces them, the default reproduces its `*_fp16quirk` text features.
* The image score weights the map maxima 2:1 (static : DAP) and takes text_prob from T_d only
  (option `image_score`).
* BFL applies a sigmoid to the image score, which already is a probability.
* L_oc is a plain sum over the K(K-1)/2 pairs; L_prior is summed (not averaged) over normal images.
* One bias b shared by all K prompts and both their vectors; "damaged" stays in every abnormal prompt;
  the class name is always "object"; `--n_ctx`, `features_list` and the 8 `compound_prompt_projections`
  (checkpoint format only) are dead; the global embedding skips ln_post; tau = 0.07 hard-coded.
* Images squashed to 518 x 518 (PIL bicubic), positional embedding resized bilinearly, QuickGELU,
  Gaussian = scipy's on float32 maps.
Not reproduced: test.py's text_prob is only right for batch size 1 (its official batch); here every
batch size gives the batch-1 values. A fresh model draws its initial values in the official order
(psi, ctx_pos, ctx_neg, deep prompts, projections) but not from the same RNG state (the official
script builds CLIP from the seed first): start from an official checkpoint for the exact init.

Options (zsad predict --set KEY=VALUE), the paper's variants and ablations:
* `dap_selection`: `first` (official) or `top_m` (the paper: the M patches with the highest S[a]).
* `image_score`: `official` (above) or `paper` (0.5 (text_prob + (max S[a] + max D[a]) / 2), the
  paper's mean of the two maxima).
* `prior` (False: CAP only, no DAP path: T_s for text_prob, s = 0.5 (text_prob + max S[a]),
  M = G((up(S)_a + 1 - up(S)_n) / 2), no L_prior); `n_abnormal` K (1: DAP only, a single abnormal
  prompt, L_oc = 0); `n_ctx_normal` E, `n_ctx_abnormal` E', `top_m` M (change the checkpoint shapes);
  `oc_weight` (0: no orthogonal loss), `prior_weight`, `dap_map_weight` (the 0.5 on Seg(up D)).
  The paper-side variants follow the golden README's summary of the paper; its "squared output"
  prior loss is read as the official mean of squares (no separate option).
* `deep_prompts_fp16`, `depth` (deep prompts before text blocks 2..depth), `deep_length`, `sigma`,
  `global_ln_post` (CLIP's standard global embedding).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, OptionError
from ..losses import binary_focal_loss, pairwise_cosine_loss, segmentation_loss_terms
from ..maps import gaussian_filter, patch_map, text_probabilities
from ..prompt_learner import PromptLearner
from .anomalyclip import DPAM_START, TEMPERATURE, AnomalyCLIPFamily
from .base import Method, read_official_checkpoint, register

PRIOR_NET = "patch_meta_net"  # the official module name (and checkpoint key prefix) of psi


def prior_network(in_dim: int, out_dim: int) -> nn.Sequential:
    """psi: Linear(in -> in // 16) ReLU Linear(-> out), with the official submodule names."""
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(in_dim, in_dim // 16)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(in_dim // 16, out_dim))]))


def scoring_text(raw: torch.Tensor) -> torch.Tensor:
    """[L, 1+K, D] prompt features (normal first) -> normalise([t_n; mean_k t_a^k]), [L, 2, D]."""
    text = torch.stack([raw[:, 0], raw[:, 1:].mean(dim=1)], dim=1)
    return text / text.norm(dim=-1, keepdim=True)


@register
class FAPrompt(AnomalyCLIPFamily, Method):
    name = "faprompt"

    @dataclass
    class Options:
        dap_selection: Literal["first", "top_m"] = "first"
        image_score: Literal["official", "paper"] = "official"
        prior: bool = True
        n_abnormal: int = 10
        n_ctx_normal: int = 5
        n_ctx_abnormal: int = 2
        top_m: int = 10
        oc_weight: float = 0.1
        prior_weight: float = 1.0
        dap_map_weight: float = 0.5
        deep_prompts_fp16: bool = True
        depth: int = 9
        deep_length: int = 4
        sigma: float = 10.0
        global_ln_post: bool = False

    def __init__(self, backbone, options=None, image_size=None):
        super().__init__(backbone, options, image_size)
        o = self.options
        patches = backbone.grid_for(self.image_size) ** 2
        if not 1 <= o.top_m <= patches:
            raise OptionError(f"option top_m={o.top_m}: the prior reads 1..{patches} patches at image size "
                              f"{self.image_size}")
        # the official constructor builds psi first, then the prompts (the order of the RNG draws)
        self.patch_meta_net = prior_network(o.top_m * backbone.embed_dim, backbone.text_width)
        try:
            self.prompt_learner = PromptLearner(
                backbone, n_ctx_normal=o.n_ctx_normal, n_ctx_abnormal=o.n_ctx_abnormal, n_abnormal=o.n_abnormal,
                share_normal_ctx=True, placeholders=("N", "A"), depth=o.depth, deep_length=o.deep_length,
                owner="FAPrompt", size_options="n_ctx_normal / n_abnormal / n_ctx_abnormal / deep_length")
        except ValueError as err:
            raise OptionError(f"faprompt options: {err}") from None

    # ------------------------------------------------------------------ text
    def prompt_features(self, prior_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised features [L, 1+K, D] of the normal and the K abnormal prompts; with a prior
        bias [L, D], b_l is added to every abnormal context vector of row l (L = 1 without)."""
        shift = None if prior_bias is None else prior_bias[:, None, None, :]
        # truncate: (1+B)(1+K) prompts a step, ~12 of 77 rows in use; the causal text tower gives the
        # same EOT features without the padding rows
        return self.prompt_learner.encode(self.backbone, abnormal_shift=shift,
                                          deep_prompts_fp16=self.options.deep_prompts_fp16, truncate=True)

    # ------------------------------------------------------------------ vision
    @property
    def feature_layer(self) -> int:
        """Only the last block's V-V tokens are used (block 24 of ViT-L/14@336)."""
        return self.backbone.vision_layers

    def encode_image(self, images: torch.Tensor):
        """The DPAM pass: tokens[24] = ln_post(v_24) @ proj [B, 1+N, D]; `final` = the original path."""
        return self.backbone.encode_image_layers(images, [self.feature_layer], interpolation="bilinear", dpam="vv",
                                                 dpam_start=DPAM_START, ln_post=True, proj=True)

    def global_features(self, vision) -> torch.Tensor:
        """g = o_24[cls] @ proj (no ln_post by default), normalised, [B, D]."""
        g = self.backbone.global_embedding(vision, ln_post=self.options.global_ln_post)
        return g / g.norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ the two paths
    def prior_patches(self, static_similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices the prior reads [B, M], top-M patches by S[a] [B, M]); patch p = token 1 + p."""
        m = self.options.top_m
        top = static_similarity[:, 1:, 1].topk(m, dim=1, largest=True, sorted=True).indices
        if self.options.dap_selection == "top_m":
            return top, top
        first = torch.arange(m, device=top.device).expand(len(top), -1)  # the official indexing bug
        return first, top

    def paths(self, vision) -> dict[str, torch.Tensor]:
        """Everything the official test/train forward computes from one vision pass, keyed by name."""
        tokens = vision.tokens[self.feature_layer]
        patches = tokens / tokens.norm(dim=-1, keepdim=True)
        g = self.global_features(vision)
        static_raw = self.prompt_features()
        out = {"patch_features": patches, "image_embed": g, "static_raw": static_raw[0],
               "static_text": scoring_text(static_raw)}
        out["static_sim"] = text_probabilities(tokens, out["static_text"], TEMPERATURE)
        out["map_max_static"] = out["static_sim"][:, 1:, 1].max(dim=1).values
        if self.options.prior:
            selected_index, out["topk_index"] = self.prior_patches(out["static_sim"])
            selected = patches[:, 1:].gather(1, selected_index[..., None].expand(-1, -1, patches.shape[-1]))
            prior_bias = self.patch_meta_net(selected.flatten(1))
            dap_raw = self.prompt_features(prior_bias)
            out.update(selected_index=selected_index, selected_tokens=selected, prior_bias=prior_bias,
                       dap_raw=dap_raw, dap_text=scoring_text(dap_raw))
            out["dap_sim"] = text_probabilities(tokens, out["dap_text"], TEMPERATURE)
            out["map_max_dap"] = out["dap_sim"][:, 1:, 1].max(dim=1).values
            text = out["dap_text"]
        else:
            text = out["static_text"]
        out["text_logits"] = (g[:, None] @ text.transpose(-1, -2))[:, 0] / TEMPERATURE
        out["text_prob"] = out["text_logits"].softmax(dim=-1)[:, 1]
        out["image_scores"] = 0.5 * (out["text_prob"] + self.map_max_score(out))
        return out

    def map_max_score(self, out: dict) -> torch.Tensor:
        if not self.options.prior:
            return out["map_max_static"]
        if self.options.image_score == "paper":
            return (out["map_max_static"] + out["map_max_dap"]) / 2
        return (2 * out["map_max_static"] + out["map_max_dap"]) / 3

    # ------------------------------------------------------------------ inference
    def infer(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.backbone.set_activation(self.run_activation)
        out = self.paths(self.encode_image(images))
        static = patch_map(out["static_sim"], self.image_size)
        if self.options.prior:
            dap = patch_map(out["dap_sim"], self.image_size)
            fused = (static[:, 1] + 1 - static[:, 0] + dap[:, 1] + 1 - dap[:, 0]) / 4.0
        else:
            fused = (static[:, 1] + 1 - static[:, 0]) / 2.0
        out["fused_map"] = fused
        out["anomaly_maps"] = gaussian_filter(fused, self.options.sigma)
        return out

    def forward(self, images, class_names):
        out = self.infer(images)
        return {k: out[k] for k in ("image_scores", "anomaly_maps")}

    # ------------------------------------------------------------------ for reading the method
    @torch.no_grad()
    def path_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of the map for figures: `static` up(S)_a and `dap` up(D)_a (abnormal channel,
        unsmoothed, [B, S, S]; `dap` absent without the prior), `final` the anomaly map, and the patch
        indices the prior read (`selected_index`) beside the top-M patches by S_a (`topk_index`), [B, M]."""
        self.eval()
        out = self.infer(images.to(self.backbone.device))
        maps = {"static": patch_map(out["static_sim"], self.image_size)[:, 1]}
        if self.options.prior:
            maps.update(dap=patch_map(out["dap_sim"], self.image_size)[:, 1], selected_index=out["selected_index"],
                        topk_index=out["topk_index"])
        maps.update(final=out["anomaly_maps"], image_scores=out["image_scores"])
        return {k: v.cpu() for k, v in maps.items()}

    @torch.no_grad()
    def abnormal_prompt_cosines(self) -> torch.Tensor:
        """cos(t_a^k, t_a^m) of the K static abnormal prompt features, [K, K]; the orthogonal loss L_oc
        is the sum of the absolute values above the diagonal."""
        raw = self.prompt_features()[0, 1:]
        unit = raw / raw.norm(dim=-1, keepdim=True)
        return (unit @ unit.T).cpu()

    # ------------------------------------------------------------------ training
    def trainable_parameters(self, stage: str | None = None):
        # the official optimizer holds all of FAPrompt.parameters(); the dead projections get no grad
        learner = self.prompt_learner
        return [learner.ctx_pos, learner.ctx_neg, *self.patch_meta_net.parameters(),
                *learner.compound_prompts_text, *learner.compound_prompt_projections.parameters()]

    def training_loss(self, batch: dict, stage: str = "prompts") -> dict[str, torch.Tensor]:
        vision = self.frozen_vision(batch["images"])
        return self.loss_terms(self.paths(vision), batch["labels"], batch["masks"])

    def loss_terms(self, out: dict, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official loss terms (scalars, unweighted) and "total", from the outputs of `paths`."""
        o = self.options
        labels = labels.to(out["text_logits"].device)
        terms, map_total = {}, 0
        paths = [("map_static", out["static_sim"], 1.0)]
        if o.prior:
            paths.append(("map_dap", out["dap_sim"], o.dap_map_weight))
        for path, similarity, weight in paths:
            for name, value in segmentation_loss_terms(patch_map(similarity, self.image_size), masks).items():
                terms[f"{path}.{name}"] = value
                map_total = map_total + weight * value
        terms["map_total"] = map_total
        terms["image_ce"] = F.cross_entropy(out["text_logits"], labels.long())
        terms["image_focal"] = binary_focal_loss(out["image_scores"], labels.float())
        terms["oc"] = pairwise_cosine_loss(out["static_raw"][1:])
        total = map_total + terms["image_ce"] + terms["image_focal"] + o.oc_weight * terms["oc"]
        if o.prior:
            terms["prior"] = self.prior_loss_per_image(out["prior_bias"], labels).sum()
            total = total + o.prior_weight * terms["prior"]
        terms["total"] = total
        return terms

    @staticmethod
    def prior_loss_per_image(prior_bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """mean_d b_d^2 of each normal image (MSE against zero), [number of normal images]."""
        return prior_bias[labels == 0].pow(2).mean(dim=-1)

    # ------------------------------------------------------------------ checkpoints
    def official_state_dict(self):
        """The official `prompt_learner` state dict: the prompt learner's keys, psi after the buffers."""
        prior = {f"{PRIOR_NET}.{k}": v for k, v in self.patch_meta_net.state_dict().items()}
        return self.prompt_learner.official_state_dict(prior)

    def load_official_state(self, state: dict, source) -> None:
        """Strict load of an official FAPrompt `prompt_learner` state dict, with errors that say what differs."""
        prior = {k[len(PRIOR_NET) + 1:]: v for k, v in state.items() if k.startswith(PRIOR_NET + ".")}
        expected = self.patch_meta_net.state_dict()
        if not prior:
            raise CheckpointError(f"{source}: not an official FAPrompt checkpoint (no {PRIOR_NET}; an AnomalyCLIP "
                                  "checkpoint? then use --method anomalyclip)")
        if set(prior) != set(expected):
            raise CheckpointError(f"{source}: {PRIOR_NET} has keys {sorted(prior)}, expected {sorted(expected)}; "
                                  "pass an official FAPrompt checkpoint")
        rest = {k: v for k, v in state.items() if not k.startswith(PRIOR_NET + ".")}
        self.prompt_learner.check_official_state(rest, source)  # context sizes, deep prompts, width
        for key, want in expected.items():
            got = prior[key]
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckpointError(f"{source}: {PRIOR_NET}.{key} has shape {shape}, expected {tuple(want.shape)}: "
                                      f"set the option top_m to the checkpoint's number of prior patches "
                                      f"({PRIOR_NET}.linear1 reads top_m x {self.backbone.embed_dim} values)")
        self.prompt_learner.load_official_state(rest, source)
        self.patch_meta_net.load_state_dict({k: v.float() for k, v in prior.items()})

    def load_official(self, path) -> None:
        """`{"prompt_learner": state_dict}` (the official epoch_N.pth files), loaded strictly."""
        state = read_official_checkpoint(path, "prompt_learner", "FAPrompt")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: 'prompt_learner' is not a state dict; pass an official FAPrompt checkpoint")
        self.load_official_state(state, path)

    def export_official(self, path) -> None:
        torch.save({"prompt_learner": self.official_state_dict()}, str(path))

    def load_learnable_state(self, state: dict[str, torch.Tensor]) -> None:
        official = {k.removeprefix("prompt_learner."): v for k, v in state.items()
                    if k.startswith(("prompt_learner.", PRIOR_NET + "."))}
        self.load_official_state(official, "zsad checkpoint")
