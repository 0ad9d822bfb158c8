"""Analyses the notebooks share: means over repeated runs (seeds) and inference time per image
(2-D projections of embeddings live in zsad_core.embeddings).

    runs = {"R=1": [wb.evaluate(m1, ds, tag="s0"), wb.evaluate(m1b, ds, tag="s1")], ...}
    mean_over_runs(runs)                       # percent, mean and std over the runs of each row
    time_per_image(method, images, names)      # {"wall_ms", "cpu_ms", "images"}: median per image
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .tables import METRIC_LABELS


def mean_over_runs(runs: dict, metrics=("image_auroc", "image_ap", "pixel_auroc", "aupro")):
    """{row label: [evaluate() result, ...]} -> DataFrame of the dataset means in percent, one column
    pair (metric, "mean" / "std") per metric plus the number of runs; 1 decimal. The std is the
    population std over the runs (0 for a single run); NaN results (undefined metrics) are skipped."""
    import pandas as pd

    rows = {}
    for label, results in runs.items():
        row = {}
        for m in metrics:
            values = np.array([100 * r["mean"][m]["mean"] for r in results if m in r["mean"]], dtype=float)
            values = values[~np.isnan(values)]
            row[(METRIC_LABELS[m], "mean")] = values.mean() if len(values) else np.nan
            row[(METRIC_LABELS[m], "std")] = values.std() if len(values) else np.nan
        row[("runs", "")] = len(results)
        rows[label] = row
    frame = pd.DataFrame(rows).T
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame.astype(float).round(1).astype({("runs", ""): int})


def time_per_image(method, images: torch.Tensor, class_names, *, batch_size: int = 1, warmup: int = 1) -> dict:
    """Median wall and CPU milliseconds per image of the method's batched inference (`method(...)`,
    the raw outputs; the per-class `finalize` is not included), batch_size images at a time (1: the
    official per-image loop). `warmup` batches run first and are not counted. On CUDA the device is
    synchronised around every call."""
    device = next((p.device for p in method.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = [class_names] * len(images) if isinstance(class_names, str) else list(class_names)
    batches = [(images[i:i + batch_size].to(device), names[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    method.eval()
    wall, cpu = [], []
    with torch.no_grad():
        for x, c in batches[:warmup]:
            method(x, c)
        for x, c in batches:
            sync()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            method(x, c)
            sync()
            wall.append((time.perf_counter() - start_wall) / len(x))
            cpu.append((time.process_time() - start_cpu) / len(x))
    return {"wall_ms": 1000 * float(np.median(wall)), "cpu_ms": 1000 * float(np.median(cpu)), "images": len(images)}
