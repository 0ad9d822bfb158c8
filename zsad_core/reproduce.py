"""The registered notebooks and how each profile runs them (zsad reproduce)."""
from __future__ import annotations

import csv
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path

PROFILES = ("smoke", "paper")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Notebook:
    name: str  # file stem under notebooks/
    title: str
    parameters: dict = field(default_factory=dict)  # profile -> extra papermill parameters


def registered_notebooks() -> list[Notebook]:
    """Every notebooks/NN_name.ipynb, in number order (later notebooks may read earlier results).

    The title is the notebook's first markdown heading; per-profile parameters may be given in the
    notebook metadata under `zsad.parameters.<profile>`.
    """
    import json

    out = []
    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        title = next((line.lstrip("# ").strip() for cell in nb["cells"] if cell["cell_type"] == "markdown"
                      for line in "".join(cell["source"]).splitlines() if line.startswith("# ")), path.stem)
        params = nb.get("metadata", {}).get("zsad", {}).get("parameters", {})
        out.append(Notebook(path.stem, title, params))
    return out


def notebook_parameters(nb: Notebook, profile: str, results_dir: Path, data_root: str | None) -> dict:
    params = {"profile": profile, "results_dir": str(results_dir), "repo_root": str(REPO_ROOT)}
    if data_root:
        params["data_root"] = str(data_root)
    params.update(nb.parameters.get(profile, {}))
    return params


def run_notebooks(profile: str, *, only=None, results_root: Path | None = None, data_root: str | None = None,
                  kernel: str | None = None, log=print) -> list[dict]:
    """Execute the registered notebooks with papermill into results/<profile>/; a failed notebook is
    reported and the run goes on. Returns one status row per notebook and writes the summary."""
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {PROFILES}")
    results_dir = (results_root or REPO_ROOT / "results") / profile
    results_dir.mkdir(parents=True, exist_ok=True)
    selected = [nb for nb in registered_notebooks() if not only or nb.name in only or nb.name.split("_", 1)[0] in only]
    rows = []
    for nb in selected:
        source = REPO_ROOT / "notebooks" / f"{nb.name}.ipynb"
        target = results_dir / f"{nb.name}.ipynb"
        start = time.time()
        log(f"[{profile}] {nb.name}: running")
        try:
            papermill.execute_notebook(str(source), str(target), cwd=str(REPO_ROOT / "notebooks"),
                                       parameters=notebook_parameters(nb, profile, results_dir, data_root),
                                       kernel_name=kernel, progress_bar=False)
            status, error = "ok", ""
        except Exception as err:  # noqa: BLE001 - one failed notebook must not stop the others
            status, error = "failed", f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        seconds = round(time.time() - start, 1)
        log(f"[{profile}] {nb.name}: {status} in {seconds} s {error}")
        rows.append({"notebook": nb.name, "title": nb.title, "status": status, "seconds": seconds,
                     "output": str(target.relative_to(results_dir.parent.parent) if target.is_relative_to(REPO_ROOT) else target),
                     "error": error})
    write_summary(results_dir, profile, rows)
    return rows


def write_summary(results_dir: Path, profile: str, rows: list[dict]) -> None:
    from .provenance import git_revision

    with open(results_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["notebook", "title", "status", "seconds", "output", "error"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# zsad reproduction summary ({profile} profile)", "",
             f"Code version {git_revision()}, finished {_dt.datetime.now().isoformat(timespec='seconds')}.", "",
             "| notebook | status | seconds | output |", "|---|---|---|---|"]
    lines += [f"| {r['notebook']} — {r['title']} | {r['status']}{' (' + r['error'] + ')' if r['error'] else ''} "
              f"| {r['seconds']} | {r['output']} |" for r in rows]
    (results_dir / "summary.md").write_text("\n".join(lines) + "\n")
