"""zsad evaluate: a method on a dataset's test split, canonical metrics per category and mean."""
from __future__ import annotations

HELP = """\
Evaluate METHOD on the test split of DATASET: batched inference with a progress bar, per category
(any official per-class score normalisation runs over that category's images), the canonical metrics
(image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AUPRO; --legacy adds the 200-threshold AUPRO of the
AnomalyCLIP-family code), and their unweighted means over categories. Writes OUT/metrics.csv,
OUT/metrics.json (with provenance: code version, full config, backbone/checkpoint fingerprints,
manifest version, package versions), OUT/categories/<category>.json and OUT/predictions/. Files are
written atomically; rerun the same command after an interruption and it resumes at the first
unfinished category.
"""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("evaluate", help="evaluate a method on a dataset (metrics per category + mean)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--backbone", default="tiny", help="tiny | NAME[:TAG] | NAME:PATH | PATH (default tiny)")
    p.add_argument("--checkpoint", help="learnable parameters (official format or zsad's)")
    p.add_argument("--dataset", required=True, help="manifest id (e.g. mvtec_ad) or synthetic domain")
    p.add_argument("--root", help="dataset folder (synthetic domains default to data/synthetic/)")
    p.add_argument("--categories", nargs="*")
    p.add_argument("--out", help="output folder (default results/evaluate/<method>__<dataset>)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="few-shot: the first K train/good images of each category as normal references")
    p.add_argument("--legacy", action="store_true", help="also compute the legacy 200-threshold AUPRO")
    p.add_argument("--seed", type=int, default=0, help="seed for any random initialisation/sampling (default 0)")
    p.add_argument("--save-maps", action="store_true", help="also store the anomaly maps per category")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..backbone import load_backbone
    from ..evaluate import evaluate
    from ..methods import create_method, method_class
    from ..provenance import sha256_file
    from ..reproduce import REPO_ROOT
    from ._datasets import dataset_root, manifest_for

    method_class(args.method)
    root = dataset_root(args.dataset, args.root)
    backbone = load_backbone(args.backbone, device=args.device)
    import torch

    torch.manual_seed(args.seed)  # methods with untrained random parts are reproducible too
    method = create_method(args.method, backbone, options=args.options, image_size=args.image_size)
    checkpoint_fp = None
    if args.checkpoint:
        method.load_checkpoint(args.checkpoint)
        path = Path(args.checkpoint)
        checkpoint_fp = (sha256_file(path) if path.is_file()
                         else {f.name: sha256_file(f) for f in sorted(path.glob("*")) if f.is_file()})
    method.to(args.device)
    out = Path(args.out) if args.out else REPO_ROOT / "results" / "evaluate" / f"{args.method}__{args.dataset}"
    config = {"dataset": args.dataset, "backbone_fingerprint": backbone.fingerprint, "checkpoint": checkpoint_fp,
              "seed": args.seed, "command": "evaluate"}
    result = evaluate(method, root, manifest_for(args.dataset, root), out, categories=args.categories,
                      batch_size=args.batch_size, device=args.device, legacy=args.legacy, save_maps=args.save_maps,
                      few_shot=args.few_shot,
                      config=config)
    means = result["mean"]
    print("mean over categories: " + ", ".join(f"{k} {v['mean']:.4f} (n={v['n_categories']})" for k, v in means.items()))
    print(f"wrote {out}/metrics.csv and metrics.json")
    return 0
