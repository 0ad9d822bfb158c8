"""Learnable text prompts of the AnomalyCLIP family (AnomalyCLIP, FAPrompt): one module, configured.

A prompt is the token-embedding sequence of a tokenised sentence in which the placeholder words are
replaced by learnable context vectors:

    normal      [SOT] c_1 .. c_n                  <normal state>.    [EOT] pad..
    abnormal k  [SOT] (c_1 .. c_n) a_k1 .. a_km   <abnormal state>.  [EOT] pad..     k = 1..K

with c = `ctx_pos` [1, 1, n, D] and a = `ctx_neg` [1, K, m, D]. AnomalyCLIP: n = m = 12, K = 1, the
abnormal prompt has its own context only. FAPrompt: n = 5 shared by all prompts
(`share_normal_ctx`), K = 10 abnormal prompts with m = 2 own vectors each. The fixed parts are
buffers, as in the official code: `token_prefix_*` (the SOT embedding), `token_suffix_*` (the
embeddings after the context: state words, ".", EOT, padding) and `tokenized_prompts_*` (int32 token
ids; only the EOT position, their argmax, is used). They are built from the backbone's token
embedding of the prompt sentence, and the official checkpoints carry them.

Deep text prompts (`compound_prompts_text`, depth - 1 tensors [length, D]): before text blocks
2..depth they overwrite token rows 1..length of every prompt (the backbone's
`encode_text_embeddings`, which also reproduces the official float16 rounding).
`compound_prompt_projections` (depth - 1 copies of one Linear(D, 896); 896 is a literal of the
official code) are never used in any forward; they exist because the official checkpoint format
carries them (and the official optimizer holds them; they never receive a gradient).

`state_dict()` of this module *is* the official key layout (ctx_pos, ctx_neg, the six buffers,
compound_prompts_text.*, compound_prompt_projections.*); `official_state_dict(extra)` inserts a
method's own tensors where its official module registers them (FAPrompt's patch_meta_net) and
lets the identical dead projections share one storage; `load_official_state` loads strictly with
errors that say what does not fit.

Initialisation follows the official order on the global RNG: ctx_pos, ctx_neg (N(0, 0.02^2)), the
deep prompts (N(0, 0.02^2)), then one Linear(D, 896) (PyTorch default) copied depth - 1 times.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn

from .errors import CheckpointError

BUFFERS = ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg",
           "tokenized_prompts_pos", "tokenized_prompts_neg")
DEAD_PROJECTION_WIDTH = 896  # hard-coded in the official code, whatever the model width


class PromptLearner(nn.Module):
    def __init__(self, backbone, *, n_ctx_normal: int = 12, n_ctx_abnormal: int = 12, n_abnormal: int = 1,
                 share_normal_ctx: bool = False, normal_state: str = "{}", abnormal_state: str = "damaged {}",
                 object_word: str = "object", placeholders: tuple[str, str] = ("X", "X"), depth: int = 9,
                 deep_length: int = 4, owner: str = "AnomalyCLIP", size_options: str = "n_ctx / deep_length"):
        super().__init__()
        if not 1 <= depth <= backbone.text_layers:
            raise ValueError(f"deep-prompt depth {depth} outside 1..{backbone.text_layers} (text blocks)")
        if n_ctx_normal < 1 or n_ctx_abnormal < 1 or n_abnormal < 1 or deep_length < 0:
            raise ValueError("context lengths and the number of abnormal prompts must be positive")
        width = backbone.text_width
        self.n_ctx_normal, self.n_ctx_abnormal, self.n_abnormal = n_ctx_normal, n_ctx_abnormal, n_abnormal
        self.share_normal_ctx = share_normal_ctx
        self.normal_state, self.abnormal_state, self.placeholders = normal_state, abnormal_state, placeholders
        self.owner = owner
        self.size_options = size_options  # the owner's option names, for checkpoint-shape error hints

        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx_normal, width))
        self.ctx_neg = nn.Parameter(torch.empty(1, n_abnormal, n_ctx_abnormal, width))
        nn.init.normal_(self.ctx_pos, std=0.02)
        nn.init.normal_(self.ctx_neg, std=0.02)
        for name, value in self.token_buffers(backbone, object_word).items():
            self.register_buffer(name, value.cpu())
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(deep_length, width)) for _ in range(depth - 1)])
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=0.02)
        dead = nn.Linear(width, DEAD_PROJECTION_WIDTH)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(dead) for _ in range(depth - 1)])
        self._word_cache: dict = {}

    # ------------------------------------------------------------------ the fixed token embeddings
    def sentences(self, object_word: str) -> tuple[str, str]:
        """(normal, abnormal) sentences whose placeholder words become the learnable vectors."""
        pos = " ".join([self.placeholders[0]] * self.n_ctx_normal)
        neg = " ".join([self.placeholders[1]] * self.n_ctx_abnormal)
        if self.share_normal_ctx:
            neg = f"{pos} {neg}"
        return (f"{pos} {self.normal_state.format(object_word)}.",
                f"{neg} {self.abnormal_state.format(object_word)}.")

    def token_buffers(self, backbone, object_word: str) -> dict[str, torch.Tensor]:
        """The six fixed buffers for an object word, as the official constructor stores them."""
        normal, abnormal = self.sentences(object_word)
        ids = backbone.tokenize([normal, abnormal])
        if (ids.argmax(-1) >= ids.shape[-1] - 1).any():
            raise ValueError(f"prompt for {object_word!r} does not fit the {ids.shape[-1]}-token context")
        with torch.no_grad():
            emb = backbone.token_embeddings(ids).float()
        k, start_pos = self.n_abnormal, 1 + self.n_ctx_normal
        start_neg = 1 + self.n_ctx_abnormal + (self.n_ctx_normal if self.share_normal_ctx else 0)
        pos, neg = emb[0][None, None], emb[1][None, None].expand(1, k, -1, -1)
        return {"token_prefix_pos": pos[:, :, :1].clone(), "token_suffix_pos": pos[:, :, start_pos:].clone(),
                "token_prefix_neg": neg[:, :, :1].clone(), "token_suffix_neg": neg[:, :, start_neg:].clone(),
                "tokenized_prompts_pos": ids[0].int()[None, None].clone(),
                "tokenized_prompts_neg": ids[1].int()[None, None].expand(1, k, -1).clone()}

    def buffers_for(self, backbone, object_word: str | None) -> dict[str, torch.Tensor]:
        """The stored buffers (object_word None), or ones rebuilt for another word (cached)."""
        if object_word is None:
            return {name: getattr(self, name) for name in BUFFERS}
        key = (object_word, self.ctx_pos.device)
        if key not in self._word_cache:
            self._word_cache[key] = {n: t.to(self.ctx_pos.device) for n, t in self.token_buffers(backbone, object_word).items()}
        return self._word_cache[key]

    # ------------------------------------------------------------------ prompts and text features
    def prompt_embeddings(self, buffers: dict | None = None, abnormal_shift: torch.Tensor | None = None):
        """(x [L, 1+K, 77, D], token ids [1+K, 77]): row 0 the normal prompt, rows 1..K the abnormal ones.

        abnormal_shift (broadcastable to [L, K, m, D]) is added to the abnormal context (FAPrompt's
        prior); L is its leading size (1 without it)."""
        b = buffers if buffers is not None else self.buffers_for(None, None)
        normal = torch.cat([b["token_prefix_pos"], self.ctx_pos, b["token_suffix_pos"]], dim=2)
        own = self.ctx_neg if abnormal_shift is None else self.ctx_neg + abnormal_shift
        lead, k = own.shape[0], self.n_abnormal
        context = [self.ctx_pos.expand(lead, k, -1, -1)] if self.share_normal_ctx else []
        abnormal = torch.cat([b["token_prefix_neg"].expand(lead, -1, -1, -1), *context, own,
                              b["token_suffix_neg"].expand(lead, -1, -1, -1)], dim=2)
        x = torch.cat([normal.expand(lead, -1, -1, -1), abnormal], dim=1)
        ids = torch.cat([b["tokenized_prompts_pos"].reshape(-1, x.shape[2]),
                         b["tokenized_prompts_neg"].reshape(-1, x.shape[2])])
        return x, ids

    def encode(self, backbone, buffers: dict | None = None, abnormal_shift: torch.Tensor | None = None,
               deep_prompts_fp16: bool = True, truncate: bool = False) -> torch.Tensor:
        """Unnormalised text features [L, 1+K, E] of the prompts (row 0 normal); `truncate`: see
        `Backbone.encode_text_embeddings`."""
        x, ids = self.prompt_embeddings(buffers, abnormal_shift)
        lead, n = x.shape[:2]
        feats = backbone.encode_text_embeddings(x.reshape(lead * n, *x.shape[2:]),
                                                ids.argmax(dim=-1).repeat(lead),
                                                deep_prompts=list(self.compound_prompts_text),
                                                deep_prompts_fp16=deep_prompts_fp16, truncate=truncate)
        return feats.reshape(lead, n, -1)

    # ------------------------------------------------------------------ official checkpoint format
    def official_state_dict(self, extra: dict[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
        """The official `prompt_learner` state dict (CPU copies), `extra` after the buffers. The dead
        projections, identical in every official file, share one storage as in a fresh model's save."""
        state = OrderedDict((k, v.detach().cpu().clone()) for k, v in self.state_dict().items())
        if extra:
            items = list(state.items())
            at = max(i for i, (k, _) in enumerate(items) if k in BUFFERS) + 1
            state = OrderedDict(items[:at] + [(k, v.detach().cpu().clone()) for k, v in extra.items()] + items[at:])
        for suffix in ("weight", "bias"):
            keys = [k for k in state if k.startswith("compound_prompt_projections.") and k.endswith(suffix)]
            if keys and all(torch.equal(state[keys[0]], state[k]) for k in keys):
                for k in keys[1:]:
                    state[k] = state[keys[0]]
        return state

    def check_official_state(self, state: dict, source) -> None:
        """Raise CheckpointError unless `state` has exactly this learner's keys, shapes and dtypes."""
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            detail = "; ".join(part for part in (
                f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
                f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "")
                if part)
            raise CheckpointError(f"{source}: not an official {self.owner} prompt learner of this configuration ({detail}); "
                                  f"pass an official {self.owner} checkpoint, or match the depth option to its "
                                  f"{sum(k.startswith('compound_prompts_text.') for k in state) + 1} deep-prompt layers")
        for key, want in expected.items():
            got = state[key]
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                if isinstance(got, torch.Tensor) and got.is_floating_point() and got.shape[-1:] != want.shape[-1:]:
                    hint = (f"it was trained on a backbone with text width {got.shape[-1]} (ViT-L/14@336: 768), "
                            f"this one has {want.shape[-1]}; pass the matching --backbone")
                else:
                    hint = f"set the options {self.size_options} to those of the checkpoint"
                raise CheckpointError(f"{source}: {key} has shape {shape}, expected {tuple(want.shape)}: {hint}")

    def load_official_state(self, state: dict, source) -> None:
        """Strict load of an official `prompt_learner` state dict (the buffers come from it)."""
        self.check_official_state(state, source)
        self.load_state_dict({k: v.to(self.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
