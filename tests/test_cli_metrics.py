"""`zsad metrics` and `zsad bench`: golden values through the command line, JSON with provenance, and one
clear line for bad files."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from conftest import GOLDEN
from zsad_core.cli import main

REPO = Path(__file__).resolve().parent.parent
METRICS_GOLDEN = GOLDEN / "metrics"
AGGREGATE = json.loads((METRICS_GOLDEN / "aggregate_example.json").read_text())
CANONICAL = json.loads((METRICS_GOLDEN / "canonical_values.json").read_text())
VALUES = json.loads((METRICS_GOLDEN / "values.json").read_text())


def aggregate_arrays():
    cases = [np.load(METRICS_GOLDEN / "cases" / f"{c}.npz") for c in AGGREGATE["categories"]]
    return {"anomaly_maps": np.concatenate([c["maps"] for c in cases]),
            "masks": np.concatenate([c["masks"] for c in cases]),
            "labels": np.concatenate([c["labels"] for c in cases]),
            "image_scores": np.concatenate([c["scores"] for c in cases]),
            "categories": np.concatenate([[n] * len(c["labels"]) for n, c in zip(AGGREGATE["categories"], cases)])}


def test_golden_dataset_through_the_cli(tmp_path, capsys):
    np.savez(tmp_path / "pred.npz", **aggregate_arrays())
    out = tmp_path / "metrics.json"
    assert main(["metrics", str(tmp_path / "pred.npz"), "--legacy", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "no_normal_images" in table and "mean" in table and "NaN" in table
    record = json.loads(out.read_text())
    for category in AGGREGATE["categories"]:
        for metric, expected in CANONICAL[category].items():
            key = {"pixel_aupro": "aupro"}.get(metric, metric)
            if key not in record["per_category"][category]:
                continue  # the extra AUPRO limits / connectivity are not part of the command's output
            got = record["per_category"][category][key]
            assert got == "NaN" if expected == "NaN" else abs(got - expected) <= 1e-12, (category, metric)
        legacy = VALUES[category]["anomalyclip"]["pixel_aupro"]
        got = record["per_category"][category]["aupro_legacy"]
        assert got == "NaN" if legacy == "NaN" else abs(got - legacy) <= 1e-12
    for metric, expected in AGGREGATE["canonical_nan_skipping"].items():
        mean = record["mean"]["aupro" if metric == "pixel_aupro" else metric]
        assert mean["n_categories"] == expected["n_categories"] and abs(mean["mean"] - expected["mean"]) <= 1e-12
    assert record["mean"]["aupro_legacy"]["n_categories"] == 4
    assert record["provenance"]["fingerprints"]["input"] == {"pred.npz": record["sha256"]}
    assert record["per_category"]["mixed"]["n_images"] == 12


def test_safetensors_without_categories_and_default_image_scores(tmp_path):
    case = np.load(METRICS_GOLDEN / "cases" / "mixed.npz")
    path = tmp_path / "pred.safetensors"
    save_file({"anomaly_maps": case["maps"], "masks": case["masks"], "labels": case["labels"]}, str(path))
    assert main(["metrics", str(path)]) == 0
    record = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert list(record["per_category"]) == ["all"] and record["image_scores"] == "max of each anomaly map"
    assert abs(record["per_category"]["all"]["pixel_auroc"] - CANONICAL["mixed"]["pixel_auroc"]) <= 1e-12
    assert "aupro_legacy" not in record["mean"]
    # image AUROC of the map maximum, not of the stored scores
    from zsad_core.metrics import auroc

    assert record["per_category"]["all"]["image_auroc"] == auroc(case["maps"].max(axis=(1, 2)), case["labels"])


def test_safetensors_categories_from_metadata(tmp_path):
    arrays = aggregate_arrays()
    names = arrays.pop("categories").tolist()
    path = tmp_path / "pred.safetensors"
    save_file(arrays, str(path), metadata={"categories": json.dumps(names)})
    assert main(["metrics", str(path), "--out", str(tmp_path / "m.json")]) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert list(record["per_category"]) == AGGREGATE["categories"]


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "zsad_core", *args], capture_output=True, text=True, cwd=REPO)
    return proc.returncode, proc.stderr.strip().splitlines()


def bad_files(tmp: Path) -> list[tuple[Path, str]]:
    good = {k: v[:12] for k, v in aggregate_arrays().items()}
    cases = []

    def npz(name, **changes):
        arrays = {**good, **changes}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        np.savez(tmp / f"{name}.npz", **arrays)
        return tmp / f"{name}.npz"

    cases.append((npz("no_masks", masks=None), "missing masks"))
    cases.append((npz("shape", masks=good["masks"][:, :32]), "differs from anomaly_maps shape"))
    cases.append((npz("labels", labels=good["labels"][:5]), "labels must have shape [12]"))
    nan_maps = good["anomaly_maps"].copy()
    nan_maps[3, 5, 5] = np.nan
    cases.append((npz("nan", anomaly_maps=nan_maps), "NaN or inf"))
    cases.append((npz("nan_scores", image_scores=np.full(12, np.inf, np.float32)), "image_scores contain 12 NaN"))
    cases.append((npz("objects", categories=np.array(["a"] * 12, dtype=object)), "string array"))
    (tmp / "broken.npz").write_text("not a zip")
    cases.append((tmp / "broken.npz", "not a readable .npz"))
    (tmp / "pred.txt").write_text("x")
    cases.append((tmp / "pred.txt", "unknown format"))
    cases.append((tmp / "missing.npz", "no such file"))
    return cases


def test_bad_files_are_one_clear_line(tmp_path, capsys):
    for path, expected in bad_files(tmp_path):
        assert main(["metrics", str(path), "--out", str(tmp_path / "o.json")]) == 2, path
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and path.name in lines[0], (path.name, lines)
    assert not (tmp_path / "o.json").exists()


def test_bad_file_exit_status_of_the_real_command(tmp_path):
    path, expected = bad_files(tmp_path)[0]
    code, lines = run_cli("metrics", str(path))
    assert code != 0 and len(lines) == 1 and expected in lines[0]


def test_bench_command_writes_json_with_machine_and_provenance(tmp_path, monkeypatch):
    from zsad_core import bench

    monkeypatch.setitem(bench.BENCHMARKS, "tiny", bench.Benchmark(
        "tiny", "a tiny check", lambda progress, **options: {"steps": [i for i in progress(range(3), "tiny")]}))
    assert main(["bench", "--only", "tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["result"] == {"steps": [0, 1, 2]} and record["benchmark"] == "tiny"
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "gpu"} <= set(record["machine"])
    assert record["provenance"]["config"]["benchmark"] == "tiny"
    assert main(["bench", "--only", "nosuch", "--out", str(tmp_path)]) == 2


def test_bench_runs_methods_at_the_nearest_size_the_patch_divides():
    from zsad_core.bench import nearest_patch_multiple

    assert nearest_patch_multiple(518, 14) == 518 and nearest_patch_multiple(336, 14) == 336
    assert nearest_patch_multiple(518, 16) == 512 and nearest_patch_multiple(336, 16) == 336
    assert nearest_patch_multiple(240, 32) == 256 and nearest_patch_multiple(5, 16) == 16


def test_synthetic_category_is_deterministic_and_realistic():
    from zsad_core.bench import synthetic_category
    from zsad_core.metrics import aupro, label_regions

    a = synthetic_category(n_images=6, size=64, n_anomalous=3, seed=1)
    b = synthetic_category(n_images=6, size=64, n_anomalous=3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    maps, masks, labels = a
    assert maps.dtype == np.float32 and masks.dtype == np.uint8 and labels.sum() == 3
    assert not masks[labels == 0].any() and all(masks[i].any() for i in np.flatnonzero(labels))
    assert label_regions(masks)[1] >= 3 and 0.15 < aupro(maps, masks) < 1


def test_committed_aupro_bench_result():
    """results/bench/aupro.json is tracked and has the values and timings this module computes."""
    record = json.loads((REPO / "results" / "bench" / "aupro.json").read_text())
    results = record["result"]["results"]
    canonical = results["aupro (canonical, 8-connectivity)"]
    assert 0 < canonical["value"] < 1 and canonical["seconds"] > 0
    assert math.isclose(results["aupro anomalib HEAD behaviour"]["value"], canonical["value"], abs_tol=1e-12)
    assert record["result"]["data"]["n_images"] == 100 and record["result"]["data"]["size"] == 256
