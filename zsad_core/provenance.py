"""Provenance: what produced a number (code version, config, weights and data fingerprints)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("zsad", "torch", "torchvision", "open_clip_torch", "numpy", "scipy", "scikit-learn",
            "scikit-image", "pillow", "safetensors")


def git_revision(path: str | Path | None = None) -> str:
    """`<commit>[-dirty]` of the repository holding the code, or 'unknown' outside a checkout."""
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha256_file(path: str | Path) -> str:
    from .backbone import file_sha256

    return file_sha256(path)


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def provenance(config: dict | None = None, **fingerprints) -> dict:
    """A provenance record: code version, packages, machine, time, config and the given fingerprints."""
    import torch

    return {
        "code_version": git_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(),
                    "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "config": config or {},
        "fingerprints": fingerprints,
    }


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON via a temporary file and a rename, so a reader never sees half a file."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
