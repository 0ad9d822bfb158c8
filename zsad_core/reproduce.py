"""Batch reproduction: the registered notebooks, run by papermill for a profile (zsad reproduce).

A run is one notebook executed with the profile's parameters into `results/<profile>/<name>.ipynb`.
It is *finished* when `results/<profile>/.runs/<name>.json` records status ok for the same notebook
source and parameters; finished runs are skipped, so a killed batch started again runs only what is
missing. A failed run is retried (`retries`) and then reported in the summary, never silently lost.

Executors (an existing engine, no home-made scheduler): `local` runs the notebooks one after another
in this process; `slurm` submits each run as a job through submitit; `submitit-local` (subprocesses)
and `debug` (in-process) are submitit's own executors, for testing the same code path on one
machine. Summary notebooks (numbers >= 90) read the others' results, so they run in a second wave.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

PROFILES = ("smoke", "paper")
EXECUTORS = ("local", "slurm", "submitit-local", "debug")
REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


@dataclass(frozen=True)
class Notebook:
    name: str  # file stem under notebooks/
    title: str
    path: Path
    parameters: dict = field(default_factory=dict)  # profile -> extra papermill parameters

    @property
    def is_summary(self) -> bool:
        return self.name[:2] >= "90"


def registered_notebooks(folder: Path | None = None) -> list[Notebook]:
    """Every notebooks/NN_name.ipynb, in number order.

    The title is the notebook's first markdown heading; per-profile parameters may be given in the
    notebook metadata under `zsad.parameters.<profile>`.
    """
    out = []
    for path in sorted((folder or NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        title = next((line.lstrip("# ").strip() for cell in nb["cells"] if cell["cell_type"] == "markdown"
                      for line in "".join(cell["source"]).splitlines() if line.startswith("# ")), path.stem)
        params = nb.get("metadata", {}).get("zsad", {}).get("parameters", {})
        out.append(Notebook(path.stem, title, path, params))
    return out


def notebook_parameters(nb: Notebook, profile: str, results_dir: Path, data_root: str | None) -> dict:
    params = {"profile": profile, "results_dir": str(results_dir), "repo_root": str(REPO_ROOT)}
    if data_root:
        params["data_root"] = str(data_root)
    params.update(nb.parameters.get(profile, {}))
    return params


def run_fingerprint(nb: Notebook, params: dict) -> str:
    """What makes a finished run reusable: the notebook's source and its parameters."""
    digest = hashlib.sha256(nb.path.read_bytes())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()


def _status_path(results_dir: Path, name: str) -> Path:
    return results_dir / ".runs" / f"{name}.json"


def finished(nb: Notebook, results_dir: Path, params: dict) -> bool:
    path = _status_path(results_dir, nb.name)
    if not path.is_file() or not (results_dir / f"{nb.name}.ipynb").is_file():
        return False
    record = json.loads(path.read_text())
    return record.get("status") == "ok" and record.get("fingerprint") == run_fingerprint(nb, params)


def run_one(nb: Notebook, results_dir: str, params: dict, kernel: str | None = None) -> dict:
    """Execute one notebook with papermill and record its status (runs in a job on a cluster)."""
    import papermill

    from .provenance import write_json_atomic

    results_dir = Path(results_dir)
    target = results_dir / f"{nb.name}.ipynb"
    start = time.time()
    try:
        papermill.execute_notebook(str(nb.path), str(target), cwd=str(nb.path.parent), parameters=params,
                                   kernel_name=kernel, progress_bar=False)
        status, error = "ok", ""
    except Exception as err:  # noqa: BLE001 - a failed notebook is recorded, the batch goes on
        lines = str(err).strip().splitlines()
        status, error = "failed", f"{type(err).__name__}: {lines[-1] if lines else ''}"
    record = {"notebook": nb.name, "title": nb.title, "status": status, "seconds": round(time.time() - start, 1),
              "output": target.name, "error": error, "fingerprint": run_fingerprint(nb, params),
              "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    write_json_atomic(_status_path(results_dir, nb.name), record)
    return record


def _run_wave(todo, results_dir, params_of, executor, retries, kernel, cluster_options, log) -> dict[str, dict]:
    """Run a list of notebooks with the executor, retrying failures; returns {name: status row}."""
    rows, attempt = {}, 0
    while todo and attempt <= retries:
        if attempt:
            log(f"retrying {len(todo)} failed run(s): {', '.join(nb.name for nb in todo)}")
        if executor == "local":
            for nb in todo:
                log(f"{nb.name}: running")
                rows[nb.name] = run_one(nb, str(results_dir), params_of(nb), kernel)
                log(f"{nb.name}: {rows[nb.name]['status']} in {rows[nb.name]['seconds']} s {rows[nb.name]['error']}")
        else:
            import submitit

            cluster = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}[executor]
            ex = submitit.AutoExecutor(folder=str(results_dir / ".submitit" / "%j"), cluster=cluster)
            ex.update_parameters(name="zsad", **(cluster_options or {}))
            jobs = [(nb, ex.submit(run_one, nb, str(results_dir), params_of(nb), kernel)) for nb in todo]
            log(f"submitted {len(jobs)} job(s) with submitit ({executor}): "
                + ", ".join(f"{nb.name}={job.job_id}" for nb, job in jobs))
            for nb, job in jobs:
                try:
                    rows[nb.name] = job.result()
                except Exception as err:  # noqa: BLE001 - a job that died (killed, out of time) is a failed run
                    rows[nb.name] = {"notebook": nb.name, "title": nb.title, "status": "failed", "seconds": 0.0,
                                     "output": f"{nb.name}.ipynb", "error": f"job {job.job_id}: {type(err).__name__}"}
                log(f"{nb.name}: {rows[nb.name]['status']} {rows[nb.name]['error']}")
        todo = [nb for nb in todo if rows[nb.name]["status"] != "ok"]
        attempt += 1
    return rows


def run_notebooks(profile: str, *, only=None, results_root: Path | None = None, data_root: str | None = None,
                  kernel: str | None = None, executor: str = "local", retries: int = 1, force: bool = False,
                  cluster_options: dict | None = None, notebooks_dir: Path | None = None, log=print) -> list[dict]:
    """Run the registered notebooks for a profile into results/<profile>/, skipping finished runs,
    and write summary.md / summary.csv there. Returns one status row per selected notebook."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {PROFILES}")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use one of {EXECUTORS}")
    results_dir = Path(results_root or REPO_ROOT / "results") / profile
    results_dir.mkdir(parents=True, exist_ok=True)
    selected = [nb for nb in registered_notebooks(notebooks_dir)
                if not only or nb.name in only or nb.name.split("_", 1)[0] in only]

    def params_of(nb):
        return notebook_parameters(nb, profile, results_dir, data_root)

    rows = {}
    for wave in ([nb for nb in selected if not nb.is_summary], [nb for nb in selected if nb.is_summary]):
        todo = []
        for nb in wave:
            if not force and finished(nb, results_dir, params_of(nb)):
                rows[nb.name] = {**json.loads(_status_path(results_dir, nb.name).read_text()), "status": "ok (done earlier)"}
                log(f"{nb.name}: finished earlier, skipped")
            else:
                todo.append(nb)
        rows.update(_run_wave(todo, results_dir, params_of, executor, retries, kernel, cluster_options, log))
    ordered = [rows[nb.name] for nb in selected]
    write_summary(results_dir, profile, ordered)
    return ordered


def write_summary(results_dir: Path, profile: str, rows: list[dict]) -> None:
    from .provenance import git_revision

    fields = ["notebook", "title", "status", "seconds", "output", "error"]
    with open(results_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# zsad reproduction summary ({profile} profile)", "",
             f"Code version {git_revision()}, written {_dt.datetime.now().isoformat(timespec='seconds')}.", "",
             "| notebook | status | seconds | output |", "|---|---|---|---|"]
    lines += [f"| {r['notebook']} — {r['title']} | {r['status']}{' (' + r['error'] + ')' if r.get('error') else ''} "
              f"| {r['seconds']} | {r['output']} |" for r in rows]
    (results_dir / "summary.md").write_text("\n".join(lines) + "\n")
