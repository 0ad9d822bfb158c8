"""APRIL-GAN (Chen, Han & Zhang 2023, VAND challenge): CLIP plus one linear adapter per tapped block.

Text prototypes, once per class c: T_c = [t_normal, t_abnormal] (E x 2), each column
t = norm(mean_p norm(CLIP_text(p))) over 7 normal / 5 abnormal states x 35 templates (245 / 175 prompts).

Zero-shot, with z_l the raw residual stream after block l (no ln_post, no proj), l in L = (6, 12, 18, 24):

    s(x)  = softmax(100 * norm(f(x)) T_c)[abnormal]                 f = ln_post(cls) @ proj
    A_l   = 100 * norm(W_l z_l[1:] + b_l) T_c                        [2, g, g] patch logits
    M_l   = softmax(Up(A_l))[abnormal]                               Up: bilinear, align_corners
    M     = sum_l M_l                                                 in [0, |L|]

Few-shot, with memory R_l = raw tokens z_l[1:] of k normal reference images (no adapter):

    D_l(p) = min_{r in R_l} (1 - cos(z_l(p), r)),    M_fs = M + sum_l Up(D_l)
    s_fs   = 0.5 * (s + minmax(max_p M_fs))     min-max over the class's test images (in `finalize`)

Training (only W_l, b_l; CLIP and T frozen): loss = sum_l Focal(softmax(Up(A_l)), gt) + Dice(M_l, gt),
Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, seed 111, on the test split of the other dataset
(MVTec <-> VisA; MVTec also swaps a sample for a 2x2 mosaic with p = 0.2, a data-side step).

Official behaviour reproduced by default (ByChelsea/VAND-APRIL-GAN):
* exact GELU in both towers (`activation="gelu"`): the official code rebuilds CLIP at 518 px from a
  json without `quick_gelu`, although OpenAI CLIP was trained with QuickGELU. `activation=quick_gelu`
  runs the backbone as trained (the fix);
* 518 px squashed input, positional embedding resized bicubic with antialias;
* softmax after upsampling, the map is the plain sum over layers (no smoothing, no normalisation);
* the zero-shot image score ignores the map; the few-shot one is transductive: its min-max runs over
  all test images of the class (`predict` call). With one image (or equal maxima) the official
  0/0 gives NaN; here the min-max term is 0 then, with a warning;
* a training batch of one image: the official `gt.squeeze()` drops the batch axis, so Dice treats
  every image *row* as a sample (`single_image_dice="rows"`); `"image"` is the intended per-image Dice.
* The official k-shot memory is drawn with replacement (`torch.randint`); here the caller passes the
  reference images (`reference_images=a.png,b.png`, or `set_references(tensor)`), so duplicates are
  the caller's choice.
The technical report describes the method only at the level of the equations above; the options fix
the code's behaviour it does not describe (`activation`, `single_image_dice`).

Checkpoints: the official `{'trainable_linearlayer': {fc.i.weight [E, W], fc.i.bias [E]}}` (the
released mvtec_pretrained.pth / visa_pretrained.pth; fc.i maps feature_layers[i]) loads with
--checkpoint and is written by `export_official`. Without a checkpoint the adapters are PyTorch's
default random init and the maps mean nothing.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, OptionError
from ..losses import dice_loss, focal_loss
from ..prompts import aprilgan_prompts
from .base import Method, Prediction, read_official_checkpoint, register

OFFICIAL_KEY = "trainable_linearlayer"


@register
class AprilGAN(Method):
    name = "aprilgan"
    activation = "gelu"
    image_convention = "squash"
    mask_convention = "bilinear"
    default_image_size = 518

    @dataclass
    class Options:
        feature_layers: tuple[int, ...] = (6, 12, 18, 24)  # blocks (1-based) with an adapter
        few_shot_layers: tuple[int, ...] = (6, 12, 18, 24)  # blocks whose raw tokens form the memory
        reference_images: tuple[str, ...] = ()  # few-shot: normal reference image files (any class)
        activation: Literal["gelu", "quick_gelu"] = "gelu"  # gelu: official; quick_gelu: CLIP as trained
        single_image_dice: Literal["rows", "image"] = "rows"  # rows: official quirk for a batch of one

    stages = ("adapters",)
    recipe = {"adapters": {
        "optimizer": "Adam", "lr": 1e-3, "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0.0,
        "schedule": "constant", "batch_size": 8, "shuffle": True, "seed": 111,
        # train.sh: 3 epochs when training on MVTec (to test VisA), 15 on VisA (to test MVTec, the
        # usual benchmark, hence the default). A checkpoint is saved after every epoch.
        "epochs": 15, "epochs_by_train_dataset": {"mvtec": 3, "visa": 15},
        "train_split": "test split of the other dataset (MVTec <-> VisA)",
        "mosaic_rate_by_train_dataset": {"mvtec": 0.2, "visa": 0.0},  # 2x2 mosaic of 4 same-class images
        "image_size": 518,
    }}

    def __init__(self, backbone, options=None, image_size=None):
        super().__init__(backbone, options, image_size)
        o = self.options
        for key in ("feature_layers", "few_shot_layers"):
            layers = tuple(int(i) for i in getattr(o, key))
            if not layers or not all(1 <= i <= backbone.vision_layers for i in layers):
                raise OptionError(f"option {key}={layers}: give blocks in 1..{backbone.vision_layers} "
                                  f"(e.g. {key}=6,12,18,24 for ViT-L, 3,6,9,12 for ViT-B)")
            setattr(o, key, layers)
        o.reference_images = tuple(str(p) for p in o.reference_images)
        for path in o.reference_images:
            if not Path(path).is_file():
                raise OptionError(f"option reference_images: {path}: no such file (check the path)")
        # fc.i maps feature_layers[i]; the names match the official LinearLayer's state dict
        self.fc = nn.ModuleList(nn.Linear(backbone.vision_width, backbone.embed_dim) for _ in o.feature_layers)
        self.memory: dict[str | None, dict[int, torch.Tensor]] = {}  # class (None: any) -> layer -> [k*N, W]
        self.trained = False  # True once a checkpoint is loaded or training ran (untrained maps get a warning)

    # ------------------------------------------------------------------ text
    def text_features(self, class_name: str) -> torch.Tensor:
        """T_c [E, 2]: column 0 normal, column 1 abnormal, each L2-normalised (prompt features cached)."""
        columns = [F.normalize(F.normalize(self.backbone.encode_text(prompts), dim=-1).mean(0), dim=0)
                   for prompts in aprilgan_prompts(class_name)]
        return torch.stack(columns, dim=1)

    def batch_text_features(self, class_names: list[str]) -> torch.Tensor:
        names = sorted(set(class_names))
        per_class = torch.stack([self.text_features(n) for n in names])
        return per_class[[names.index(n) for n in class_names]]  # [B, E, 2]

    # ------------------------------------------------------------------ vision
    def encode(self, images: torch.Tensor):
        """One vision pass: the taps of feature and few-shot layers, and the global embedding."""
        layers = set(self.options.feature_layers)
        if self.memory_wanted():
            layers |= set(self.options.few_shot_layers)
        return self.backbone.encode_image_layers(images, layers, interpolation="bicubic")

    def image_probabilities(self, out, text: torch.Tensor) -> torch.Tensor:
        """softmax(100 * norm(f) T) [B, 2] from the global embedding f = ln_post(cls) @ proj."""
        f = F.normalize(self.backbone.global_embedding(out, ln_post=True), dim=-1)
        return (100.0 * f.unsqueeze(1) @ text).squeeze(1).softmax(dim=-1)

    def patch_logits(self, out, text: torch.Tensor) -> list[torch.Tensor]:
        """A_l = 100 * norm(fc_l(z_l[1:])) T per feature layer, [B, 2, g, g]."""
        logits = []
        for fc, layer in zip(self.fc, self.options.feature_layers):
            a = fc(out.tokens[layer][:, 1:])
            a = a / a.norm(dim=-1, keepdim=True)  # as the official in-place division (no eps)
            logits.append((100.0 * a @ text).transpose(1, 2).reshape(a.shape[0], 2, out.grid, out.grid))
        return logits

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def layer_probabilities(self, out, text: torch.Tensor) -> list[torch.Tensor]:
        """softmax(Up(A_l)) [B, 2, S, S] per feature layer (upsampling before the softmax, as official)."""
        return [self.upsample(logits).softmax(dim=1) for logits in self.patch_logits(out, text)]

    # ------------------------------------------------------------------ few-shot memory
    @torch.no_grad()
    def set_references(self, images: torch.Tensor, class_name: str | None = None) -> None:
        """Few-shot memory from k normal reference images [k, 3, S, S], preprocessed like the test
        images (zsad_core.preprocess.load_images(paths, 518, "squash")). class_name None: any class."""
        if images.dim() != 4 or images.shape[-1] != self.image_size:
            raise OptionError(f"reference images must be [k, 3, {self.image_size}, {self.image_size}], "
                              f"got {list(images.shape)}")
        self.backbone.set_activation(self.run_activation)
        out = self.backbone.encode_image_layers(images.to(self.backbone.device), self.options.few_shot_layers,
                                                interpolation="bicubic")
        self.memory[class_name] = {layer: out.tokens[layer][:, 1:].reshape(-1, out.tokens[layer].shape[-1])
                                   for layer in self.options.few_shot_layers}

    def clear_references(self) -> None:
        self.memory.clear()

    def memory_wanted(self) -> bool:
        return bool(self.memory or self.options.reference_images)

    def memory_for(self, class_name: str) -> dict[int, torch.Tensor] | None:
        if None not in self.memory and self.options.reference_images:
            from ..preprocess import load_images

            self.set_references(load_images(self.options.reference_images, self.image_size, self.image_convention))
        return self.memory.get(class_name, self.memory.get(None))

    def few_shot_distances(self, out, class_names: list[str]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """D_l [B, g, g] = min over the class's memory of 1 - cos(raw token, raw memory token), and a [B]
        mask of the images that have a memory (the others get D = 0)."""
        b, g = len(class_names), out.grid
        distances = {layer: out.tokens[layer].new_zeros(b, g, g) for layer in self.options.few_shot_layers}
        has_memory = torch.zeros(b, dtype=torch.bool)
        for name in sorted(set(class_names)):
            memory = self.memory_for(name)
            if memory is None:
                continue
            rows = torch.tensor([i for i, n in enumerate(class_names) if n == name])
            has_memory[rows] = True
            for layer, bank in memory.items():
                tokens = F.normalize(out.tokens[layer][rows, 1:], dim=-1)
                cos = tokens @ F.normalize(bank.to(tokens.device), dim=-1).T  # [b, N, k*N]
                distances[layer][rows.to(tokens.device)] = (1 - cos).amin(dim=-1).reshape(-1, g, g)
        return distances, has_memory

    # ------------------------------------------------------------------ inference
    def forward(self, images, class_names):
        text = self.batch_text_features(class_names)
        out = self.encode(images)
        zero_shot_score = self.image_probabilities(out, text)[:, 1]
        anomaly_map = sum(p[:, 1] for p in self.layer_probabilities(out, text))
        few_shot = torch.zeros(len(images), dtype=torch.bool)
        if self.memory_wanted():
            distances, few_shot = self.few_shot_distances(out, class_names)
            anomaly_map = anomaly_map + sum(self.upsample(d.unsqueeze(1))[:, 0] for d in distances.values())
        return {"image_scores": zero_shot_score, "anomaly_maps": anomaly_map,
                "zero_shot_scores": zero_shot_score, "few_shot": few_shot.to(images.device)}

    def finalize(self, raw):
        """Few-shot images: s = 0.5 * (zero-shot score + min-max over these images of the map's max)."""
        scores = raw["zero_shot_scores"].clone().float()
        few_shot = raw["few_shot"].bool().cpu()
        if few_shot.any():
            peak = raw["anomaly_maps"][few_shot].flatten(1).amax(dim=1).float()
            spread = peak.max() - peak.min()
            if spread > 0:
                normalised = (peak - peak.min()) / spread
            else:
                warnings.warn("aprilgan few-shot image score: the min-max over the test images is undefined "
                              "(one image, or equal maxima; the official code gives NaN); its term is set to 0. "
                              "Score all test images of a class in one call.", stacklevel=2)
                normalised = torch.zeros_like(peak)
            scores[few_shot] = 0.5 * (scores[few_shot] + normalised)
        extras = {k: v for k, v in raw.items() if k not in ("image_scores", "anomaly_maps")}
        return Prediction(scores, raw["anomaly_maps"], extras)

    def predict(self, images, class_name="object", batch_size=8):
        if not self.trained:
            warnings.warn("aprilgan: no checkpoint loaded, so the linear adapters are untrained (random) and "
                          "the anomaly maps mean nothing; pass --checkpoint (e.g. the official "
                          "mvtec_pretrained.pth / visa_pretrained.pth)", stacklevel=2)
        return super().predict(images, class_name, batch_size)

    # ------------------------------------------------------------------ training
    def trainable_parameters(self, stage=None):
        return list(self.fc.parameters())

    def make_optimizer(self, stage, steps_per_epoch, epochs):
        r = self.recipe["adapters"]
        return torch.optim.Adam(self.trainable_parameters(stage), lr=r["lr"], betas=r["betas"], eps=r["eps"],
                                weight_decay=r["weight_decay"]), None

    def training_loss(self, batch, stage="adapters"):
        """sum over layers of Focal(softmax(Up(A_l)), gt) + Dice(M_l, gt), in the official order."""
        self.trained = True  # the adapters are being trained: no "untrained" warning afterwards
        self.backbone.set_activation(self.run_activation)
        masks = batch["masks"].to(self.backbone.device)
        with torch.no_grad():
            text = self.batch_text_features(batch["class_names"])
            out = self.backbone.encode_image_layers(batch["images"].to(self.backbone.device),
                                                    self.options.feature_layers, interpolation="bicubic")
        terms, total = {}, 0
        for layer, probs in zip(self.options.feature_layers, self.layer_probabilities(out, text)):
            abnormal = probs[:, 1]
            if len(masks) == 1 and self.options.single_image_dice == "rows":
                abnormal, dice_masks = abnormal[0], masks[0]  # official gt.squeeze(): rows become samples
            else:
                dice_masks = masks
            terms[f"focal_layer{layer}"] = focal_loss(probs, masks)
            terms[f"dice_layer{layer}"] = dice_loss(abnormal, dice_masks)
            total = total + terms[f"focal_layer{layer}"] + terms[f"dice_layer{layer}"]
        terms["total"] = total
        return terms

    # ------------------------------------------------------------------ checkpoints
    def load_learnable_state(self, state):
        super().load_learnable_state(state)
        self.trained = True

    def load_official(self, path: Path) -> None:
        state = read_official_checkpoint(path, OFFICIAL_KEY, "APRIL-GAN")
        expected = {k: tuple(v.shape) for k, v in self.fc.state_dict().items()}
        found = {k.removeprefix("fc."): v for k, v in state.items()} if isinstance(state, dict) else {}
        if set(found) != set(expected) or any(not isinstance(v, torch.Tensor) for v in found.values()):
            n = len({k.split(".")[1] for k in state if k.startswith("fc.")}) if isinstance(state, dict) else 0
            raise CheckpointError(
                f"{path}: the APRIL-GAN checkpoint has {n} adapters (fc.0..), the method {len(self.fc)} "
                f"(feature_layers={','.join(map(str, self.options.feature_layers))}); set --set feature_layers=... "
                f"to the layers it was trained with")
        for key, shape in expected.items():
            if tuple(found[key].shape) != shape:
                raise CheckpointError(
                    f"{path}: fc.{key} has shape {list(found[key].shape)}, this backbone needs {list(shape)} "
                    f"(vision width {self.backbone.vision_width}, embed dim {self.backbone.embed_dim}); pass the "
                    f"--backbone the checkpoint was trained on (ViT-L-14-336 for the released ones)")
        self.fc.load_state_dict({k: v.float() for k, v in found.items()})
        self.trained = True

    def export_official(self, path):
        """torch.save({'trainable_linearlayer': {'fc.i.weight', 'fc.i.bias'}}) as the official train.py."""
        from ..provenance import write_bytes_atomic

        buffer = io.BytesIO()
        torch.save({OFFICIAL_KEY: {f"fc.{k}": v.detach().cpu().clone() for k, v in self.fc.state_dict().items()}},
                   buffer)
        write_bytes_atomic(path, buffer.getvalue())
