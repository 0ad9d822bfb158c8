"""zsad data {list,verify,prepare,synth}: dataset manifests, checks, conversions, synthetic data."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = """\
Datasets are described by manifests (data_manifests/<id>.json: source URLs, license, checksums,
the folder layout zsad reads, categories and expected counts). Every dataset is read in the
MVTec layout <root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}.

  zsad data list                                   known manifests and their totals
  zsad data verify NAME --root DIR                 check a copy against its manifest
  zsad data prepare NAME --src RAW --dst DIR       convert a raw download (visa, btad, polyps, tn3k, bmad)
  zsad data synth --out DIR [--size smoke]         generate the synthetic datasets of the smoke profile
"""


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset manifests: list, verify, prepare, synth", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    q = data_sub.add_parser("list", help="list the known dataset manifests",
                            description="List the manifests in data_manifests/ with domain, categories and totals "
                                        "(? = not known from any source).")
    q.set_defaults(run=run_list)

    q = data_sub.add_parser("verify", help="check a copy of a dataset against its manifest",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Check the copy under --root against manifest NAME: layout, per-category counts (train/good,
test/good, anomalous, each defect type), that every image and mask decodes completely (truncated
files are found), and that every anomalous image has a mask of the same size. Prints OK or the
problems per category, each naming the file and the fix. Exit status 0 = OK, 1 = mismatch.""")
    q.add_argument("name", metavar="NAME", help="manifest id (zsad data list) or path to a manifest .json "
                                                "(a generated dataset's DIR/manifest.json: --root defaults to DIR)")
    q.add_argument("--root", help="the dataset folder (holding one folder per category)")
    q.add_argument("--quick", action="store_true", help="read only image headers (faster; misses truncated files)")
    q.add_argument("--report", metavar="FILE", help="also write the full report as JSON")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(run=run_verify)

    q = data_sub.add_parser("prepare", help="convert a raw download into the layout zsad reads",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Convert the raw download at --src (never modified) into the MVTec layout at --dst, as the ZSAD
papers do:
  visa          split_csv/1cls.csv -> <object>/{train/good,test/good,test/bad,ground_truth/bad};
                masks binarised != 0 (the raw ones are multi-class index images)
  btad          per-product .bmp/.png images and masks -> one PNG layout (ok -> good, ko kept)
  cvc_clinicdb, cvc_colondb, kvasir, cvc_300, tn3k
                images/ + masks/ paired by file name -> <category>/test/<defect>, ground_truth
  bmad_brain, bmad_liver, bmad_retina_resc
                {train,test}/good/img, test/Ungood/{img,label} -> MVTec layout
Writes DST/zsad_prepare_report.json; a re-run resumes (existing outputs are kept). Then run
`zsad data verify NAME --root DST`. Exit status 1 if any source file had a problem.""")
    q.add_argument("name", metavar="NAME", help="manifest id with a converter (see above)")
    q.add_argument("--src", required=True, help="the extracted raw download")
    q.add_argument("--dst", required=True, help="output folder (created)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(run=run_prepare)

    q = data_sub.add_parser("synth", help="generate the synthetic datasets (smoke profile data)",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Write the synthetic domains (MVTec layout, exact masks, one manifest.json each) under --out:
  synth_industrial_a  brick, wood, screw     (auxiliary training set: train on its test split)
  synth_industrial_b  gravel, fabric, nut    (zero-shot target; categories disjoint from a)
  synth_medical       retina, tissue         (medical-like zero-shot target)
built from photos that scikit-image ships and procedural textures/objects, with scratch, crack,
hole, stain, cut_paste, foreign_texture, missing_part and lesion-like defects. The same seed gives
byte-identical files. An existing complete copy with the same size and seed is reused (--force
regenerates). See data_manifests/README.md.""")
    q.add_argument("--out", help="output folder (default: data/synthetic in the repository)")
    q.add_argument("--size", default="smoke",
                   help="smoke (4 train, 5 good, 6 anomalous per category, 256 px), small (20/20/24, 256 px), "
                        "full (100/50/60, 512 px) or TRAIN,GOOD,ANOMALOUS[,PX] (default: smoke)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    q.add_argument("--domains", nargs="*", help="only these domains (default: all)")
    q.add_argument("--force", action="store_true", help="regenerate even if a matching copy exists")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(run=run_synth)


def run_list(args) -> int:
    from ..data.manifest import known_manifests, load_manifest, totals

    def fmt(v):
        return "?" if v is None else str(v)

    rows = [("id", "domain", "cat", "train", "good", "anomalous", "masks", "license", "sha256", "layout")]
    for name in known_manifests():
        m = load_manifest(name)
        t = totals(m)
        lic = (m["license"]["id"] or "unknown") + (" (conflict)" if m["license"].get("conflict") else "")
        layout = ("prepare " + m["layout"]["prepare"]["converter"] if m["layout"]["prepare"]
                  else "synthetic" if m["synthetic"] else m["layout"]["source"].split(" (")[0].split(":")[0])
        rows.append((name, m["domain"], str(len(m["categories"])), fmt(t["train_good"]), fmt(t["test_good"]),
                     fmt(t["test_anomalous"]), {True: "pixel", False: "image", None: "?"}[m["layout"]["pixel_masks"]],
                     lic[:36], "yes" if any(d.get("sha256") for d in m["downloads"]) else "no", layout[:40]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def run_verify(args) -> int:
    from ..data.layout import DataError
    from ..data.manifest import load_manifest
    from ..data.verify import verify, verify_root_default, write_report

    load_manifest(args.name)  # an unknown name fails first, with the list of known ones
    root = args.root or verify_root_default(args.name)
    if root is None:
        raise DataError("--root is required (the folder holding the dataset's category folders)")
    report = verify(args.name, root, decode=not args.quick, progress=not args.no_progress)
    print(report.format())
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    return 0 if report.ok else 1


def run_prepare(args) -> int:
    from ..data.prepare import REPORT_NAME, prepare

    conversion = prepare(args.name, args.src, args.dst, progress=not args.no_progress)
    print(conversion.format())
    print(f"report: {Path(args.dst) / REPORT_NAME}\nnext: zsad data verify {conversion.dataset} --root {args.dst}")
    return 0 if conversion.ok else 1


def run_synth(args) -> int:
    from ..data.synth import DEFAULT_ROOT, ensure_synthetic, generate, parse_size

    root = Path(args.out) if args.out else DEFAULT_ROOT
    size_name, spec = parse_size(args.size)
    start = time.time()
    if args.force:
        paths = generate(root, size_name, args.seed, args.domains, progress=not args.no_progress, log=print)
    else:
        paths = ensure_synthetic(root, size_name, args.seed, args.domains, progress=not args.no_progress, log=print)
    print(f"synthetic data ({size_name}: {spec.train_good} train/good, {spec.test_good} test/good, "
          f"{spec.test_anomalous} anomalous per category, {spec.image_px} px; seed {args.seed}) "
          f"ready in {time.time() - start:.1f} s:")
    for domain, path in paths.items():
        print(f"  {domain}: {path}   (check: zsad data verify {path / 'manifest.json'})")
    return 0
