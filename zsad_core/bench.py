"""Benchmarks: a registry of named entries, each a function that returns a dict of values and seconds.

`zsad bench` runs them and writes one JSON per entry (machine description and provenance included).
Speed targets are checked from these files, never by timed tests. Later work adds entries with
`@benchmark("name", "what it measures")`, e.g. per-method inference or training steps.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable  # run(progress, **options) -> dict; progress(iterable, desc) wraps an iterable in a bar


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, description: str):
    """Register the decorated function as the benchmark `name`."""
    def register(fn):
        BENCHMARKS[name] = Benchmark(name, description, fn)
        return fn
    return register


def machine_info() -> dict:
    """What the timings depend on: CPU model and cores, torch threads and version, GPU, current load."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def best_time(fn, repeats: int = 3):
    """(result, wall seconds, CPU seconds): the smallest of `repeats` calls, the least disturbed by other
    load. On a shared machine the CPU time (this process, all threads) is the steadier of the two."""
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return result, round(min(wall), 3), round(min(cpu), 3)


# ---------------------------------------------------------------------------------------------------
# Data


def synthetic_category(n_images: int = 100, size: int = 256, n_anomalous: int = 50, seed: int = 0):
    """A deterministic category that looks like a detector's output: (maps float32, masks uint8, labels).

    Anomalous images hold 1-3 irregular blobs (an ellipse roughened by a smooth random field), detected
    with random strength; every map has smooth background noise, and some normal images a false-positive
    hot spot. Scores are squashed to (0, 1)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = np.empty((n_images, size, size), np.float32)
    masks = np.zeros((n_images, size, size), np.uint8)
    labels = np.zeros(n_images, np.int64)
    labels[rng.permutation(n_images)[:n_anomalous]] = 1
    for i in range(n_images):
        background = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=6) * 6
        signal = np.zeros((size, size))
        if labels[i]:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.1, 0.9, 2) * size
                ry, rx = rng.uniform(3, 25, 2)
                angle = rng.uniform(0, np.pi)
                u = ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)) / ry
                v = (-(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / rx
                roughness = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=3) * 10
                blob = (u**2 + v**2 + 0.3 * roughness) < 1
                masks[i] |= blob.astype(np.uint8)
                signal += rng.uniform(0.0, 0.6) * ndimage.gaussian_filter(blob.astype(float), 2)
        if rng.random() < 0.2:
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(3, 10)
            signal += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        maps[i] = 1 / (1 + np.exp(-(0.8 * background + 3 * signal - 2)))
    return maps, masks, labels


# ---------------------------------------------------------------------------------------------------
# Entries


@benchmark("aupro", "AUPRO (canonical, 4-connectivity, 200-threshold legacy, MVTec script, anomalib HEAD) and the "
                    "other pixel metrics on 100 synthetic 256x256 maps, 50 anomalous")
def bench_aupro(progress, **_options) -> dict:
    from . import metrics as M
    from . import metrics_variants as V

    start = time.perf_counter()
    maps, masks, labels = synthetic_category()
    data = {"n_images": len(maps), "size": maps.shape[-1], "n_anomalous_images": int(labels.sum()),
            "n_gt_regions_8conn": M.label_regions(masks, 8)[1], "n_gt_regions_4conn": M.label_regions(masks, 4)[1],
            "anomalous_pixel_fraction": float(np.mean(masks != 0)),
            "generation_seconds": round(time.perf_counter() - start, 3), "generator": "zsad_core.bench.synthetic_category(seed=0)"}
    steps = {
        "aupro (canonical, 8-connectivity)": (lambda: M.aupro(maps, masks), 3),
        "aupro 4-connectivity": (lambda: M.aupro(maps, masks, connectivity=4), 1),
        "aupro_legacy (200 thresholds, AnomalyCLIP/FAPrompt/APRIL-GAN)": (lambda: M.aupro_legacy(maps, masks), 3),
        "aupro MVTec AD script behaviour": (lambda: V.aupro_mvtec_script(maps, masks), 1),
        "aupro anomalib HEAD behaviour": (lambda: V.aupro_anomalib_head(maps, masks), 1),
        "pixel_metrics (pixel AUROC/AP/F1-max + aupro, one sort)": (lambda: M.pixel_metrics(maps, masks), 1),
        "evaluate_category (all metrics, legacy included)": (
            lambda: M.evaluate_category(maps, masks, labels, legacy=True), 1),
    }
    results = {}
    canonical = None
    for name in progress(steps, "aupro"):
        fn, repeats = steps[name]
        value, seconds, cpu_seconds = best_time(fn, repeats)
        entry = {"seconds": seconds, "cpu_seconds": cpu_seconds, "repeats_min_of": repeats}
        if isinstance(value, dict):
            entry["values"] = value
        else:
            canonical = value if canonical is None else canonical
            entry.update(value=value, abs_dev_from_canonical=abs(value - canonical))
        results[name] = entry
    return {"data": data, "results": results}


def nearest_patch_multiple(size: int, patch: int) -> int:
    """The input size closest to a method's official one that a backbone's patch size divides (ViT-B-16
    runs the 518 px methods at 512)."""
    return max(patch, round(size / patch) * patch)


def _method_worker(name: str, backbone: str, device: str, bf16: bool, batch_size: int, repeats: int,
                   threads: int | None = None) -> dict:
    """One method's inference and training-step timing (run in a fresh process, so that its peak
    memory is its own)."""
    import resource

    import torch

    from .backbone import load_backbone
    from .methods import create_method
    from .methods.base import method_class

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    bb = load_backbone(backbone, device=device)
    official = method_class(name).default_image_size or bb.native_image_size
    size = nearest_patch_multiple(official, bb.patch_size)
    method = create_method(name, bb, image_size=size).to(device)
    images = torch.randn(batch_size, 3, size, size, device=device)
    names = ["object"] * batch_size
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def infer():
        with torch.no_grad(), autocast:
            out = method(images, names)
        sync()
        return out

    infer()  # warm-up: text features, caches
    _, wall, cpu = best_time(infer, repeats)
    entry = {"image_size": size, "official_image_size": official, "batch_size": batch_size, "inference_seconds_per_batch": wall,
             "inference_images_per_second": round(batch_size / wall, 3), "inference_cpu_seconds_per_batch": cpu}
    if method.stages:
        stage = method.stages[0]
        optimizer, _ = method.make_optimizer(stage, steps_per_epoch=10, epochs=1)
        batch = {"images": images, "masks": (torch.rand(batch_size, size, size, device=device) > 0.9).float(),
                 "labels": torch.arange(batch_size, device=device) % 2, "class_names": names}
        method.train()

        def step():
            with autocast:
                loss = method.training_loss(batch, stage)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()

        step()
        _, wall, cpu = best_time(step, repeats)
        entry.update(train_stage=stage, train_step_seconds=wall, train_step_cpu_seconds=cpu)
    if device.startswith("cuda"):
        entry["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    entry["peak_process_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return entry


@benchmark("methods", "per method at its official resolution: inference images/s, training-step seconds, peak "
                      "memory (GPU, or the process's peak RSS on CPU), on --backbone (tiny, or NAME:random)")
def bench_methods(progress, backbone: str = "tiny", device: str = "cpu", bf16: bool = False, batch_size: int = 2,
                  methods=None, repeats: int = 2, threads: int | None = None, **_options) -> dict:
    import multiprocessing

    from .methods import METHODS, method_class

    method_class("clip_zeroshot")  # loads the registry
    names = list(methods or sorted(METHODS))
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for name in progress(names, "methods"):
        with ctx.Pool(1) as pool:
            try:
                results[name] = pool.apply(_method_worker, (name, backbone, device, bf16, batch_size, repeats, threads))
            except Exception as err:  # noqa: BLE001 - one method's failure is recorded, the others still run
                results[name] = {"error": f"{type(err).__name__}: {err}"}
    return {"backbone": backbone, "device": device, "bf16": bf16, "threads": threads, "methods": results}


def run_benchmarks(names=None, show_progress: bool = True, **options) -> dict[str, dict]:
    """Run the named benchmarks (all by default): {name: {"description", "result", "seconds"}}.
    `options` (backbone, device, bf16, batch_size, methods) go to the entries that take them."""
    from tqdm.auto import tqdm

    unknown = [n for n in names or [] if n not in BENCHMARKS]
    if unknown:
        from .errors import OptionError

        raise OptionError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    def progress(iterable, desc):
        return tqdm(iterable, desc=desc, disable=not show_progress, leave=False)

    out = {}
    for name in names or list(BENCHMARKS):
        start = time.perf_counter()
        result = BENCHMARKS[name].run(progress, **options)
        out[name] = {"description": BENCHMARKS[name].description, "result": result,
                     "seconds": round(time.perf_counter() - start, 3)}
    return out
