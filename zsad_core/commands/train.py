"""zsad train: train a method on an auxiliary dataset with its official recipe."""
from __future__ import annotations

HELP = """\
Train METHOD on the *test* split of the auxiliary dataset (categories pooled, the ZSAD papers'
protocol) with the official optimizer, schedule, batch size, epochs and seed of each training stage
(override with --epochs/--batch-size/--seed). Every epoch writes OUT/<stage>_epoch<N>.safetensors
(zsad's format; `zsad predict/evaluate --checkpoint` read it), OUT/last.safetensors, a loss log and
the trainer state: rerun the same command after an interruption and training resumes after the last
finished epoch. --export-official also writes the method's official checkpoint format.
"""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("train", help="train a method on an auxiliary dataset", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--backbone", default="tiny", help="tiny | NAME[:TAG] | NAME:PATH | PATH (default tiny)")
    p.add_argument("--dataset", required=True, help="manifest id (e.g. mvtec_ad) or synthetic domain")
    p.add_argument("--root", help="dataset folder (synthetic domains default to data/synthetic/)")
    p.add_argument("--categories", nargs="*", help="train on these categories only")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", help="initial parameters (official format or zsad's)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int, help="epochs per stage (default: the official recipe)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch (quick runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--export-official", action="store_true", help="also write the official checkpoint format")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..backbone import load_backbone
    from ..data import auxiliary_training_set
    from ..methods import create_method, method_class
    from ..provenance import sha256_file
    from ..train import train
    from ._datasets import dataset_root, manifest_for

    cls = method_class(args.method)
    if not cls.stages:
        from ..errors import OptionError

        raise OptionError(f"method {args.method!r} has no learnable parameters; nothing to train")
    root = dataset_root(args.dataset, args.root)
    backbone = load_backbone(args.backbone, device=args.device)
    method = create_method(args.method, backbone, options=args.options, image_size=args.image_size)
    if args.checkpoint:
        method.load_checkpoint(args.checkpoint)
    dataset = auxiliary_training_set(root, manifest_for(args.dataset, root), image_size=method.image_size,
                                     image_convention=method.image_convention,
                                     mask_convention=method.mask_convention, categories=args.categories)
    config = {"dataset": args.dataset, "categories": args.categories, "backbone_fingerprint": backbone.fingerprint,
              "init_checkpoint": sha256_file(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_file()
              else args.checkpoint, "command": "train"}
    summary = train(method, dataset, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, max_steps=args.max_steps, config=config)
    if args.export_official:
        target = Path(args.out) / method.official_checkpoint_name
        method.export_official(target)
        print(f"official checkpoint: {target}")
    print(f"trained {args.method}: {len(summary['history'])} epoch(s) this run; checkpoints in {args.out}")
    return 0
