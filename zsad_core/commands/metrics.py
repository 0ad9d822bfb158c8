"""zsad metrics: image and pixel metrics of saved predictions, per category and their mean."""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np

from ..errors import ZsadError

HELP = """\
Compute image AUROC / AP / F1-max, pixel AUROC / AP / F1-max and AUPRO of the predictions in FILE,
per category and as the unweighted mean over categories (the number reported in the papers).

FILE is .npz or .safetensors with
  anomaly_maps  float [N,H,W]   higher = more anomalous
  masks         uint8 [N,H,W]   ground truth, binarized as mask != 0
  labels        int   [N]       1 = anomalous image
  image_scores  float [N]       optional; default: each map's maximum
  categories    str   [N]       optional (.npz: a string array; .safetensors: a JSON list under the
                                metadata key "categories"); default: one category
A metric a category cannot define (no normal image, no anomalous pixel, ...) is NaN and left out of
the mean; the JSON says how many categories each mean averaged. --legacy adds the 200-threshold
AUPRO of AnomalyCLIP / FAPrompt / APRIL-GAN, to compare with numbers in those papers.
"""


class MetricsInputError(ZsadError):
    """A predictions file the metrics cannot be computed from."""


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="metrics of saved predictions (per category and mean)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="predictions (.npz or .safetensors)")
    p.add_argument("--legacy", action="store_true", help="also the 200-threshold AUPRO of AnomalyCLIP & co.")
    p.add_argument("--out", help="JSON output (default: FILE with the suffix .metrics.json)")
    p.set_defaults(run=run)


def load_predictions(path: Path) -> dict:
    """The arrays of a predictions file, checked; every problem is one MetricsInputError naming the file."""
    if not path.is_file():
        raise MetricsInputError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
            if "categories" in metadata:
                arrays["categories"] = np.array(json.loads(metadata["categories"]), dtype=str)
        else:
            raise MetricsInputError(f"{path}: unknown format {path.suffix!r}; give a .npz or .safetensors file")
    except MetricsInputError:
        raise
    except ValueError as err:
        if "Object arrays" in str(err):
            raise MetricsInputError(f"{path}: an array is stored as Python objects; save categories as a string "
                                    f"array (np.array(names, dtype=str))") from None
        raise MetricsInputError(f"{path}: not a readable {path.suffix} file (not a numpy .npz archive)") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file of either format
        raise MetricsInputError(f"{path}: not a readable {path.suffix} file ({type(err).__name__}: {err})") from None
    return check_predictions(path, arrays)


def check_predictions(path: Path, arrays: dict) -> dict:
    missing = [k for k in ("anomaly_maps", "masks", "labels") if k not in arrays]
    if missing:
        raise MetricsInputError(f"{path}: missing {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'nothing'}); "
                                f"see zsad metrics --help for the expected keys")
    maps, masks, labels = arrays["anomaly_maps"], arrays["masks"], arrays["labels"]
    if maps.ndim != 3 or not np.issubdtype(maps.dtype, np.number):
        raise MetricsInputError(f"{path}: anomaly_maps must be a float array [N,H,W], got {maps.dtype} {list(maps.shape)}")
    if masks.shape != maps.shape:
        raise MetricsInputError(f"{path}: masks shape {list(masks.shape)} differs from anomaly_maps shape {list(maps.shape)}")
    n = len(maps)
    scores = arrays.get("image_scores")
    categories = arrays.get("categories")
    for name, arr in (("labels", labels), ("image_scores", scores), ("categories", categories)):
        if arr is not None and arr.shape != (n,):
            raise MetricsInputError(f"{path}: {name} must have shape [{n}] (one per map), got {list(arr.shape)}")
    for name, arr in (("anomaly_maps", maps), ("image_scores", scores)):
        if arr is not None and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise MetricsInputError(f"{path}: {name} contain {bad} NaN or inf value(s); metrics need finite scores")
    return {"anomaly_maps": maps, "masks": masks, "labels": labels, "image_scores": scores,
            "categories": None if categories is None else categories.astype(str)}


def json_value(x):
    """Metric values for JSON: floats, with "NaN" (a string, as in the goldens) where undefined."""
    return "NaN" if isinstance(x, float) and math.isnan(x) else x


def format_table(per_category: dict, means: dict, counts: dict) -> str:
    names = list(next(iter(per_category.values())))
    header = ["category", "images"] + names
    rows = [[c, str(counts[c])] + [f"{v[k]:.4f}" if not math.isnan(v[k]) else "NaN" for k in names]
            for c, v in per_category.items()]
    if len(per_category) > 1:
        rows.append(["mean", str(sum(counts.values()))]
                    + [f"{means[k]['mean']:.4f}" if not math.isnan(means[k]["mean"]) else "NaN" for k in names])
        rows.append(["(categories)", ""] + [str(means[k]["n_categories"]) for k in names])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(args) -> int:
    from ..metrics import evaluate_categories
    from ..provenance import provenance, sha256_file, write_json_atomic

    path = Path(args.file)
    data = load_predictions(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            per_category, means = evaluate_categories(data["anomaly_maps"], data["masks"], data["labels"],
                                                      data["image_scores"], data["categories"], legacy=args.legacy)
        except ValueError as err:
            raise MetricsInputError(f"{path}: {err}") from None
    categories = data["categories"] if data["categories"] is not None else np.array(["all"] * len(data["labels"]))
    counts = {c: int(np.count_nonzero(categories == c)) for c in per_category}
    print(format_table(per_category, means, counts))
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    for note in notes:
        print(f"note: {note}")

    out = Path(args.out) if args.out else path.with_name(path.name.removesuffix(path.suffix) + ".metrics.json")
    sha = sha256_file(path)
    record = {
        "file": path.name,
        "sha256": sha,
        "image_scores": "given" if data["image_scores"] is not None else "max of each anomaly map",
        "per_category": {c: {"n_images": counts[c], **{k: json_value(v) for k, v in values.items()}}
                         for c, values in per_category.items()},
        "mean": {k: {"mean": json_value(v["mean"]), "n_categories": v["n_categories"]} for k, v in means.items()},
        "notes": notes,
        "value_encoding": 'fractions in [0,1]; "NaN" = undefined for that category (a class is missing); a mean '
                          'averages the n_categories categories where the metric is defined',
        "provenance": provenance({"command": "metrics", "legacy": args.legacy, "aupro_fpr_limit": 0.3,
                                  "aupro_connectivity": 8}, input={path.name: sha}),
    }
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return 0
