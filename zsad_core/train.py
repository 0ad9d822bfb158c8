"""The training engine shared by every trainable method (zsad train).

The method supplies the official recipe through its hooks (`stages`, `recipe`, `make_optimizer`,
`training_loss`); the engine runs the papers' protocol around them:

* data: the auxiliary dataset's *test* split with all categories pooled (built by the caller);
* for each stage: seeded shuffling (one generator per epoch, so a resumed run draws the same batches
  as an uninterrupted one), the optimizer and schedule of the recipe, a tqdm progress bar and a loss
  log (`losses.jsonl`, one line per step);
* after every epoch: the learnable parameters as `<stage>_epoch<N>.safetensors` (zsad's format, the
  method config in its metadata) plus `trainer_state.pt` (optimizer, scheduler, RNG states), written
  atomically; `last.safetensors` always points to the newest parameters;
* resume: rerun the same command and training continues after the last finished epoch; rerun with
  more --epochs and a finished last stage is continued (a schedule that depends on the number of
  epochs is then not the one a single longer run would use).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.loader import collate_batch
from .errors import ZsadError
from .provenance import provenance, write_bytes_atomic, write_json_atomic

STATE_FILE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save_state(out: Path, state: dict) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(out / STATE_FILE, buffer.getvalue())


def train(method, dataset, out_dir, *, epochs: int | None = None, batch_size: int | None = None,
          seed: int | None = None, device: str = "cpu", max_steps: int | None = None, config: dict | None = None,
          progress: bool = True, log=print) -> dict:
    """Train `method` on `dataset` (items: image, mask, label, class_name) into `out_dir`.

    epochs / batch_size / seed override the official recipe of every stage; max_steps caps the steps
    per epoch (quick smoke runs). Returns a summary dict (also written to `summary.json`).
    """
    from tqdm.auto import tqdm

    if not method.stages:
        raise ZsadError(f"method {method.name!r} has no learnable parameters; nothing to train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False) if (out / STATE_FILE).exists() else None
    if resume is not None:
        method.load_zsad_checkpoint(out / "last.safetensors")
        log(f"resuming after stage {resume['stage']!r} epoch {resume['epoch']} ({out})")
    method.to(device)
    run_config = {**method.config(), **(config or {}), "epochs_override": epochs, "batch_size_override": batch_size,
                  "seed_override": seed, "max_steps": max_steps, "dataset_size": len(dataset)}
    write_json_atomic(out / "config.json", run_config)
    history = []
    for stage_index, stage in enumerate(method.stages):
        recipe = dict(method.recipe.get(stage, {}))
        n_epochs = int(epochs or recipe.get("epochs", 1))
        bs = int(batch_size or recipe.get("batch_size", 8))
        stage_seed = int(seed if seed is not None else recipe.get("seed", 0))
        done_stages = resume["stages_done"] if resume else []
        # a finished last stage is continued when more epochs are asked for now (--epochs raised)
        extend = bool(resume) and resume["stage"] == stage and resume["epoch"] < n_epochs
        if stage in done_stages and not extend:
            if resume and resume["stage"] == stage and resume["epoch"] > n_epochs:
                log(f"stage {stage!r} was trained for {resume['epoch']} epochs, more than the {n_epochs} asked; "
                    "kept as it is (use a new --out to train fewer)")
            continue
        start_epoch = resume["epoch"] if resume and resume["stage"] == stage else 0
        steps_per_epoch = min(-(-len(dataset) // bs), max_steps or 10**12)
        optimizer, scheduler = method.make_optimizer(stage, steps_per_epoch, n_epochs)
        if start_epoch:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            _set_rng_state(resume["rng"])
        else:
            seed_everything(stage_seed)
        method.train()
        for epoch in range(start_epoch, n_epochs):
            shuffle = torch.Generator().manual_seed(stage_seed * 100003 + epoch)
            loader = DataLoader(dataset, batch_size=bs, shuffle=True, generator=shuffle, collate_fn=collate_batch)
            sums, count, start = {}, 0, time.time()
            bar = tqdm(loader, total=steps_per_epoch, desc=f"{method.name} {stage} {epoch + 1}/{n_epochs}",
                       disable=not progress, leave=False)
            for step, batch in enumerate(bar):
                if step >= steps_per_epoch:
                    break
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                losses = method.training_loss(batch, stage)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                if scheduler is not None and recipe.get("scheduler_interval", "step") == "step":
                    scheduler.step()
                values = {k: float(v.detach()) for k, v in losses.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.set_postfix(loss=f"{values['total']:.4f}")
                with open(out / "losses.jsonl", "a") as f:
                    f.write(json.dumps({"stage": stage, "epoch": epoch + 1, "step": step + 1, **values}) + "\n")
            if scheduler is not None and recipe.get("scheduler_interval") == "epoch":
                scheduler.step()
            means = {k: v / max(count, 1) for k, v in sums.items()}
            history.append({"stage": stage, "epoch": epoch + 1, "steps": count,
                            "seconds": round(time.time() - start, 2), **means})
            log(f"{stage} epoch {epoch + 1}/{n_epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            ckpt = out / f"{stage}_epoch{epoch + 1}.safetensors"
            method.save_checkpoint(ckpt, {"stage": stage, "epoch": epoch + 1})
            method.save_checkpoint(out / "last.safetensors", {"stage": stage, "epoch": epoch + 1})
            finished = epoch + 1 == n_epochs
            _save_state(out, {"stage": stage, "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict() if scheduler is not None else None,
                              "rng": _rng_state(),
                              "stages_done": list(method.stages[:stage_index + (1 if finished else 0)])})
        resume = None
    method.eval()
    summary = {"method": method.name, "out_dir": str(out), "history": history,
               "provenance": provenance(run_config)}
    write_json_atomic(out / "summary.json", summary)
    return summary
