"""Shared fixtures: the tiny backbone (built once per session) and the golden test data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden_data"
INPUT_NAMES = ["brick_good", "brick_scratch", "gravel_good", "gravel_stain"]
INPUT_CLASSES = ["brick", "brick", "gravel", "gravel"]

# One thread: deterministic, and on a shared 2-core machine OpenMP threads that wait on each other
# make small ops 5-20x slower than one thread.
torch.set_num_threads(1)


def golden(method: str, file: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / method / file))


def golden_json(method: str, file: str):
    return json.loads((GOLDEN / method / file).read_text())


def golden_hash(method: str, key: str) -> dict:
    return golden_json(method, "hashes.json")[key]


def input_paths(masks: bool = False) -> list[Path]:
    return [GOLDEN / "inputs" / f"{n}{'_mask' if masks else ''}.png" for n in INPUT_NAMES]


# ZSAD_GOLDEN_REPORT=FILE: every assert_close also records its largest deviation, written to FILE (JSON) at the
# end of the session - the measured distance of each compared tensor from its golden.
_DEVIATIONS: list[dict] = []


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = ""):
    """torch.testing.assert_close on float32 CPU copies, with the tolerance in the message."""
    actual, expected = actual.detach().cpu().float(), expected.float()
    if os.environ.get("ZSAD_GOLDEN_REPORT") and actual.shape == expected.shape and actual.numel():
        diff = (actual - expected).abs()
        _DEVIATIONS.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "name": name,
                            "max_abs": float(diff.max()), "atol": atol, "rtol": rtol,
                            "max_fraction_of_tolerance": float((diff / (atol + rtol * expected.abs())).max())})
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m} (atol {atol}, rtol {rtol})")


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get("ZSAD_GOLDEN_REPORT")
    if report and _DEVIATIONS:
        Path(report).write_text(json.dumps(_DEVIATIONS, indent=1) + "\n")


@pytest.fixture(scope="session")
def tiny():
    from zsad_core.backbone import load_backbone

    return load_backbone("tiny")


def check_zsad_checkpoint_round_trip(make, tiny, tmp_path):
    """make(tiny[, checkpoint=False]) -> method: zsad's own checkpoint restores every learnable tensor."""
    source = make(tiny)
    path = tmp_path / "a.safetensors"
    source.save_checkpoint(path)
    loaded = make(tiny, checkpoint=False)
    loaded.load_checkpoint(path)
    assert all(torch.equal(loaded.learnable_state()[k], v) for k, v in source.learnable_state().items())


def check_foreign_checkpoints_fail_in_one_line(method, tmp_path):
    """Another method's official file and a file that is no checkpoint: one line naming the file."""
    from zsad_core.errors import CheckpointError

    (tmp_path / "notes.pth").write_text("hello")
    for path, expected in [(GOLDEN / "aprilgan" / "checkpoints" / "epoch_1.pth", "expected key 'prompt_learner'"),
                           (tmp_path / "notes.pth", "not a readable PyTorch checkpoint")]:
        with pytest.raises(CheckpointError, match=expected) as err:
            method.load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
