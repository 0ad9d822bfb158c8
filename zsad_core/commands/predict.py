"""zsad predict: run one method on image files of one category."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

HELP = """\
Run METHOD on the IMAGE files (one category per call) and write the predictions to OUT.

OUT ending in .safetensors: float32 tensors `image_scores` [N] and, for methods with maps,
`anomaly_maps` [N,S,S] at the method's evaluation resolution S, in input order (provenance in
the file's metadata). Any other OUT: a folder with scores.csv, one heat-map overlay PNG per
image (one colour scale for the whole call), predictions.safetensors and provenance.json.

--class-name is the word the prompt templates put for the object (default: object). Methods that
normalise scores over the test images of a class (AA-CLIP, Bayes-PFL, APRIL-GAN few-shot) do so
over the images of this call.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a method on image files", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="method name (e.g. clip_zeroshot)")
    p.add_argument("--backbone", default="tiny",
                   help="tiny | open_clip NAME[:TAG] (e.g. ViT-L-14-336:openai) | NAME:PATH | PATH to an "
                        "OpenAI/open_clip checkpoint (default: tiny)")
    p.add_argument("--checkpoint", help="learnable parameters: the method's official checkpoint format "
                                        "(a file, or a folder where the official test loads several) or zsad's own")
    p.add_argument("--image-size", type=int, help="evaluation resolution (default: the method's official size)")
    p.add_argument("--class-name", default="object", help="object word for the prompts (default: object)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method option (repeatable); zsad predict --method M --list-options lists them")
    p.add_argument("--draws", help="recorded random draws (.safetensors) for methods that sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for any random initialisation/sampling (default 0)")
    p.add_argument("--list-options", action="store_true", help="print the method's options and exit")
    p.add_argument("--out", help="OUT.safetensors or an output folder")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.set_defaults(run=run)


def _list_options(cls) -> str:
    import dataclasses

    lines = [f"{cls.name}: options (--set KEY=VALUE)"]
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}  ({f.type})")
    return "\n".join(lines if len(lines) > 1 else lines + ["  (none)"])


def run(args) -> int:
    from ..errors import OptionError
    from ..methods import method_class
    from ..preprocess import ImageError, open_image

    cls = method_class(args.method)  # unknown method: fails before anything heavy is loaded
    if args.list_options:
        print(_list_options(cls))
        return 0
    if not args.out:
        raise OptionError("--out is required (OUT.safetensors or a folder)")
    if not args.images:
        raise OptionError("no IMAGE given")
    pil_images = [open_image(p) for p in args.images]  # every input is checked before the model loads
    if args.draws and not Path(args.draws).is_file():
        raise ImageError(f"{args.draws}: no such draws file")

    import torch

    from ..backbone import load_backbone
    from ..methods import create_method
    from ..preprocess import preprocess_image
    from ..provenance import provenance, sha256_file

    backbone = load_backbone(args.backbone, device=args.device)

    torch.manual_seed(args.seed)  # methods with untrained random parts are reproducible too
    method = create_method(args.method, backbone, options=args.options, image_size=args.image_size)
    if args.checkpoint:
        method.load_checkpoint(args.checkpoint)
    if args.draws:
        method.set_draws(args.draws)
    method.to(args.device)
    images = torch.stack([preprocess_image(im, method.image_size, method.image_convention) for im in pil_images])
    prediction = method.predict(images, args.class_name, batch_size=args.batch_size)

    fingerprints = {"backbone": backbone.fingerprint,
                    "images": {str(p): sha256_file(p) for p in args.images}}
    if args.checkpoint:
        fingerprints["checkpoint"] = (sha256_file(args.checkpoint) if Path(args.checkpoint).is_file()
                                      else {str(f): sha256_file(f) for f in sorted(Path(args.checkpoint).glob("*"))
                                            if f.is_file()})
    if args.draws:
        fingerprints["draws"] = sha256_file(args.draws)
    record = provenance({**method.config(), "class_name": args.class_name, "seed": args.seed, "command": "predict"},
                        **fingerprints)
    write_prediction(Path(args.out), prediction, args.images, images, record)
    print(f"wrote {args.out} ({len(args.images)} images, method {args.method})")
    return 0


def write_prediction(out: Path, prediction, paths, images, record) -> None:
    from safetensors.torch import save

    from ..provenance import write_bytes_atomic, write_json_atomic
    from ..viz import heat_overlay

    tensors = {"image_scores": prediction.image_scores.float().contiguous()}
    if prediction.anomaly_maps is not None:
        tensors["anomaly_maps"] = prediction.anomaly_maps.float().contiguous()
    blob = save(tensors, metadata={"provenance": json.dumps(record, default=str)})
    if out.suffix == ".safetensors":
        write_bytes_atomic(out, blob)
        return
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "predictions.safetensors", blob)
    write_json_atomic(out / "provenance.json", record)
    maps = prediction.anomaly_maps
    rows = []
    for i, path in enumerate(paths):
        row = {"image": str(path), "image_score": f"{float(prediction.image_scores[i]):.6f}"}
        if maps is not None:
            overlay = out / f"{i:03d}_{Path(path).stem}_overlay.png"
            heat_overlay(images[i], maps[i], float(maps.min()), float(maps.max())).save(overlay)
            row.update(map_max=f"{float(maps[i].max()):.6f}", overlay=overlay.name)
        rows.append(row)
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
