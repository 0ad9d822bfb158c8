"""Ablations for the notebooks: train and evaluate a list of method variants with one Workbook, tabulate
them beside the paper's ablation rows, and plot them.

    variants = [Variant("V-V (official)", "attention", paper_method="AnomalyCLIP (full)"),
                Variant("Q-Q", "attention", ["dpam=qq"]),
                Variant("pre-fix", "layers", ["config=prefix_bug"], weights_from="V-V (official)")]
    runs = run_ablation(wb, "anomalyclip", variants, "synth_industrial_b", epochs=1)
    table = ablation_table(runs, variants, paper="AnomalyCLIP", paper_datasets=["MVTec AD", "VisA"])
    fig = plot_ablation(table, ["I-AUROC", "P-AUROC"])

Every variant is trained on the profile's auxiliary domain with its own options (under
<notebook>/train/<method>-<slug>), unless it names a `checkpoint` to load or another variant whose
trained parameters it evaluates (`weights_from`: inference-time variants, or configurations whose
training is provably identical; with the same options it is the same model, listed again beside another
paper row, and its evaluation is reused). Results resume like any Workbook train/evaluate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ZsadError
from .tables import METRIC_LABELS

ABLATION_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a label, its group, the method options, where its parameters come from,
    and the paper row it corresponds to (a `method` name in the paper tables, or None)."""

    label: str
    group: str
    options: tuple[str, ...] = ()
    weights_from: str | None = None  # label of an earlier variant whose trained parameters are evaluated
    checkpoint: str | Path | None = None  # parameters to load instead of training
    paper_method: str | None = None
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass
class AblationRun:
    variant: Variant
    method: object
    result: dict
    checkpoint: Path | None = None
    history: list = field(default_factory=list)


def run_ablation(wb, method_name: str, variants, dataset: str, *, epochs: int | None = None,
                 max_steps: int | None = None, legacy: bool = False) -> dict[str, AblationRun]:
    """Train (or load) and evaluate every variant on `dataset`; returns {label: AblationRun} in order.
    epochs / max_steps (steps per epoch): the training budget of every trained variant (default: the
    profile's)."""
    runs: dict[str, AblationRun] = {}
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise ZsadError(f"ablation variants need distinct labels (slugs {slugs})")
    # results of another training length are kept apart
    suffix = (f"-e{epochs}" if epochs else "") + (f"-s{max_steps}" if max_steps else "")
    for v in variants:
        tag = f"ablation-{v.slug}{suffix}"
        method = wb.method(method_name, options=list(v.options))
        history = []
        if v.weights_from is not None:
            if v.weights_from not in runs or runs[v.weights_from].checkpoint is None:
                raise ZsadError(f"variant {v.label!r}: weights_from={v.weights_from!r} must name an earlier "
                                "variant with parameters")
            source = runs[v.weights_from]
            checkpoint = source.checkpoint
            if v.options == source.variant.options:  # the same model again (e.g. beside another paper row)
                runs[v.label] = AblationRun(v, source.method, source.result, checkpoint, [])
                continue
            method.load_checkpoint(checkpoint)
        elif v.checkpoint is not None:
            checkpoint = Path(v.checkpoint)
            method.load_checkpoint(checkpoint)
        else:
            summary = wb.train(method, tag=tag, epochs=epochs, max_steps=max_steps)
            history = summary["history"]
            checkpoint = Path(summary["out_dir"]) / "last.safetensors"
        result = wb.evaluate(method, dataset, tag=tag, legacy=legacy)
        runs[v.label] = AblationRun(v, method, result, checkpoint, history)
    return runs


def ablation_table(runs: dict[str, AblationRun], metrics=ABLATION_METRICS, *, paper: str | None = None,
                   paper_datasets=(), paper_metrics=(("image", "AUROC"), ("pixel", "AUROC"))):
    """One row per variant, index (group, variant): our means in percent (1 decimal), then, where a
    variant names a paper row, that row's numbers on each paper dataset and their trust mark."""
    import pandas as pd

    from .paper_tables import paper_numbers

    reported = paper_numbers(paper=paper) if paper else None
    rows, index = [], []
    for label, run in runs.items():
        v = run.variant
        row = {METRIC_LABELS[m]: round(100 * run.result["mean"][m]["mean"], 1) for m in metrics}
        if reported is not None and paper_datasets:
            hit = reported[reported.method == v.paper_method] if v.paper_method else reported.iloc[0:0]
            row["paper row"] = v.paper_method or ""
            for ds in paper_datasets:
                for level, metric in paper_metrics:
                    cell = hit[(hit.dataset == ds) & (hit.level == level) & (hit.metric == metric)]
                    row[f"{ds} {level[0].upper()}-{metric}"] = float(cell.value.iloc[0]) if len(cell) else np.nan
            row["mark"] = ", ".join(sorted(set(hit.trust))) if len(hit) else ""
        rows.append(row)
        index.append((v.group, label))
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["group", "variant"]))


def plot_ablation(table, columns, *, title: str | None = None, size: float = 2.6):
    """Horizontal bars, one panel per column of an ablation table (index (group, variant)); variants of
    a group share a colour, missing values are marked with a dash."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(table.index.get_level_values(0)))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    labels = [f"{v}" for _, v in table.index]
    y = np.arange(len(table))[::-1]
    fig, axes = plt.subplots(1, len(columns), figsize=(size * len(columns) + 1.5, 0.28 * len(table) + 1.0),
                             sharey=True, squeeze=False)
    for ax, column in zip(axes[0], columns):
        values = table[column].to_numpy(dtype=float)
        ax.barh(y, np.nan_to_num(values), color=[colours[g] for g, _ in table.index])
        for yi, value in zip(y, values):
            ax.text(1 if np.isnan(value) else value + 1, yi, "–" if np.isnan(value) else f"{value:.1f}",
                    va="center", fontsize=7)
        ax.set_xlim(0, 110)
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(y, labels)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    fig.legend(handles, groups, loc="lower center", ncol=len(groups), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def training_step_difference(method_a, method_b, batch: dict, stage: str | None = None) -> dict:
    """Run one training step's loss and backward on the same batch with two methods holding the same
    parameters; the totals and the largest gradient difference (e.g. AnomalyCLIP's pre-fix code
    against the fixed layer-24 configuration, whose training the fix promised to keep)."""
    import torch

    grads, totals = [], []
    device = method_a.trainable_parameters(stage or method_a.stages[0])[0].device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    for method in (method_a, method_b):
        stage_name = stage or method.stages[0]
        params = method.trainable_parameters(stage_name)
        for p in params:
            p.grad = None
        terms = method.training_loss(batch, stage_name)
        terms["total"].backward()
        totals.append(float(terms["total"].detach()))
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
    diffs = [float((a - b).abs().max()) for a, b in zip(*grads) if a is not None and b is not None]
    scale = max((float(g.abs().max()) for g in grads[0] if g is not None), default=0.0)
    return {"total_a": totals[0], "total_b": totals[1], "max_grad_difference": max(diffs, default=0.0),
            "max_grad": scale}
