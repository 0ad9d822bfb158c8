"""zsad reproduce: papermill runs, summary, resumability (finished runs skipped), retries, and the
submitit executors (debug and local subprocesses)."""
import json

import nbformat
import pytest

from zsad_core.reproduce import registered_notebooks, run_notebooks


def write_notebook(folder, name, body):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {name} title"),
                nbformat.v4.new_code_cell('profile = "smoke"\nresults_dir = "."\nrepo_root = ".."',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(folder / f"{name}.ipynb"))


@pytest.fixture()
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder, "00_ok", "from pathlib import Path\nPath(results_dir, 'ok.txt').write_text(profile)")
    write_notebook(folder, "01_fails", "raise RuntimeError('data missing: put it under DIR')")
    write_notebook(folder, "90_summary", "from pathlib import Path\nassert Path(results_dir, 'ok.txt').exists()")
    return folder


def test_registration_order_and_titles(notebooks):
    found = registered_notebooks(notebooks)
    assert [nb.name for nb in found] == ["00_ok", "01_fails", "90_summary"]
    assert found[0].title == "00_ok title" and found[2].is_summary


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_failed_run_is_reported_and_finished_runs_are_skipped(notebooks, tmp_path, executor):
    logs = []
    rows = run_notebooks("smoke", results_root=tmp_path / "results", notebooks_dir=notebooks, executor=executor,
                         retries=1, log=logs.append)
    status = {r["notebook"]: r["status"] for r in rows}
    assert status == {"00_ok": "ok", "01_fails": "failed", "90_summary": "ok"}
    assert "data missing" in rows[1]["error"]
    assert any("retrying 1 failed run" in line for line in logs)
    out = tmp_path / "results" / "smoke"
    assert (out / "00_ok.ipynb").is_file() and (out / "ok.txt").read_text() == "smoke"
    summary = (out / "summary.md").read_text()
    assert "01_fails" in summary and "failed" in summary
    # started again: only what was missing (the failed run) runs
    logs.clear()
    rows = run_notebooks("smoke", results_root=tmp_path / "results", notebooks_dir=notebooks, executor=executor,
                         retries=0, log=logs.append)
    assert [r["status"] for r in rows] == ["ok (done earlier)", "failed", "ok (done earlier)"]
    assert sum("running" in line or "submitted" in line for line in logs) == 1


def test_a_changed_notebook_reruns(notebooks, tmp_path):
    run_notebooks("smoke", results_root=tmp_path / "r", notebooks_dir=notebooks, only=["00"], log=lambda *_: None)
    write_notebook(notebooks, "00_ok", "from pathlib import Path\nPath(results_dir, 'ok.txt').write_text('v2')")
    rows = run_notebooks("smoke", results_root=tmp_path / "r", notebooks_dir=notebooks, only=["00"],
                         log=lambda *_: None)
    assert rows[0]["status"] == "ok" and (tmp_path / "r" / "smoke" / "ok.txt").read_text() == "v2"
    record = json.loads((tmp_path / "r" / "smoke" / ".runs" / "00_ok.json").read_text())
    assert record["status"] == "ok" and record["fingerprint"]


def test_submitit_local_subprocess_executor(notebooks, tmp_path):
    rows = run_notebooks("smoke", results_root=tmp_path / "r", notebooks_dir=notebooks, only=["00"],
                         executor="submitit-local", cluster_options={"timeout_min": 5}, log=lambda *_: None)
    assert rows[0]["status"] == "ok"
