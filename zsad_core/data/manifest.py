"""Dataset manifests: what a user's copy of a dataset must look like, and a validator for them.

A manifest is one JSON file per dataset in `data_manifests/` (generated from the shared dataset facts
by `scripts/build_manifests.py`) or next to a synthetic dataset (`zsad data synth`). Every fact in it
comes from a cited source; an unknown fact is `null` and a note says why.

Schema (version 1), top level:
    schema_version  1
    id              file stem, [a-z0-9_]+
    name, domain    domain is "industrial" or "medical"
    homepage        URL or null
    downloads       [{url, archive, sha256, md5, hash_source, notes}] (a hash only where a source pins it)
    license         {id, source, conflict}
    zsad_role       how the ZSAD papers use the dataset (auxiliary training set / zero-shot target)
    used_by         [method names]
    layout          the folder layout `zsad data verify` and the loader read (see LAYOUT_FIELDS)
    categories      {folder name: {object_word, train_good, test_good, test_anomalous, defect_types}}
    counts_source   where the expected counts come from
    mask_convention, image_size {value, confidence}, notes [..], sources [..]
    facts_file      the dataset-facts file the manifest was derived from (null for synthetic data)
    synthetic       null, or {generator, version, size, seed, image_px, sources} for generated data

Layout (`<root>/<category>/train/<normal_dir>/`, `<root>/<category>/test/<normal_dir|defect>/`,
`<root>/<category>/<mask_dir>/<defect>/<mask_names pattern>`):
    source          which distribution of the data this layout is (raw archive, zsad prepare, ...)
    splits          ["train", "test"] or ["test"] (test-only datasets)
    normal_dir      folder of normal images ("good")
    image_extensions  accepted image extensions (matched case-insensitively)
    mask_dir        folder beside train/ and test/ holding the masks ("ground_truth")
    mask_names      patterns tried in order, "{stem}" = image file name without extension
    pixel_masks     true: every anomalous image has a mask; false: image-level dataset (no masks, anomalous
                    images get all-zero masks); null: unknown (masks used where present, not required)
    prepare         null, or {"converter": NAME, ...options} for `zsad data prepare`
    raw_layout      the layout of the original download (text)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ZsadError

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
MANIFEST_DIR = REPO_ROOT / "data_manifests"
DOMAINS = ("industrial", "medical")
COUNT_FIELDS = ("train_good", "test_good", "test_anomalous")

TOP_FIELDS = {
    "schema_version": int, "id": str, "name": str, "domain": str, "homepage": (str, type(None)),
    "downloads": list, "license": dict, "zsad_role": (str, type(None)), "used_by": list, "layout": dict,
    "categories": dict, "counts_source": str, "mask_convention": (str, type(None)), "image_size": dict,
    "notes": list, "sources": list, "facts_file": (str, type(None)), "synthetic": (dict, type(None)),
}
DOWNLOAD_FIELDS = {"url": (str, type(None)), "archive": (str, type(None)), "sha256": (str, type(None)),
                   "md5": (str, type(None)), "hash_source": (str, type(None)), "notes": (str, type(None))}
LICENSE_FIELDS = {"id": (str, type(None)), "source": str, "conflict": (str, type(None))}
LAYOUT_FIELDS = {"source": str, "splits": list, "normal_dir": str, "image_extensions": list, "mask_dir": str,
                 "mask_names": list, "pixel_masks": (bool, type(None)), "prepare": (dict, type(None)), "raw_layout": (str, type(None))}
CATEGORY_FIELDS = {"object_word": str, "object_word_source": str, "train_good": (int, type(None)),
                   "test_good": (int, type(None)), "test_anomalous": (int, type(None)),
                   "defect_types": (dict, type(None))}
IMAGE_SIZE_FIELDS = {"value": (int, list, dict, type(None)), "confidence": str}
SYNTHETIC_FIELDS = {"generator": str, "version": int, "size": str, "seed": int, "image_px": int, "sources": dict}


class ManifestError(ZsadError):
    """A manifest that is missing, unreadable or breaks the schema; the message lists every problem."""


def _type_name(t) -> str:
    names = [x.__name__.replace("NoneType", "null") for x in (t if isinstance(t, tuple) else (t,))]
    return " or ".join(names)


def _has_type(value, typ) -> bool:
    """isinstance, except that true/false is not accepted where a number is expected."""
    types = typ if isinstance(typ, tuple) else (typ,)
    return bool in types if isinstance(value, bool) else isinstance(value, types)


def _check_fields(obj: dict, fields: dict, where: str, problems: list[str], optional=()) -> None:
    """Every field present with the right type, no unknown field (a typo would silently be ignored)."""
    for key, typ in fields.items():
        if key not in obj:
            if key not in optional:
                problems.append(f"{where}: missing field '{key}' ({_type_name(typ)})")
        elif not _has_type(obj[key], typ):
            problems.append(f"{where}.{key}: expected {_type_name(typ)}, got {type(obj[key]).__name__} "
                            f"{json.dumps(obj[key])[:60]}")
    for key in obj:
        if key not in fields:
            problems.append(f"{where}: unknown field '{key}' (typo? known fields: {', '.join(fields)})")


def validate_manifest(manifest: dict, where: str = "manifest") -> list[str]:
    """All schema problems of a manifest as readable strings (empty list = valid)."""
    if not isinstance(manifest, dict):
        return [f"{where}: the top level must be a JSON object"]
    problems: list[str] = []
    _check_fields(manifest, TOP_FIELDS, where, problems)
    if manifest.get("schema_version") not in (None, SCHEMA_VERSION) and isinstance(manifest.get("schema_version"), int):
        problems.append(f"{where}.schema_version: {manifest['schema_version']} is not supported "
                        f"(this zsad reads version {SCHEMA_VERSION})")
    if isinstance(manifest.get("id"), str) and not re.fullmatch(r"[a-z0-9_]+", manifest["id"]):
        problems.append(f"{where}.id: {manifest['id']!r} must match [a-z0-9_]+")
    if isinstance(manifest.get("domain"), str) and manifest["domain"] not in DOMAINS:
        problems.append(f"{where}.domain: {manifest['domain']!r} must be one of {', '.join(DOMAINS)}")

    for i, dl in enumerate(manifest.get("downloads") or []):
        w = f"{where}.downloads[{i}]"
        if not isinstance(dl, dict):
            problems.append(f"{w}: must be an object")
            continue
        _check_fields(dl, DOWNLOAD_FIELDS, w, problems)
        for algo, length in (("sha256", 64), ("md5", 32)):
            value = dl.get(algo)
            if isinstance(value, str) and not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
                problems.append(f"{w}.{algo}: {value!r} is not {length} lowercase hex digits")
            if value and not dl.get("hash_source"):
                problems.append(f"{w}: a {algo} needs a hash_source saying who pins it")

    if isinstance(manifest.get("license"), dict):
        _check_fields(manifest["license"], LICENSE_FIELDS, f"{where}.license", problems, optional=("conflict",))
    if isinstance(manifest.get("image_size"), dict):
        _check_fields(manifest["image_size"], IMAGE_SIZE_FIELDS, f"{where}.image_size", problems)
    if isinstance(manifest.get("synthetic"), dict):
        _check_fields(manifest["synthetic"], SYNTHETIC_FIELDS, f"{where}.synthetic", problems)
    for key in ("used_by", "notes", "sources"):
        if isinstance(manifest.get(key), list) and not all(isinstance(x, str) for x in manifest[key]):
            problems.append(f"{where}.{key}: every entry must be a string")

    layout = manifest.get("layout")
    if isinstance(layout, dict):
        w = f"{where}.layout"
        _check_fields(layout, LAYOUT_FIELDS, w, problems)
        splits = layout.get("splits")
        if isinstance(splits, list) and (not splits or not set(splits) <= {"train", "test"} or "test" not in splits):
            problems.append(f"{w}.splits: {splits} must be ['train', 'test'] or ['test']")
        exts = layout.get("image_extensions")
        if isinstance(exts, list) and (not exts or not all(isinstance(e, str) and e.startswith(".") for e in exts)):
            problems.append(f"{w}.image_extensions: {exts} must be a non-empty list like ['.png']")
        names = layout.get("mask_names")
        if isinstance(names, list) and (not names or not all(isinstance(n, str) and "{stem}" in n for n in names)):
            problems.append(f"{w}.mask_names: {names} must be a non-empty list of patterns containing '{{stem}}'")
        prepare = layout.get("prepare")
        if isinstance(prepare, dict) and not isinstance(prepare.get("converter"), str):
            problems.append(f"{w}.prepare: needs a 'converter' name (or set prepare to null)")

    categories = manifest.get("categories")
    if isinstance(categories, dict):
        if not categories:
            problems.append(f"{where}.categories: at least one category is needed")
        for name, cat in categories.items():
            w = f"{where}.categories[{name!r}]"
            if not name or "/" in name or name.startswith("."):
                problems.append(f"{w}: not a usable folder name")
            if not isinstance(cat, dict):
                problems.append(f"{w}: must be an object")
                continue
            _check_fields(cat, CATEGORY_FIELDS, w, problems)
            for key in COUNT_FIELDS:
                if isinstance(cat.get(key), int) and cat[key] < 0:
                    problems.append(f"{w}.{key}: {cat[key]} is negative")
            defects = cat.get("defect_types")
            if isinstance(defects, dict):
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in defects.values()):
                    problems.append(f"{w}.defect_types: counts must be non-negative integers")
                elif isinstance(cat.get("test_anomalous"), int) and sum(defects.values()) != cat["test_anomalous"]:
                    problems.append(f"{w}: defect_types add up to {sum(defects.values())}, "
                                    f"but test_anomalous is {cat['test_anomalous']}")
                normal = (layout or {}).get("normal_dir") if isinstance(layout, dict) else None
                if normal in defects:
                    problems.append(f"{w}.defect_types: '{normal}' is the normal folder, not a defect type")
            if isinstance(layout, dict) and layout.get("splits") == ["test"] and cat.get("train_good"):
                problems.append(f"{w}.train_good: {cat['train_good']} images, but layout.splits has no 'train'")
    return problems


def check_manifest(manifest: dict, where: str = "manifest") -> dict:
    """Raise a ManifestError listing every problem, or return the manifest unchanged."""
    problems = validate_manifest(manifest, where)
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise ManifestError(f"{where}: {len(problems)} schema problem(s); fix the manifest:\n  {shown}")
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Read and validate one manifest file."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); fix the file or regenerate it") from None
    return check_manifest(manifest, str(path))


def manifest_path(name: str) -> Path:
    """A known manifest id (data_manifests/<id>.json) or a path to a manifest file."""
    candidate = Path(name)
    if candidate.suffix == ".json" or candidate.is_file() or candidate.is_dir():
        if candidate.is_dir():
            candidate = candidate / "manifest.json"
        return candidate
    path = MANIFEST_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(known_manifests())
        raise ManifestError(f"unknown dataset {name!r}; known: {known} (or pass a path to a manifest .json)")
    return path


def load_manifest(name_or_path: str | Path | dict) -> dict:
    """A manifest by id, by path, or a dict (validated either way)."""
    if isinstance(name_or_path, dict):
        return check_manifest(name_or_path, f"manifest {name_or_path.get('id', '?')!r}")
    return read_manifest(manifest_path(str(name_or_path)))


def known_manifests() -> list[str]:
    """Ids of the manifests in data_manifests/, sorted."""
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))


def totals(manifest: dict) -> dict[str, int | None]:
    """Sum of each count over the categories; None if any category's count is unknown."""
    out = {}
    for key in COUNT_FIELDS:
        values = [c.get(key) for c in manifest["categories"].values()]
        out[key] = None if any(v is None for v in values) else sum(values)
    return out
