"""How far the AnomalyCLIP training-step gradients are from a float64 computation: the golden's and ours.

For each configuration, the golden step is recomputed by zsad_core in float32 (as the tests do) and
in float64 (the same code, every tensor in double, the fp16 rounding of the deep prompts kept), and
each gradient is compared elementwise at the golden README's tolerance (ctx: atol 1e-5, rtol 1e-4;
deep prompts: atol 1e-5, rtol 2e-3). A ratio > 1 means "outside the tolerance".

    PYTHONPATH=. python scripts/anomalyclip_gradient_precision.py     # about 1-2 min on 2 CPU cores
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden_data"
sys.path.insert(0, str(ROOT))

from zsad_core.backbone import VisionOutput, load_backbone  # noqa: E402
from zsad_core.methods import create_method  # noqa: E402
from zsad_core.preprocess import load_images, preprocess_mask  # noqa: E402

NAMES = ["brick_good", "brick_scratch", "gravel_good", "gravel_stain"]


def ratio(actual, expected, atol, rtol):
    err = (actual.double() - expected.double()).abs()
    return (err / (atol + rtol * expected.double().abs())).max().item()


def gradients(dtype, vision, config, labels, masks, order):
    backbone = load_backbone("tiny")
    method = create_method("anomalyclip", backbone, options=[f"config={config}"])
    method.load_checkpoint(GOLDEN / "anomalyclip" / "checkpoint_init.pth")
    backbone.model.to(dtype)
    method.to(dtype)
    batch_vision = VisionOutput(tokens={k: t[order].to(dtype) for k, t in vision.tokens.items()},
                                final=vision.final[order].to(dtype), grid=vision.grid)
    terms = method.loss_terms(batch_vision, method.text_features(["object"] * 4), labels[order], masks[order].to(dtype))
    terms["total"].backward()
    return {k: p.grad for k, p in method.prompt_learner.named_parameters() if p.grad is not None}


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    paths = [GOLDEN / "inputs" / f"{n}.png" for n in NAMES]
    images = load_images(paths, 518, "squash")
    labels = load_file(str(GOLDEN / "anomalyclip" / "inputs.safetensors"))["labels"]
    masks = torch.stack([preprocess_mask(Image.open(p.with_name(p.stem + "_mask.png")) if y else None, 518)
                         for p, y in zip(paths, labels)]).float()
    visions = {}
    for dtype in (torch.float32, torch.float64):
        backbone = load_backbone("tiny")
        method = create_method("anomalyclip", backbone, options=["config=multilayer"]).to(dtype)
        backbone.model.to(dtype)
        backbone.set_activation("quick_gelu")
        with torch.no_grad():
            visions[dtype] = method.encode_image(images.to(dtype))
    print(f"{'config':<11} {'gradient':<24} {'max|g|':>7} {'golden~f64':>10} {'ours~f64':>9} {'ours~golden':>11}")
    for config in ("main", "multilayer", "prefix_bug"):
        ref = load_file(str(GOLDEN / "anomalyclip" / f"train_{config}.safetensors"))
        order = ref["batch_order"]
        g32 = gradients(torch.float32, visions[torch.float32], config, labels, masks, order)
        g64 = gradients(torch.float64, visions[torch.float64], config, labels, masks, order)
        for name in g32:
            tol = (1e-5, 1e-4) if name.startswith("ctx") else (1e-5, 2e-3)
            golden = ref[f"grad.{name}"]
            print(f"{config:<11} {name:<24} {golden.abs().max().item():7.3f} {ratio(golden, g64[name], *tol):10.2f} "
                  f"{ratio(g32[name], g64[name], *tol):9.2f} {ratio(g32[name], golden, *tol):11.2f}")


if __name__ == "__main__":
    main()
