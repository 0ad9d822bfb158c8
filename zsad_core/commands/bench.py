"""zsad bench: run the registered benchmarks and write one JSON per benchmark."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..bench import BENCHMARKS

    p = sub.add_parser("bench", help="run benchmarks, write JSON into results/bench/",
                       description="Run the registered benchmarks (default: all) and write OUT/<name>.json with "
                                   "the values, the seconds, the machine and provenance. Benchmarks: "
                                   + "; ".join(f"{b.name}: {b.description}" for b in BENCHMARKS.values()))
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    p.add_argument("--out", default=None, help="output folder (default: results/bench in the repository)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--backbone", default="tiny", help="methods: tiny, or NAME:random (e.g. ViT-L-14-336:random)")
    p.add_argument("--device", default="cpu", help="methods: cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="methods: bf16 autocast")
    p.add_argument("--batch-size", type=int, default=2, help="methods: images per batch")
    p.add_argument("--methods", nargs="+", help="methods: only these methods")
    p.add_argument("--threads", type=int, help="methods: torch CPU threads per method process")
    p.add_argument("--tag", default="", help="suffix of the output file names (e.g. the backbone)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..bench import machine_info, run_benchmarks
    from ..provenance import provenance, write_json_atomic
    from ..reproduce import REPO_ROOT

    out_dir = Path(args.out) if args.out else REPO_ROOT / "results" / "bench"
    results = run_benchmarks(args.only, show_progress=not args.no_progress, backbone=args.backbone,
                             device=args.device, bf16=args.bf16, batch_size=args.batch_size, methods=args.methods,
                             threads=args.threads)
    machine = machine_info()
    for name, entry in results.items():
        path = out_dir / f"{name}{'_' + args.tag if args.tag else ''}.json"
        write_json_atomic(path, {"benchmark": name, **entry, "machine": machine,
                                 "provenance": provenance({"command": "bench", "benchmark": name})})
        print(f"{name}: {entry['seconds']} s -> {path}")
    return 0
