"""Evaluate a method on a dataset: batched inference per category, the canonical metrics, results
with provenance, resumable at category granularity (zsad evaluate).

Per category the method's raw outputs are concatenated and `finalize`d (so any official per-class
normalisation runs over exactly that category's test images), then scored with zsad_core.metrics.
Each finished category is written atomically to `<out>/categories/<category>.json` together with a
fingerprint of the run's configuration; a rerun with the same configuration skips those and resumes
at the first unfinished category. The dataset numbers are the unweighted means over categories
(undefined categories skipped and counted).
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import AnomalyDataset, collate_batch, load_manifest
from .errors import ZsadError
from .metrics import evaluate_category, macro_average
from .provenance import provenance, sha256_json, write_bytes_atomic, write_json_atomic

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def run_category(method, dataset, *, batch_size: int = 8, device: str = "cpu", progress: bool = True, desc: str = ""):
    """Inference over one category's dataset -> (Prediction, masks uint8 [N,S,S], labels [N])."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    chunks, masks, labels = [], [], []
    method.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out = method(batch["images"].to(device), batch["class_names"])
            chunks.append({k: v.detach().cpu() for k, v in out.items()})
            masks.append(batch["masks"].to(torch.uint8))
            labels.append(batch["labels"])
    raw = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return method.finalize(raw), torch.cat(masks), torch.cat(labels)


def category_metrics(prediction, masks, labels, legacy: bool = False) -> dict[str, float]:
    """Canonical metrics of one category; methods without maps get image metrics only (pixel NaN)."""
    from .metrics import ranking_metrics

    scores = prediction.image_scores.float().numpy()
    if prediction.anomaly_maps is None:
        out = ranking_metrics(scores, labels.numpy(), "image")
        out.update({k: float("nan") for k in METRICS if k.startswith(("pixel", "aupro"))})
        return out
    return evaluate_category(prediction.anomaly_maps.float().numpy(), masks.numpy(), labels.numpy(), scores,
                             legacy=legacy)


def set_category_references(method, root, manifest, category: str, k: int) -> None:
    """Few-shot: the first k (sorted) train/good images of the category become the method's references."""
    refs = AnomalyDataset(root, manifest, split="train", categories=[category], image_size=method.image_size,
                          image_convention=method.image_convention, mask_convention=method.mask_convention)
    if len(refs) < k:
        raise ZsadError(f"{root}/{category}/train/good: {len(refs)} images, fewer than the {k} few-shot references")
    images = torch.stack([refs[i]["image"] for i in range(k)])
    method.set_references(images, refs.object_words[category])


def evaluate(method, root, manifest, out_dir, *, categories=None, batch_size: int = 8, device: str = "cpu",
             legacy: bool = False, save_maps: bool = False, few_shot: int = 0, config: dict | None = None,
             progress: bool = True, log=print) -> dict:
    """Evaluate `method` on the test split of the dataset at `root`; returns and writes the results.

    few_shot=k > 0: before each category, its first k train/good images are given to the method as
    normal references (WinCLIP+, APRIL-GAN few-shot)."""
    out = Path(out_dir)
    (out / "categories").mkdir(parents=True, exist_ok=True)
    manifest_dict = load_manifest(manifest) if manifest is not None else None
    probe = AnomalyDataset(root, manifest_dict, split="test", categories=categories, image_size=method.image_size,
                           image_convention=method.image_convention, mask_convention=method.mask_convention)
    wanted = probe.categories
    run_config = {**method.config(), **(config or {}), "legacy_aupro": legacy, "few_shot": few_shot,
                  "manifest": (manifest_dict or {}).get("id"), "manifest_version": (manifest_dict or {}).get("version"),
                  "root": str(root)}
    fingerprint = sha256_json(run_config)
    per_category = {}
    for category in wanted:
        path = out / "categories" / f"{category}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("config_fingerprint") == fingerprint:
                per_category[category] = done["metrics"]
                log(f"{category}: done earlier, skipped")
                continue
        start = time.time()
        if few_shot:
            set_category_references(method, root, manifest_dict, category, few_shot)
        dataset = AnomalyDataset(root, manifest_dict, split="test", categories=[category],
                                 image_size=method.image_size, image_convention=method.image_convention,
                                 mask_convention=method.mask_convention)
        prediction, masks, labels = run_category(method, dataset, batch_size=batch_size, device=device,
                                                 progress=progress, desc=f"{method.name} {category}")
        metrics = category_metrics(prediction, masks, labels, legacy)
        _save_predictions(out / "predictions" / f"{category}.safetensors", prediction, labels,
                          [str(s.path) for s in dataset.samples], save_maps)
        per_category[category] = metrics
        write_json_atomic(path, {"category": category, "n_images": len(labels), "n_anomalous": int(labels.sum()),
                                 "seconds": round(time.time() - start, 2), "metrics": metrics,
                                 "config_fingerprint": fingerprint})
        log(f"{category}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    names = list(METRICS) + (["aupro_legacy"] if legacy else [])
    means = {}
    for name in names:
        values = [per_category[c].get(name, float("nan")) for c in per_category]
        if all(np.isnan(values)):
            means[name] = {"mean": float("nan"), "n_categories": 0}
        else:
            mean, n = macro_average(values)
            means[name] = {"mean": mean, "n_categories": n}
    result = {"method": method.name, "per_category": per_category, "mean": means,
              "provenance": provenance(run_config, config_fingerprint=fingerprint)}
    write_json_atomic(out / "metrics.json", result)
    _write_csv(out / "metrics.csv", per_category, means, names)
    return result


def _save_predictions(path: Path, prediction, labels, paths, save_maps: bool) -> None:
    from safetensors.torch import save

    tensors = {"image_scores": prediction.image_scores.float().contiguous(), "labels": labels.contiguous()}
    if save_maps and prediction.anomaly_maps is not None:
        tensors["anomaly_maps"] = prediction.anomaly_maps.float().contiguous()
    write_bytes_atomic(path, save(tensors, metadata={"paths": json.dumps(paths)}))


def _write_csv(path: Path, per_category: dict, means: dict, names) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", *names])
    for category, metrics in per_category.items():
        writer.writerow([category, *[f"{metrics.get(n, float('nan')):.6f}" for n in names]])
    writer.writerow(["mean", *[f"{means[n]['mean']:.6f}" for n in names]])
    writer.writerow(["n_categories", *[means[n]["n_categories"] for n in names]])
    write_bytes_atomic(path, buffer.getvalue().encode())
