"""Paper-shaped tables: datasets as rows, metrics as columns (the layout of the ZSAD papers' Table 1 /
Table 2), zsad's numbers and the papers' numbers (each with its trust mark) in one frame.

    ours = {"synth_industrial_b": evaluate_result, ...}
    dataset_table(ours)                                            # rows: our datasets
    beside_paper_table(ours, {"paper": dict(paper="AnomalyCLIP", table="Table 1 (industrial ZSAD)",
                                            method="AnomalyCLIP")})
"""
from __future__ import annotations

import numpy as np

from .workbook import METRIC_LABELS, PAPER_DATASET, PAPER_METRIC

TABLE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")


def _percent(result: dict, metric: str) -> float:
    value = result["mean"].get(metric, {}).get("mean", float("nan"))
    return round(100 * value, 1)


def dataset_table(results: dict, metrics=TABLE_METRICS):
    """{dataset: evaluate() result} -> DataFrame, one row per dataset, means in percent (1 decimal)."""
    import pandas as pd

    return pd.DataFrame({ds: {METRIC_LABELS[m]: _percent(r, m) for m in metrics} for ds, r in results.items()}).T


def beside_paper_table(ours: dict, sources: dict, metrics=TABLE_METRICS, *, ours_label: str = "zsad",
                       paper_datasets=None):
    """Our means and the reported numbers in one Table-1-shaped frame, index (dataset, source).

    ours: {our dataset id: evaluate() result}; a dataset the papers name (PAPER_DATASET) is listed
    under the paper's name, beside the reported rows. sources: {source label: paper_numbers filters},
    e.g. {"paper": dict(paper="AnomalyCLIP", table="Table 1 (industrial ZSAD)", method="AnomalyCLIP")};
    their per-class rows ("Dataset/class") are left out. paper_datasets: restrict (and order) the
    reported datasets (default: all, in the order of the source files). Column `mark`: the trust
    mark of every paper number of the row (`ours_label` for ours). Metrics a source does not report
    are NaN (e.g. the legacy AUPRO, which only zsad computes)."""
    import pandas as pd

    from .paper_tables import paper_numbers

    reported = {label: paper_numbers(**filters) for label, filters in sources.items()}
    reported = {label: frame[~frame.dataset.str.contains("/", regex=False)] for label, frame in reported.items()}
    order = list(paper_datasets) if paper_datasets is not None else list(dict.fromkeys(
        ds for frame in reported.values() for ds in frame.dataset))
    ours_named = {PAPER_DATASET.get(ds, ds): r for ds, r in ours.items()}
    datasets = [ds for ds in ours_named if ds not in order] + order
    rows, index = [], []
    for ds in datasets:
        if ds in ours_named:
            rows.append({**{METRIC_LABELS[m]: _percent(ours_named[ds], m) for m in metrics}, "mark": ours_label})
            index.append((ds, ours_label))
        for label, frame in reported.items():
            hit = frame[frame.dataset == ds]
            if not len(hit):
                continue
            row = {}
            for m in metrics:
                if m not in PAPER_METRIC:
                    row[METRIC_LABELS[m]] = np.nan
                    continue
                level, metric = PAPER_METRIC[m]
                cell = hit[(hit.level == level) & (hit.metric == metric)]
                row[METRIC_LABELS[m]] = float(cell.value.iloc[0]) if len(cell) else np.nan
            row["mark"] = ", ".join(sorted(set(hit.trust)))
            rows.append(row)
            index.append((ds, label))
    columns = [METRIC_LABELS[m] for m in metrics] + ["mark"]
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["dataset", "source"]), columns=columns)
