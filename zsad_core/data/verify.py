"""`zsad data verify`: check a copy of a dataset against its manifest.

Checks, per category: the folders the layout needs; the number of train/good, test/good and
anomalous images and of each defect type (where the manifest knows them); that every image can be
decoded completely (a truncated file fails here, not in the middle of a run); that every anomalous
image has a readable mask of the same size. Each problem names the file and how to fix it.
Warnings (empty masks, masks without an image, unexpected files or folders) do not fail the check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .layout import CategoryScan, Layout, discover_categories, scan_category
from .manifest import load_manifest, manifest_path

FIX_RESTORE = "restore it from the original archive (re-extract, after checking the archive's checksum)"
FIX_REGENERATE = "regenerate the synthetic data (`zsad data synth --force --out DIR`, same --size and --seed)"


@dataclass
class Finding:
    path: str  # relative to the root ("" = the category itself)
    problem: str
    fix: str
    severity: str = "error"  # error | warning

    def line(self) -> str:
        return f"{self.path or '(category)'}: {self.problem}; fix: {self.fix}"


@dataclass
class CategoryResult:
    name: str
    counts: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


@dataclass
class VerifyReport:
    dataset: str
    root: str
    manifest: str
    categories: list[CategoryResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # about the root, not one category

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings) and not any(c.errors for c in self.categories)

    def format(self, max_lines: int = 15) -> str:
        lines = [f"zsad data verify {self.dataset}: {self.root}", f"  manifest: {self.manifest}"]
        for f in self.findings:
            lines.append(f"  {f.severity.upper()}: {f.line()}")
        width = max([len(c.name) for c in self.categories] + [8])
        for c in self.categories:
            n = c.counts
            summary = (f"train/good {n.get('train_good', 0)}, test/good {n.get('test_good', 0)}, "
                       f"anomalous {n.get('test_anomalous', 0)} ({len(n.get('defect_types', {}))} defect types), "
                       f"masks {n.get('masks', 0)}")
            status = "OK" if not c.errors else f"{len(c.errors)} problem(s)"
            warn = f", {len(c.warnings)} warning(s)" if c.warnings else ""
            lines.append(f"  {c.name:<{width}}  {status}{warn}  [{summary}]")
            for finding in (c.errors + c.warnings)[:max_lines]:
                lines.append(f"      {'-' if finding.severity == 'error' else '~'} {finding.line()}")
            if len(c.findings) > max_lines:
                lines.append(f"      ... and {len(c.findings) - max_lines} more (write them all with --report FILE)")
        n_ok = sum(not c.errors for c in self.categories)
        n_err = sum(len(c.errors) for c in self.categories) + sum(f.severity == "error" for f in self.findings)
        n_warn = sum(len(c.warnings) for c in self.categories) + sum(f.severity == "warning" for f in self.findings)
        verdict = "OK" if self.ok else "MISMATCH"
        lines.append(f"{verdict}: {n_ok}/{len(self.categories)} categories OK, {n_err} problem(s), {n_warn} warning(s)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "root": self.root, "manifest": self.manifest, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings],
                "categories": [{"name": c.name, "ok": not c.errors, "counts": c.counts,
                                "findings": [asdict(f) for f in c.findings]} for c in self.categories]}


def _read(path: Path, decode: bool, is_mask: bool = False) -> tuple[tuple[int, int] | None, str | None, bool]:
    """(size, None, has nonzero pixel) for a good image file, (None, reason, False) otherwise.
    decode=False reads only the header (and then reports every mask as non-empty)."""
    try:
        with Image.open(path) as img:
            if not decode:
                return img.size, None, True
            img.load()  # decodes every byte: truncated or corrupt files fail here
            return img.size, None, bool(np.asarray(img).any()) if is_mask else True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return None, f"{err.__class__.__name__}: {err}", False


def _count_findings(result: CategoryResult, expected: dict, scan: CategoryScan, layout: Layout, restore: str) -> None:
    name = result.name
    counts = result.counts
    for key, found in (("train_good", counts["train_good"]), ("test_good", counts["test_good"]),
                       ("test_anomalous", counts["test_anomalous"])):
        want = expected.get(key)
        if key == "train_good" and "train" not in layout.splits:
            continue
        if want is not None and found != want:
            where = {"train_good": f"train/{layout.normal_dir}", "test_good": f"test/{layout.normal_dir}",
                     "test_anomalous": "test/<defect folders>"}[key]
            result.findings.append(Finding(f"{name}/{where}", f"{found} images, expected {want}",
                                           "copy the missing images back (or remove extra ones); " + restore))
    defects = expected.get("defect_types")
    found_defects = counts["defect_types"]
    if defects is not None:
        for defect, want in defects.items():
            got = found_defects.get(defect, 0)
            if got != want:
                problem = "folder missing" if defect not in found_defects else f"{got} images, expected {want}"
                result.findings.append(Finding(f"{name}/test/{defect}", problem, restore))
        for defect in sorted(set(found_defects) - set(defects)):
            result.findings.append(Finding(f"{name}/test/{defect}", f"unexpected defect folder ({found_defects[defect]} images; "
                                           f"the manifest knows {', '.join(defects) or 'none'})",
                                           "remove or rename it; is this a different version of the dataset?"))


def verify(name_or_manifest, root: str | Path, *, decode: bool = True, progress: bool = False) -> VerifyReport:
    """Check the copy under root against the manifest (id, path or dict)."""
    from tqdm.auto import tqdm

    manifest = load_manifest(name_or_manifest)
    source = name_or_manifest if isinstance(name_or_manifest, dict) else manifest_path(str(name_or_manifest))
    root = Path(root)
    layout = Layout.from_manifest(manifest)
    restore = FIX_REGENERATE if manifest["synthetic"] else FIX_RESTORE
    prepare_hint = (f"convert the raw download first: zsad data prepare {manifest['id']} --src RAW --dst {root}"
                    if manifest["layout"]["prepare"] else None)
    report = VerifyReport(manifest["id"], str(root), str(source) if not isinstance(source, dict) else "(given)")
    if not root.is_dir():
        hint = prepare_hint or "extract the dataset there, or pass the right --root"
        report.findings.append(Finding(str(root), "no such folder", hint))
        return report

    on_disk = set(discover_categories(root))
    for extra in sorted(on_disk - set(manifest["categories"])):
        report.findings.append(Finding(extra, "folder is not a category of this dataset (ignored)",
                                       "nothing, if it is yours; otherwise check --root and the dataset name",
                                       "warning"))
    scans = {}
    for category in manifest["categories"]:
        if (root / category).is_dir():
            scans[category] = scan_category(root, category, layout)
    total = sum(len(s.samples) + sum(1 for x in s.samples if x.mask_path) for s in scans.values())
    bar = tqdm(total=total, desc=f"verify {manifest['id']}", unit="file", disable=not progress)

    for category, expected in manifest["categories"].items():
        result = CategoryResult(category)
        report.categories.append(result)
        if category not in scans:
            result.findings.append(Finding(category, "category folder missing", prepare_hint or restore))
            result.counts = {"train_good": 0, "test_good": 0, "test_anomalous": 0, "defect_types": {}, "masks": 0}
            continue
        scan = scans[category]
        result.counts = {"train_good": scan.count("train", 0), "test_good": scan.count("test", 0),
                         "test_anomalous": scan.count("test", 1), "defect_types": scan.defect_counts(),
                         "masks": sum(1 for s in scan.samples if s.mask_path)}
        for folder in scan.missing_dirs:
            needed = folder.name == "test" or expected.get("train_good")
            if needed:
                result.findings.append(Finding(folder.relative_to(root).as_posix(), "folder missing",
                                               prepare_hint or restore))
        _count_findings(result, expected, scan, layout, restore)

        for sample in scan.samples:
            rel = sample.path.relative_to(root).as_posix()
            size, error, _ = _read(sample.path, decode)
            bar.update()
            if error:
                result.findings.append(Finding(rel, f"unreadable or truncated image ({error})", restore))
            if sample.mask_path is None:
                continue
            mask_rel = sample.mask_path.relative_to(root).as_posix()
            mask_size, mask_error, foreground = _read(sample.mask_path, decode, is_mask=True)
            bar.update()
            if mask_error:
                result.findings.append(Finding(mask_rel, f"unreadable or truncated mask ({mask_error})", restore))
            elif size and mask_size != size:
                result.findings.append(Finding(mask_rel, f"mask is {mask_size[0]}x{mask_size[1]} but its image {rel} is "
                                               f"{size[0]}x{size[1]}", "use the mask that belongs to this image; " + restore))
            elif not foreground:
                result.findings.append(Finding(mask_rel, "mask has no anomalous pixel", "check the mask; pixel metrics "
                                               "will treat this image as having no defect area", "warning"))
        for sample in scan.missing_masks:
            expected_mask = (root / category / layout.mask_dir / sample.defect_type /
                             layout.mask_names[0].format(stem=sample.path.stem)).relative_to(root).as_posix()
            result.findings.append(Finding(expected_mask, f"missing mask of anomalous image "
                                           f"{sample.path.relative_to(root).as_posix()}", restore))
        for orphan in scan.orphan_masks:
            result.findings.append(Finding(orphan.relative_to(root).as_posix(), "mask without a matching image",
                                           "remove it, or restore its image", "warning"))
        for stray in scan.stray_files:
            result.findings.append(Finding(stray.relative_to(root).as_posix(),
                                           f"not an accepted image file ({', '.join(layout.image_extensions)})",
                                           "remove or convert it", "warning"))
    bar.close()
    return report


def write_report(report: VerifyReport, path: str | Path) -> None:
    from ..provenance import write_json_atomic

    write_json_atomic(path, report.to_json())


def verify_root_default(name: str) -> Path | None:
    """For `zsad data verify PATH/manifest.json` without --root: the manifest's own folder."""
    path = Path(name)
    if path.name == "manifest.json" and path.is_file():
        return path.parent
    if path.is_dir() and (path / "manifest.json").is_file():
        return path
    return None
