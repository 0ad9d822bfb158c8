"""The notebooks' tables: zsad's means in percent (one decimal), and the papers' numbers beside them,
each paper number with its trust mark (results/paper, `zsad_core.paper_tables`).

    ours = {"synth_industrial_b": evaluate_result, ...}
    dataset_table(ours)                                   # rows: our datasets (Table 1 / Table 2 layout)
    method_table({"AnomalyCLIP": ours, "WinCLIP": ...})   # rows: methods, columns (dataset, metric)
    beside_paper_rows(ours, {"paper": dict(paper="AnomalyCLIP", table="Table 1 (industrial ZSAD)",
                                           method="AnomalyCLIP")})   # our row above the paper's rows
    beside_paper_table(ours, paper="FAPrompt", method="FAPrompt")    # the paper's table, ours beside each number
    beside_paper({("AnomalyCLIP", ds): result}, {"AnomalyCLIP": dict(paper=..., method=..., dataset="VisA")})  # long
"""
from __future__ import annotations

import numpy as np

METRIC_LABELS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
                 "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "aupro": "AUPRO",
                 "aupro_legacy": "AUPRO (legacy)"}
# our dataset ids -> the names the paper tables use
PAPER_DATASET = {"mvtec_ad": "MVTec AD", "visa": "VisA", "mpdd": "MPDD", "btad": "BTAD", "sdd_kolektorsdd": "SDD",
                 "dagm2007": "DAGM", "dtd_synthetic": "DTD-Synthetic", "headct": "HeadCT", "brainmri": "BrainMRI",
                 "br35h": "Br35H", "isic2016": "ISIC", "cvc_clinicdb": "CVC-ClinicDB", "cvc_colondb": "CVC-ColonDB",
                 "kvasir": "Kvasir", "endo": "Endo", "tn3k": "TN3K", "ksdd2": "KSDD2", "rsdd": "RSDD",
                 "covid19_radiography": "COVID-19"}
# (level, metric) in the paper tables for each of our metric names
PAPER_METRIC = {"image_auroc": ("image", "AUROC"), "image_ap": ("image", "AP"), "image_f1max": ("image", "F1-max"),
                "pixel_auroc": ("pixel", "AUROC"), "pixel_ap": ("pixel", "AP"), "pixel_f1max": ("pixel", "F1-max"),
                "aupro": ("pixel", "AUPRO")}

TABLE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")


def _percent(result: dict, metric: str) -> float:
    value = result["mean"].get(metric, {}).get("mean", float("nan"))
    return round(100 * value, 1)


def dataset_table(results: dict, metrics=TABLE_METRICS):
    """{dataset: evaluate() result} -> DataFrame, one row per dataset, means in percent (1 decimal)."""
    import pandas as pd

    return pd.DataFrame({ds: {METRIC_LABELS[m]: _percent(r, m) for m in metrics} for ds, r in results.items()}).T


def beside_paper_rows(ours: dict, sources: dict, metrics=TABLE_METRICS, *, ours_label: str = "zsad",
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


def method_table(results: dict, metrics=TABLE_METRICS):
    """{row label: {dataset: evaluate() result}} -> DataFrame of means in percent (1 decimal),
    columns (dataset, metric)."""
    import pandas as pd

    rows = {}
    for label, per_dataset in results.items():
        rows[label] = {(ds, METRIC_LABELS[m]): 100 * r["mean"][m]["mean"]
                       for ds, r in per_dataset.items() for m in metrics if m in r["mean"]}
    return pd.DataFrame(rows).T.round(1)


def beside_paper(ours: dict, paper_rows: dict, metrics=TABLE_METRICS):
    """Our means beside the papers' numbers, with the trust mark of each paper number.

    ours: {(method label, dataset label): evaluate() result}; paper_rows: {method label: dict of
    paper_numbers filters (paper=, method=, table=...)} and the dataset to read them for under key
    'dataset' (a paper dataset name like 'MVTec AD'). Returns a long DataFrame."""
    import pandas as pd

    from .paper_tables import paper_numbers

    records = []
    for (label, dataset), result in ours.items():
        filters = dict(paper_rows.get(label, {}))
        paper_dataset = filters.pop("dataset", None)
        reported = paper_numbers(**filters, dataset=paper_dataset) if paper_dataset and filters else None
        for m in metrics:
            level, metric = PAPER_METRIC[m]
            value = result["mean"].get(m, {}).get("mean", float("nan"))
            row = {"method": label, "our data": dataset, "metric": METRIC_LABELS[m], "ours": round(100 * value, 1)}
            if reported is not None:
                hit = reported[(reported.level == level) & (reported.metric == metric)]
                row.update({"paper data": paper_dataset,
                            "paper": float(hit.value.iloc[0]) if len(hit) else np.nan,
                            "mark": hit.trust.iloc[0] if len(hit) else ""})
            records.append(row)
    return pd.DataFrame(records)


def beside_paper_table(ours: dict, metrics=TABLE_METRICS,
                       stand_in: dict | None = None, **filters):
    """The paper's table, row by row, with our number beside each paper number.

    Rows: the datasets of `paper_numbers(**filters)` in the paper's order, then any of ours the
    paper does not report. ours: {our dataset id: evaluate() result}, set beside the paper's row
    PAPER_DATASET[id]; stand_in: {domain: our dataset id} for paper rows without a dataset of their
    own (the smoke profile's synthetic domains stand in for the paper's industrial / medical sets).
    Columns: `our data` (where each row's numbers come from), (metric, ours | paper) in percent with
    one decimal, and `mark`, the trust mark(s) of the row's paper numbers."""
    import pandas as pd

    from .paper_tables import paper_numbers

    reported = paper_numbers(**filters)
    by_paper_name = {PAPER_DATASET.get(ds, ds): ds for ds in ours}
    standing_in = set((stand_in or {}).values())
    rows = list(dict.fromkeys(reported.dataset)) + [n for n, ds in by_paper_name.items()
                                                    if n not in set(reported.dataset) and ds not in standing_in]
    domains = dict(zip(reported.dataset, reported.domain))
    records = {}
    for name in rows:
        ds = by_paper_name.get(name) or (stand_in or {}).get(domains.get(name))
        record, marks = {("our data", ""): ds if ds in ours else "-"}, []
        for m in metrics:
            level, metric = PAPER_METRIC[m]
            hit = reported[(reported.dataset == name) & (reported.level == level) & (reported.metric == metric)]
            value = ours[ds]["mean"].get(m, {}).get("mean", np.nan) if ds in ours else np.nan
            record[(METRIC_LABELS[m], "ours")] = round(100 * value, 1)
            record[(METRIC_LABELS[m], "paper")] = float(hit.value.iloc[0]) if len(hit) else np.nan
            marks += list(hit.trust.iloc[:1])
        record[("mark", "")] = " / ".join(dict.fromkeys(marks)) or "-"
        records[name] = record
    table = pd.DataFrame.from_dict(records, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.index.name = "dataset"
    return table
