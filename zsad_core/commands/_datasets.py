"""Finding a dataset for the train/evaluate commands: a manifest id plus a root, or a synthetic domain."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZsadError


def dataset_root(name: str, root: str | None) -> Path:
    """The folder of dataset `name`: --root if given; for a synthetic domain without --root, the
    smoke-size copy under data/synthetic/ (generated on first use)."""
    from ..data import SYNTHETIC_DOMAINS, ensure_synthetic, known_manifests

    if root:
        return Path(root)
    if name in SYNTHETIC_DOMAINS:
        return ensure_synthetic(log=print)[name]
    known = ", ".join(known_manifests())
    if name not in known_manifests():
        raise ZsadError(f"unknown dataset {name!r}; known manifests: {known}")
    raise ZsadError(f"dataset {name!r} needs --root DIR (the folder holding its categories); "
                    f"check a copy with `zsad data verify {name} --root DIR`")


def manifest_for(name: str, root: Path):
    """The manifest of a dataset: its id in data_manifests/, else the manifest.json inside the root."""
    from ..data import known_manifests

    if name in known_manifests():
        return name
    if (root / "manifest.json").is_file():
        return root / "manifest.json"
    return None
