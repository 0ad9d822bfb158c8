"""zsad reproduce: run the registered notebooks with papermill for a profile."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run the registered notebooks (papermill) into results/<profile>/",
                       description="Execute every registered notebook with the profile's parameters into "
                                   "results/<profile>/, continue past a failed notebook, and write "
                                   "summary.md and summary.csv there.")
    p.add_argument("--profile", default="smoke", choices=["smoke", "paper"])
    p.add_argument("--only", nargs="*", help="notebook names or number prefixes (e.g. 00 01_metrics)")
    p.add_argument("--data-root", help="paper profile: folder holding the datasets")
    p.add_argument("--results", help="results folder (default: results/ in the repository)")
    p.add_argument("--kernel", help="Jupyter kernel name (default: the notebook's)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..reproduce import run_notebooks

    rows = run_notebooks(args.profile, only=args.only, data_root=args.data_root, kernel=args.kernel,
                         results_root=Path(args.results) if args.results else None)
    failed = [r["notebook"] for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)}/{len(rows)} notebooks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
