"""The interface every method shares, and the registry that finds a method by name.

A method turns a batch of preprocessed images of one category into raw outputs (`forward`, batched,
no per-image loop), and a whole category's raw outputs into image scores [N] and anomaly maps
[N, S, S] (`finalize`, where official scorings that normalise over the test images of a class
live). `predict` chains the two. Training hooks (`training_loss`, `trainable_parameters`) are used
by the training engine.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import CheckpointError, OptionError

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by its `name` (zsad predict --method NAME)."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type["Method"]:
    from . import _load_all  # noqa: F401 - importing the package registers every method

    _load_all()
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass
class Prediction:
    """Per-image outputs of a method, in input order."""

    image_scores: torch.Tensor  # [N] float32, higher = more anomalous
    anomaly_maps: torch.Tensor | None = None  # [N, S, S] float32 at the method's evaluation size
    extras: dict = field(default_factory=dict)


@dataclass
class NoOptions:
    pass


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement `forward`."""

    name: ClassVar[str] = ""
    has_maps: ClassVar[bool] = True
    activation: ClassVar[str] = "quick_gelu"  # the MLP activation the official code runs CLIP with
    image_convention: ClassVar[str] = "squash"  # zsad_core.preprocess.IMAGE_CONVENTIONS
    mask_convention: ClassVar[str] = "bilinear"  # zsad_core.preprocess.MASK_CONVENTIONS
    default_image_size: ClassVar[int | None] = None  # None: the backbone's native size
    uses_class_name: ClassVar[bool] = True  # whether prompts put the category name (else "object")
    Options: ClassVar[type] = NoOptions

    def __init__(self, backbone, options=None, image_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.options = options if options is not None else self.Options()
        self.image_size = int(image_size or self.default_image_size or backbone.native_image_size)
        backbone.grid_for(self.image_size)  # validates the size against the patch size
        # Methods may share one backbone; each runs it with its own activation.
        self.run_activation = getattr(self.options, "activation", None) or self.activation
        self.register_forward_pre_hook(_use_own_activation)

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor, class_names: list[str]) -> dict[str, torch.Tensor]:
        """Raw outputs for a batch [B, 3, S, S]; must contain `image_scores` (and `anomaly_maps`)."""
        raise NotImplementedError

    def finalize(self, raw: dict[str, torch.Tensor]) -> Prediction:
        """Turn the raw outputs of all images of one category (concatenated) into the prediction."""
        extras = {k: v for k, v in raw.items() if k not in ("image_scores", "anomaly_maps")}
        return Prediction(raw["image_scores"].float(), raw.get("anomaly_maps"), extras)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_name: str = "object", batch_size: int = 8) -> Prediction:
        """Images of one category [N, 3, S, S] -> Prediction (batched forward, then finalize)."""
        self.eval()
        chunks = [self(images[i:i + batch_size].to(self.backbone.device), [class_name] * len(images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        raw = {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}
        return self.finalize(raw)

    # ------------------------------------------------------------------ embedding-space analyses
    # zsad_core.embeddings reads a method's spaces through the next two hooks. The defaults are plain
    # CLIP's (where every CLIP-based method starts); a method that adapts its text or patch space
    # overrides them to return the space its anomaly maps compare (AA-CLIP: adapted text and seg tokens).
    def analysis_prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        """(normal, abnormal) prompt strings of the default text hook: WinCLIP's state words (7 / 4) in
        "a photo of a {}."; methods with their own prompt ensemble may return it instead."""
        from ..prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, ensemble

        return (ensemble(WINCLIP_NORMAL_STATES, ["a photo of a {}."], class_name),
                ensemble(WINCLIP_ANOMALOUS_STATES, ["a photo of a {}."], class_name))

    @torch.no_grad()
    def analysis_text_embeddings(self, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit text embeddings of a class: (normal [n, E], abnormal [m, E]). Default: plain CLIP
        (text_projection) of `analysis_prompts`, run with this method's activation."""
        self.backbone.set_activation(self.run_activation)
        normal, abnormal = self.analysis_prompts(class_name)
        features = torch.nn.functional.normalize(self.backbone.encode_text(normal + abnormal), dim=-1)
        return features[:len(normal)], features[len(normal):]

    @torch.no_grad()
    def analysis_patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit patch embeddings [B, N, E] (row-major grid, class token dropped) of preprocessed images.
        Default: plain CLIP's last-block tokens ln_post(z) @ proj, the space CLIP-based maps compare
        with text."""
        self.backbone.set_activation(self.run_activation)
        last = self.backbone.vision_layers
        out = self.backbone.encode_image_layers(images.to(self.backbone.device), [last], ln_post=True, proj=True)
        return torch.nn.functional.normalize(out.tokens[last][:, 1:], dim=-1)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, path: str | Path) -> None:
        """Load learnable parameters from zsad's own checkpoint (.safetensors) or the method's
        official format (anything else; a file, or a folder where the official test loads several)."""
        path = Path(path)
        if not self.stages:
            raise CheckpointError(f"{path}: method {self.name!r} has no learnable parameters, so it takes no "
                                  "checkpoint; drop --checkpoint")
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or folder")
        if path.suffix == ".safetensors":
            self.load_zsad_checkpoint(path)
        else:
            self.load_official(path)

    def load_official(self, path: Path) -> None:
        raise CheckpointError(f"{path}: method {self.name!r} reads only zsad .safetensors checkpoints")

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """zsad's own format: the learnable tensors in safetensors, the method config as JSON metadata."""
        from safetensors.torch import save

        from ..provenance import write_bytes_atomic

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.learnable_state().items()}
        meta = {"zsad_method": self.name, "config": json.dumps({**self.config(), **(extra or {})}, default=str)}
        write_bytes_atomic(path, save(tensors, metadata=meta))

    def load_zsad_checkpoint(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None
        owner = meta.get("zsad_method")
        if owner != self.name:
            raise CheckpointError(f"{path}: checkpoint of method {owner!r}, not {self.name!r}; pass a "
                                  f"{self.name} checkpoint or use --method {owner}")
        self.load_learnable_state(state)

    def set_references(self, images: torch.Tensor, class_name: str | None = None) -> None:
        """Few-shot: normal reference images [k,3,S,S] (preprocessed) for a class (None: any class)."""
        raise OptionError(f"method {self.name!r} has no few-shot mode")

    def set_draws(self, path: str | Path) -> None:
        """Inject recorded random draws (methods that sample override this)."""
        raise OptionError(f"method {self.name!r} draws no random numbers; drop --draws")

    # ------------------------------------------------------------------ training hooks
    # The training engine (zsad_core.train) drives these. A batch is a dict: images [B,3,S,S]
    # (preprocessed), masks [B,S,S] float {0,1}, labels [B] long, class_names list[str].
    stages: ClassVar[tuple[str, ...]] = ()  # training stages in order; () = not trainable
    recipe: ClassVar[dict] = {}  # official recipe per stage: epochs, batch_size, seed, ...

    def trainable_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, stage: str, steps_per_epoch: int, epochs: int):
        """(optimizer, scheduler or None) of the official recipe for a stage."""
        raise NotImplementedError(f"method {self.name!r} is not trainable")

    def training_loss(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """Named loss terms of one step; "total" is back-propagated."""
        raise NotImplementedError(f"method {self.name!r} is not trainable")

    def learnable_state(self) -> dict[str, torch.Tensor]:
        """Tensors of zsad's own checkpoint (safetensors + JSON config)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_learnable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.learnable_state()) - set(state)
        if missing:
            raise CheckpointError(f"checkpoint lacks {sorted(missing)[:5]}; was it saved by method {self.name!r}?")
        self.load_state_dict(state, strict=False)

    official_checkpoint_name: ClassVar[str] = "official.pth"  # file (or folder) name zsad train exports to

    def export_official(self, path: str | Path) -> None:
        """Write the learnable parameters in the official checkpoint format (a file, or a folder for
        methods whose official test loads several files)."""
        raise NotImplementedError(f"method {self.name!r} has no official checkpoint format")

    # ------------------------------------------------------------------ description
    def config(self) -> dict:
        return {"method": self.name, "image_size": self.image_size, "activation": self.backbone.activation,
                "backbone": self.backbone.name, "options": dataclasses.asdict(self.options)}


def _use_own_activation(method: Method, _args) -> None:
    method.backbone.set_activation(method.run_activation)


# ---------------------------------------------------------------------------- options from --set
def _coerce(value: str, annotation, key: str):
    """Convert one --set string to the type of its Options field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise OptionError(f"option {key}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        items = [_coerce(p, args[0] if args else str, key) for p in value.replace(" ", "").split(",") if p]
        return tuple(items) if origin is tuple else items
    try:
        if annotation is bool:
            return {"1": True, "true": True, "yes": True, "on": True,
                    "0": False, "false": False, "no": False, "off": False}[value.lower()]
        return annotation(value)
    except (KeyError, ValueError, TypeError):
        raise OptionError(f"option {key}={value!r}: expected {getattr(annotation, '__name__', annotation)}") from None


def parse_options(options_cls, assignments=(), **overrides):
    """Build an Options dataclass from `KEY=VALUE` strings (zsad --set) and keyword overrides."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise OptionError(f"--set {item!r}: write KEY=VALUE")
        if key not in fields:
            raise OptionError(f"unknown option {key!r}; options: {', '.join(fields) or 'none'}")
        values[key] = _coerce(value.strip(), hints[key], key)
    for key, value in overrides.items():
        if key not in fields:
            raise OptionError(f"unknown option {key!r}; options: {', '.join(fields) or 'none'}")
        values[key] = value
    options = options_cls(**values)
    for key, hint in hints.items():  # Literal fields set from Python get the same check
        if typing.get_origin(hint) is typing.Literal and getattr(options, key) not in typing.get_args(hint):
            raise OptionError(f"option {key}={getattr(options, key)!r}: choose one of "
                              f"{', '.join(map(str, typing.get_args(hint)))}")
    return options


def create_method(name: str, backbone, *, options=(), image_size: int | None = None, **overrides) -> Method:
    """Instantiate a registered method on a backbone with options from `KEY=VALUE` strings."""
    cls = method_class(name)
    return cls(backbone, parse_options(cls.Options, options, **overrides), image_size=image_size)


def read_official_checkpoint(path: str | Path, key: str, method: str) -> dict[str, torch.Tensor]:
    """torch.load an official checkpoint (on CPU, weights only) and return `ckpt[key]`, with errors
    that say which method the file does not belong to."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err.__class__.__name__}); pass the "
                              f"official {method} .pth file or a zsad .safetensors checkpoint") from None
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = ", ".join(list(ckpt)[:5]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an official {method} checkpoint (expected key {key!r}, found "
                              f"{found}); pass the file the official {method} code saved")
    return ckpt[key]
