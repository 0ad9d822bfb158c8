"""The shared CLIP backbone: open_clip's own model classes plus the hooks the ZSAD methods need.

One `Backbone` wraps an `open_clip.model.CLIP` and adds, without copying CLIP:

* an activation switch (QuickGELU / exact GELU): APRIL-GAN, AA-CLIP and Bayes-PFL rebuild OpenAI CLIP
  with exact GELU in their official code, and their published numbers come from that model;
* the positional embedding resized to any input grid (bilinear, or bicubic with antialias), computed
  on the fly and cached, never written into the model;
* vision taps: the residual stream after any set of blocks (optionally through ln_post / proj), the
  global embedding with or without ln_post, and DPAM (AnomalyCLIP's dual path, V-V / Q-Q / K-K);
* a text transformer that takes prompt *embeddings* (learnable context vectors) and deep prompts
  that overwrite token rows before chosen blocks, plus cached features for fixed prompts.
"""
from __future__ import annotations

import hashlib
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .errors import ZsadError

ACTIVATIONS = ("quick_gelu", "gelu")
INTERPOLATIONS = ("bicubic", "bilinear")
DPAM_VARIANTS = ("vv", "qq", "kk")


class BackboneError(ZsadError):
    """A backbone that cannot be loaded; the message says how to fix it."""


# ----------------------------------------------------------------------------------------- loading
def load_backbone(spec: str, *, activation: str | None = None, device: str | torch.device = "cpu") -> "Backbone":
    """Build a Backbone from a spec.

    * `tiny`: the deterministic tiny CLIP (zsad_core.tiny_clip).
    * `PATH`: a local OpenAI checkpoint (TorchScript archive or state dict) or an open_clip
      checkpoint with OpenAI-style keys (.pt/.pth/.bin/.safetensors); the architecture follows the shapes.
    * `NAME:PATH`: an open_clip model config NAME with weights from a local file.
    * `NAME:random`: the architecture with random weights (benchmarks).
    * `NAME` or `NAME:TAG`: open_clip's pretrained weights (TAG defaults to `openai`), from the local
      cache or downloaded; without network access this fails at once and says how to pass a file.
    `activation` overrides the MLP activation (`quick_gelu` / `gelu`); None keeps the weights' own.
    """
    import open_clip

    spec = str(spec)
    if spec == "tiny":
        from .tiny_clip import build_tiny_clip

        model, native, fp = build_tiny_clip(), "quick_gelu", "tiny:" + _TINY_FINGERPRINT
    elif Path(spec).exists():
        model, native = _load_local_checkpoint(Path(spec))
        fp = "sha256:" + file_sha256(spec)
    else:
        name, _, tag = spec.partition(":")
        if name not in open_clip.list_models():
            raise BackboneError(
                f"backbone {spec!r}: not 'tiny', not an existing file and not an open_clip model name "
                f"(e.g. ViT-L-14-336, ViT-B-16); check the spelling or the path")
        if tag == "random":
            model = open_clip.create_model(name, pretrained=None)
            native, fp = _native_activation(model), f"random:{name}"
        elif tag and Path(tag).exists():
            model = open_clip.create_model(name, pretrained=tag)
            native, fp = _native_activation(model), "sha256:" + file_sha256(tag)
        else:
            tag = tag or "openai"
            model = _create_pretrained(name, tag)
            native, fp = _native_activation(model), f"open_clip:{name}:{tag}"
    model = model.float().eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = Backbone(model, name=spec, fingerprint=fp, native_activation=native)
    if activation is not None:
        backbone.set_activation(activation)
    return backbone


_TINY_FINGERPRINT = "cadbdc0aecfe90f1c2c5f582d68ff242e69c1af3fad6ec5adb1b9f2b17272597"  # sha256 of the recipe's file


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _native_activation(model) -> str:
    block = model.visual.transformer.resblocks[0]
    return "gelu" if isinstance(block.mlp.gelu, nn.GELU) else "quick_gelu"


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_pretrained(name: str, tag: str):
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise BackboneError(f"backbone {name}:{tag}: open_clip has no pretrained tag {tag!r} for {name} "
                            f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    cached = False
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache

            repo = cfg["hf_hub"].rstrip("/")
            cached = any(isinstance(try_to_load_from_cache(repo, f), str)
                         for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"))
        except Exception:  # noqa: BLE001 - a cache probe must never be fatal
            cached = False
    if not cached and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        url = cfg.get("url") or f"https://huggingface.co/{cfg.get('hf_hub', '')}"
        raise BackboneError(
            f"backbone {name}:{tag}: the weights are not in the local cache and the network is unreachable. "
            f"Download them elsewhere ({url}) and pass the file: --backbone /path/to/file.pt "
            f"(OpenAI TorchScript or state dict) or --backbone {name}:/path/to/file")
    try:
        return open_clip.create_model(name, pretrained=tag)
    except Exception as err:  # noqa: BLE001
        raise BackboneError(f"backbone {name}:{tag}: loading failed ({err}); pass a local file with "
                            f"--backbone /path/to/file.pt or --backbone {name}:/path/to/file") from None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_local_checkpoint(path: Path):
    """A local OpenAI / open_clip checkpoint -> (CLIP model, native activation)."""
    from open_clip.model import build_model_from_openai_state_dict

    if path.is_dir():
        raise BackboneError(f"{path}: is a folder; pass the checkpoint file itself")
    state = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI ships TorchScript
                warnings.simplefilter("ignore")
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise BackboneError(f"{path}: not a readable checkpoint ({err.__class__.__name__}); pass an "
                                    "OpenAI .pt, an open_clip .bin/.pt or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "visual.conv1.weight" not in {k.removeprefix("module.") for k in state}:
        raise BackboneError(f"{path}: not a CLIP checkpoint (no 'visual.conv1.weight'); pass an OpenAI or "
                            "open_clip ViT checkpoint, or use --backbone NAME:/path for other layouts")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # OpenAI checkpoints were trained with QuickGELU; an open_clip state dict cannot tell, and each
    # method sets the activation its official code uses anyway.
    model = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None)
    # the builder rounds weights to float16 (OpenAI's own are fp16); reload float32 sources exactly
    model.float().load_state_dict({k: v.float() for k, v in state.items()
                                   if k not in ("input_resolution", "context_length", "vocab_size")})
    return model, "quick_gelu"


# ---------------------------------------------------------------------------------------- backbone
@dataclass
class VisionOutput:
    """Result of `Backbone.encode_image_layers` (token 0 is the class token)."""

    tokens: dict[int, torch.Tensor]  # block (1-based) -> [B, 1+N, C] tapped tokens
    final: torch.Tensor  # [B, 1+N, W] residual stream after the last block (original path under DPAM)
    grid: int  # tokens per side (N = grid**2)
    extras: dict = field(default_factory=dict)


class Backbone(nn.Module):
    def __init__(self, model, *, name: str = "", fingerprint: str = "", native_activation: str = "quick_gelu"):
        super().__init__()
        self.model = model
        self.name = name
        self.fingerprint = fingerprint
        self.native_activation = native_activation
        self.activation = native_activation
        self._pos_cache: dict = {}
        self._text_cache: dict = {}
        import open_clip

        self._tokenizer = open_clip.get_tokenizer("ViT-L-14-336")  # the standard CLIP BPE, context 77

    # ------------------------------------------------------------------ facts about the model
    @property
    def visual(self):
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return self.visual.conv1.kernel_size[0]

    @property
    def native_image_size(self) -> int:
        return self.patch_size * self.native_grid

    @property
    def native_grid(self) -> int:
        return int(round((self.visual.positional_embedding.shape[0] - 1) ** 0.5))

    @property
    def vision_width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def vision_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def grid_for(self, image_size: int) -> int:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        return image_size // self.patch_size

    # ------------------------------------------------------------------ activation
    def set_activation(self, activation: str) -> "Backbone":
        """Swap the MLP activation of every block of both towers (`quick_gelu` or exact `gelu`)."""
        from open_clip.transformer import QuickGELU

        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")
        if activation == self.activation:
            return self
        for blocks in (self.visual.transformer.resblocks, self.model.transformer.resblocks):
            for block in blocks:
                block.mlp.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.activation = activation  # the text cache is keyed by activation, so it stays valid
        return self

    # ------------------------------------------------------------------ positional embedding
    def positional_embedding(self, grid: int, interpolation: str = "bicubic") -> torch.Tensor:
        """The vision positional embedding for a grid x grid input, [1 + grid**2, W], cls row first.

        `bicubic` is open_clip's resize (bicubic, antialias, as APRIL-GAN / AA-CLIP / Bayes-PFL);
        `bilinear` has no antialias (AnomalyCLIP / FAPrompt). Cached; the model is never modified.
        """
        pos = self.visual.positional_embedding
        if grid == self.native_grid:
            return pos
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}")
        key = (grid, interpolation, pos.device, pos.dtype, pos._version)
        if key not in self._pos_cache:
            n = self.native_grid
            img = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
            img = F.interpolate(img, size=(grid, grid), mode=interpolation, align_corners=False,
                                antialias=interpolation == "bicubic")
            img = img.permute(0, 2, 3, 1).reshape(grid * grid, -1)
            self._pos_cache = {key: torch.cat([pos[:1], img], dim=0)}
        return self._pos_cache[key]

    # ------------------------------------------------------------------ vision
    def embed_image(self, images: torch.Tensor, interpolation: str = "bicubic", *,
                    ln_pre: bool = True) -> torch.Tensor:
        """conv1 patches + class token + positional embedding, then ln_pre: [B, 1+N, W].

        ln_pre=False returns the embedded tokens before ln_pre (WinCLIP gathers windows from them).
        """
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, interpolation).to(x.dtype)
        return v.ln_pre(x) if ln_pre else x

    def run_vision_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """All vision blocks on any batch-first token sequence x [B, T, W] that went through ln_pre
        (e.g. WinCLIP's windows, one sequence per window: B = images x windows)."""
        for block in self.visual.transformer.resblocks:
            x = block(x)
        return x

    def encode_image_layers(self, images: torch.Tensor, layers=(), *, interpolation: str = "bicubic",
                            dpam: str | None = None, dpam_start: int = 6, ln_post: bool = False,
                            proj: bool = False, after_block=None, attention=None) -> VisionOutput:
        """Run the vision tower and tap the residual stream after the given blocks (1-based).

        dpam: None, or the attention of the DPAM path (`vv` official AnomalyCLIP; `qq`/`kk` the
        paper's variants). From block `dpam_start` on, a second path v runs beside the original
        path o: o <- Block(o); v <- v + out_proj(softmax(x x^T / sqrt(d)) V), with q, k, V from
        ln_1(o) of the original path (no MLP on v). Taps then read v; `final` is always o.
        after_block(i, x) may return a replacement residual stream (adapters).
        attention: {i: fn(block, h) -> [B, T, W]} replaces block i's attention output (after out_proj)
        on h = ln_1(x); the residual and the MLP are kept (single-path DPAM, as AA-CLIP's "surgery").
        """
        if dpam is not None and dpam not in DPAM_VARIANTS:
            raise ValueError(f"unknown DPAM attention {dpam!r}; use one of {DPAM_VARIANTS} or None")
        layers = sorted(set(int(i) for i in layers))
        if layers and not 1 <= layers[0] <= layers[-1] <= self.vision_layers:
            raise ValueError(f"tapped layers {layers} outside 1..{self.vision_layers}")
        x = self.embed_image(images, interpolation)
        grid = int(round((x.shape[1] - 1) ** 0.5))
        taps, v = {}, None
        for i, block in enumerate(self.visual.transformer.resblocks, start=1):
            if dpam is not None and i >= dpam_start:
                v = x if v is None else v
                v = v + block.attn.out_proj(self_attention(block, block.ln_1(x), dpam))
            if attention is not None and i in attention:
                x = x + block.ls_1(attention[i](block, block.ln_1(x)))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            else:
                x = block(x)
            if after_block is not None:
                x = after_block(i, x)
            if i in layers:
                taps[i] = (v if v is not None else x)
        if ln_post or proj:
            taps = {i: self.project_tokens(t, ln_post=ln_post, proj=proj) for i, t in taps.items()}
        return VisionOutput(tokens=taps, final=x, grid=grid)

    def project_tokens(self, tokens: torch.Tensor, *, ln_post: bool = True, proj: bool = True) -> torch.Tensor:
        if ln_post:
            tokens = self.visual.ln_post(tokens)
        if proj:
            tokens = tokens @ self.visual.proj
        return tokens

    def global_embedding(self, out: VisionOutput, *, ln_post: bool = True) -> torch.Tensor:
        """Class token of the last block @ proj, with ln_post (CLIP) or without (AnomalyCLIP's quirk)."""
        return self.project_tokens(out.final[:, 0], ln_post=ln_post, proj=True)

    def encode_image(self, images: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
        """CLIP's global image embedding ln_post(cls) @ proj, [B, E], not normalised."""
        return self.global_embedding(self.encode_image_layers(images, interpolation=interpolation))

    # ------------------------------------------------------------------ text
    def tokenize(self, texts) -> torch.Tensor:
        return self._tokenizer(list(texts)).to(self.device)

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(token_ids.to(self.device))

    def encode_text_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor, *, deep_prompts=None,
                               deep_prompts_fp16: bool = True, after_block=None,
                               projection: bool = True, truncate: bool = False,
                               checkpoint_blocks: bool = False) -> torch.Tensor:
        """The text transformer on prompt embeddings x [N, L, D] (before the positional embedding).

        deep_prompts: a sequence of [n, D] tensors; before block i (0-based, i = 1..len) rows 1..n of
        every sequence are overwritten by deep_prompts[i-1] (AnomalyCLIP/FAPrompt). Their official
        code casts these to float16 first; `deep_prompts_fp16` reproduces that rounding.
        eot_index [N]: the row read after ln_final. projection: apply text_projection.
        truncate: drop the rows after the last EOT first. The attention is causal, so the EOT
        features are the same (up to float rounding) at a fraction of the cost for short prompts.
        checkpoint_blocks: recompute each block in the backward pass instead of storing its
        activations (training memory; same values and gradients).
        """
        m = self.model
        n_deep = len(deep_prompts) if deep_prompts is not None else 0
        length = x.shape[1]
        if truncate and m.attn_mask is not None:
            rows = max([int(eot_index.max()) + 1] + [1 + p.shape[0] for p in (deep_prompts or [])])
            length = min(length, rows)
        x = x[:, :length] + m.positional_embedding[:length].to(x.dtype)
        mask = m.attn_mask[:length, :length].to(x.dtype) if m.attn_mask is not None else None
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= n_deep:
                n = deep_prompts[i - 1].shape[0]
                prompt = deep_prompts[i - 1].unsqueeze(0).expand(x.shape[0], -1, -1)
                if deep_prompts_fp16:  # cast after the expand, as officially: each prompt's grad is rounded alone
                    prompt = prompt.half()
                x = torch.cat([x[:, :1], prompt.to(x.dtype), x[:, 1 + n:]], dim=1)
            if checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if after_block is not None:
                x = after_block(i + 1, x)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
        return x @ m.text_projection if projection else x

    def encode_text(self, texts, *, cache: bool = True) -> torch.Tensor:
        """CLIP text features ln_final(EOT) @ text_projection, [N, E], not normalised (cached)."""
        texts = tuple(texts)
        key = (texts, self.activation)
        if cache and key in self._text_cache:
            return self._text_cache[key]
        ids = self.tokenize(texts)
        with torch.no_grad():  # truncated after the last EOT: ~5x less work for short prompts
            feats = self.encode_text_embeddings(self.token_embeddings(ids), ids.argmax(dim=-1), truncate=True)
        if cache:
            self._text_cache[key] = feats
        return feats


def self_attention(block, h: torch.Tensor, kind: str = "qk") -> torch.Tensor:
    """Multi-head attention of an open_clip block on h [B, T, W], before out_proj.

    kind names the two projections whose similarity forms the attention (`qk` standard; `vv`, `qq`,
    `kk` the DPAM variants); values are always V.
    """
    attn = block.attn
    heads = attn.num_heads
    b, t, w = h.shape
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda z: z.reshape(b, t, heads, w // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    a, c = {"qk": (q, k), "vv": (v, v), "qq": (q, q), "kk": (k, k)}[kind]
    # softmax(a c^T / sqrt(d)) v; the fused kernel is ~30% faster on CPU than the explicit product
    return F.scaled_dot_product_attention(a, c, v).transpose(1, 2).reshape(b, t, w)
