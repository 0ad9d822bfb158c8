"""zsad reproduce: run the registered notebooks with papermill for a profile."""
from __future__ import annotations

HELP = """\
Execute every registered notebook (notebooks/NN_name.ipynb) with the profile's parameters into
results/<profile>/, and write summary.md and summary.csv there. Finished runs (same notebook source
and parameters) are skipped, so a killed batch started again finishes only what was missing; a
failed run is retried --retries times and then reported, and the batch goes on.

Executors: local (this process, one after another), slurm (one submitit job per notebook; --partition,
--gpus, --cpus, --mem-gb, --timeout-min), submitit-local and debug (submitit on this machine).
Summary notebooks (90+) run after the others.
"""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("reproduce", help="run the registered notebooks (papermill) into results/<profile>/",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="smoke", choices=["smoke", "paper"])
    p.add_argument("--only", nargs="*", help="notebook names or number prefixes (e.g. 00 01_metrics)")
    p.add_argument("--data-root", help="paper profile: folder holding the datasets (DIR/<manifest id>/...)")
    p.add_argument("--results", help="results folder (default: results/ in the repository)")
    p.add_argument("--kernel", help="Jupyter kernel name (default: the notebook's)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local", "debug"])
    p.add_argument("--retries", type=int, default=1, help="retries of a failed run (default 1)")
    p.add_argument("--force", action="store_true", help="rerun finished notebooks too")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--gpus", type=int, default=None, help="slurm: GPUs per job (paper profile: 1)")
    p.add_argument("--cpus", type=int, default=None, help="slurm: CPUs per job")
    p.add_argument("--mem-gb", type=int, default=None, help="slurm: memory per job")
    p.add_argument("--timeout-min", type=int, default=None, help="slurm: time limit per job in minutes")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..reproduce import run_notebooks

    cluster = {}
    if args.executor == "slurm":
        cluster = {k: v for k, v in {"slurm_partition": args.partition, "gpus_per_node": args.gpus,
                                      "cpus_per_task": args.cpus, "mem_gb": args.mem_gb,
                                      "timeout_min": args.timeout_min}.items() if v is not None}
    elif args.timeout_min:
        cluster["timeout_min"] = args.timeout_min
    rows = run_notebooks(args.profile, only=args.only, data_root=args.data_root, kernel=args.kernel,
                         results_root=Path(args.results) if args.results else None, executor=args.executor,
                         retries=args.retries, force=args.force, cluster_options=cluster)
    failed = [r["notebook"] for r in rows if not r["status"].startswith("ok")]
    print(f"{len(rows) - len(failed)}/{len(rows)} notebooks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
