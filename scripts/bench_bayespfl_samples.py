"""Inference time of Bayes-PFL with R Monte-Carlo rounds, relative to R = 1, on one batch.

    python scripts/bench_bayespfl_samples.py [--backbone tiny] [--device cpu] [--batch 4] [--size 518]

All B.R prompt pairs of a batch go through the text tower in one call, so R multiplies the text and
map work but not the vision pass. Prints the time per forward (median of --repeat runs) per R, the
ratio to R = 1, and the share of the vision pass.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zsad_core.backbone import load_backbone
from zsad_core.methods import create_method


def timed(fn, device: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, device=args.device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    names = ["bottle"] * args.batch
    method = create_method("bayespfl", backbone, image_size=args.size).to(args.device).eval()
    with torch.no_grad():
        method(images, names)  # warm-up
        vision = timed(lambda: method.encode_image(images), args.device, args.repeat)
        base = None
        for r in args.samples:
            method.options.samples = r
            method.reset_sampling()
            t = timed(lambda: method(images, names), args.device, args.repeat)
            base = base or t
            print(f"R={r:3d}: {t:7.3f} s per batch of {args.batch} ({t / base:5.2f}x R={args.samples[0]}; "
                  f"vision pass {vision:.3f} s = {vision / t:.0%})")


if __name__ == "__main__":
    main()
