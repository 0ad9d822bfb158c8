"""`zsad data prepare`: convert a raw download into the MVTec layout the loader reads.

Converters (chosen by the manifest's layout.prepare.converter):
    visa          split_csv/1cls.csv (columns object,split,label,image,mask) -> <object>/{train/good,
                  test/good, test/bad, ground_truth/bad/<stem>_mask.png}; images copied byte for byte;
                  the multi-class index masks binarised with != 0 to 0/255.
    btad          BTech_Dataset_transformed/<01|02|03>/{train/ok, test/ok, test/ko, ground_truth/ko}
                  with per-product extensions (01: .bmp images + .png masks, 02: .png + .png,
                  03: .bmp + .bmp) -> one layout, everything PNG (lossless), ok -> good,
                  masks <stem>_mask.png binarised != 0.
    images_masks  <src>/<images_dir>/<id>.* + <src>/<masks_dir>/<id>.* (polyp sets, TN3K), paired by
                  file name, never by sorted order -> <category>/test/<defect_dir>/ + ground_truth.
    bmad          BMAD subset <src>/{train/good/img, test/good/img, test/Ungood/img, test/Ungood/label}
                  -> <category>/{train/good, test/good, test/Ungood, ground_truth/Ungood}.

Every output file is written atomically, and a re-run skips outputs that already exist, so an
interrupted conversion resumes. Problems (missing sources, bad CSV rows, unpaired masks) are
collected, written to <dst>/zsad_prepare_report.json and shown; the files that could be converted
are kept.
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .layout import IMAGE_EXTENSIONS, DataError, write_bytes_atomic
from .manifest import load_manifest

REPORT_NAME = "zsad_prepare_report.json"


@dataclass
class Task:
    kind: str  # copy | png | mask
    src: Path
    dst: Path
    category: str
    folder: str  # "train/good", "test/bad", "ground_truth/bad", ...


@dataclass
class Conversion:
    dataset: str
    converter: str
    src: str
    dst: str
    counts: dict = field(default_factory=dict)  # category -> folder -> files written or kept
    written: int = 0
    kept_existing: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mask_values: dict = field(default_factory=dict)  # "0,255" -> number of source masks with that value set

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"zsad data prepare {self.dataset} ({self.converter}): {self.src} -> {self.dst}"]
        for category, folders in sorted(self.counts.items()):
            lines.append(f"  {category}: " + ", ".join(f"{k} {v}" for k, v in sorted(folders.items())))
        lines.append(f"  {self.written} files written, {self.kept_existing} already there (kept)")
        if self.mask_values:
            lines.append("  source mask values: " + "; ".join(f"{{{k}}} in {v} masks" for k, v in
                                                           sorted(self.mask_values.items())))
        lines += [f"  note: {n}" for n in self.notes]
        for p in self.problems[:20]:
            lines.append(f"  - {p}")
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more in {Path(self.dst) / REPORT_NAME}")
        lines.append("OK" if self.ok else f"{len(self.problems)} problem(s); the files that could be converted were kept")
        return "\n".join(lines)


def _binary_mask_png(src: Path, values: dict) -> bytes:
    """Any mask (index, 0/1, 0/255, RGB) -> 0/255 'L' PNG with 255 wherever the source is != 0."""
    with Image.open(src) as img:
        array = np.asarray(img)  # palette images give their indices, which is what != 0 must test
    if array.ndim == 3:
        array = array[..., :3].any(axis=2) if array.shape[2] >= 3 else array[..., 0]
    key = ",".join(str(v) for v in np.unique(array)[:6]) + ("..." if len(np.unique(array)) > 6 else "")
    values[key] = values.get(key, 0) + 1
    buffer = io.BytesIO()
    Image.fromarray(((array != 0) * 255).astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png(src: Path) -> bytes:
    """A lossless PNG re-encoding of an image file (BMP/TIFF -> PNG keeps every pixel value)."""
    with Image.open(src) as img:
        img.load()
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _run(tasks: list[Task], conversion: Conversion, progress: bool) -> None:
    from tqdm.auto import tqdm

    seen: dict[Path, Path] = {}
    for task in tqdm(tasks, desc=f"prepare {conversion.dataset}", unit="file", disable=not progress):
        if task.dst in seen:
            conversion.problems.append(f"{task.src}: would overwrite {task.dst} (also from {seen[task.dst]}); "
                                       "two sources map to one name - rename one of them")
            continue
        seen[task.dst] = task.src
        if not task.src.is_file():
            conversion.problems.append(f"{task.src}: missing source file; restore it from the archive")
            continue
        folders = conversion.counts.setdefault(task.category, {})
        folders[task.folder] = folders.get(task.folder, 0) + 1
        if task.dst.is_file():  # written atomically by an earlier run, so complete
            conversion.kept_existing += 1
            continue
        try:
            if task.kind == "copy":
                task.dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = task.dst.with_name(f".{task.dst.name}.tmp")
                shutil.copyfile(task.src, tmp)
                tmp.replace(task.dst)
            elif task.kind == "png":
                write_bytes_atomic(task.dst, _png(task.src))
            else:
                write_bytes_atomic(task.dst, _binary_mask_png(task.src, conversion.mask_values))
            conversion.written += 1
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            folders[task.folder] -= 1
            conversion.problems.append(f"{task.src}: unreadable ({err.__class__.__name__}: {err}); "
                                       "restore it from the archive")


def _find(src: Path, relative: str, hint: str) -> Path:
    """src itself, or a folder below it, that contains `relative` (users pass the archive folder or its parent)."""
    for base in [src] + sorted(p for p in src.iterdir() if p.is_dir()):
        if (base / relative).exists():
            return base
    raise DataError(f"{src}: no {relative} here or one folder below; {hint}")


# ---------------------------------------------------------------------------- converters
def convert_visa(src: Path, dst: Path, manifest: dict, options: dict, conversion: Conversion) -> list[Task]:
    csv_rel = options.get("split_csv", "split_csv/1cls.csv")
    base = _find(src, csv_rel, "pass the extracted VisA_20220922 folder as --src")
    csv_path = base / csv_rel
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"object", "split", "label", "image", "mask"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: columns {reader.fieldnames}, expected {sorted(needed)} "
                            "(use the official split_csv/1cls.csv)")
        rows = list(reader)
    known = set(manifest["categories"])
    tasks = []
    for line, row in enumerate(rows, start=2):
        obj, split, label = row["object"].strip(), row["split"].strip(), row["label"].strip()
        image = base / row["image"].strip()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            conversion.problems.append(f"{csv_path}:{line}: split {split!r} / label {label!r} not train|test / "
                                       "normal|anomaly; row skipped")
            continue
        if obj not in known:
            conversion.problems.append(f"{csv_path}:{line}: object {obj!r} is not a VisA category; row skipped")
            continue
        if label == "normal":
            tasks.append(Task("copy", image, dst / obj / split / "good" / image.name, obj, f"{split}/good"))
            continue
        if split != "test" or not row["mask"].strip():
            conversion.problems.append(f"{csv_path}:{line}: anomalous row in split {split!r} or without a mask; "
                                       "the MVTec layout has anomalies only in test with masks; row skipped")
            continue
        tasks.append(Task("copy", image, dst / obj / "test" / "bad" / image.name, obj, "test/bad"))
        tasks.append(Task("mask", base / row["mask"].strip(), dst / obj / "ground_truth" / "bad" / f"{image.stem}_mask.png",
                          obj, "ground_truth/bad"))
    conversion.notes.append(f"split file {csv_path} ({len(rows)} rows)")
    return tasks


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".")) if folder.is_dir() else []


def convert_btad(src: Path, dst: Path, manifest: dict, options: dict, conversion: Conversion) -> list[Task]:
    categories = list(manifest["categories"])
    base = _find(src, categories[0], "pass the extracted BTech_Dataset_transformed folder as --src")
    tasks = []
    for product in categories:
        folder = base / product
        if not folder.is_dir():
            conversion.problems.append(f"{folder}: product folder missing; re-extract btad.zip")
            continue
        extensions = set()
        masks = {m.stem: m for m in _images(folder / "ground_truth" / "ko")}
        for split_dir, out_dir in (("train/ok", "train/good"), ("test/ok", "test/good"), ("test/ko", "test/ko")):
            for image in _images(folder / split_dir):
                extensions.add(f"images {image.suffix}")
                kind = "copy" if image.suffix.lower() == ".png" else "png"
                tasks.append(Task(kind, image, dst / product / out_dir / f"{image.stem}.png", product, out_dir))
                if split_dir == "test/ko":
                    if image.stem not in masks:
                        conversion.problems.append(f"{folder / 'ground_truth' / 'ko'}/{image.stem}.*: missing mask of "
                                                   f"{image}; restore it from btad.zip")
                        continue
                    extensions.add(f"masks {masks[image.stem].suffix}")
                    tasks.append(Task("mask", masks[image.stem], dst / product / "ground_truth" / "ko" / f"{image.stem}_mask.png",
                                      product, "ground_truth/ko"))
        conversion.notes.append(f"{product}: source " + ", ".join(sorted(extensions)))
    return tasks


def convert_images_masks(src: Path, dst: Path, manifest: dict, options: dict, conversion: Conversion) -> list[Task]:
    images_dir, masks_dir = options.get("images_dir", "images"), options.get("masks_dir", "masks")
    defect = options.get("defect_dir", "anomaly")
    base = _find(src, images_dir, f"pass the folder holding {images_dir}/ and {masks_dir}/ as --src")
    category = next(iter(manifest["categories"]))
    masks = {m.stem: m for m in _images(base / masks_dir)}
    tasks = []
    for image in _images(base / images_dir):
        mask = masks.pop(image.stem, None)
        if mask is None:
            conversion.problems.append(f"{base / masks_dir}/{image.stem}.*: no mask with the name of {image}; "
                                       "images and masks are paired by name")
            continue
        tasks.append(Task("copy", image, dst / category / "test" / defect / image.name, category, f"test/{defect}"))
        tasks.append(Task("mask", mask, dst / category / "ground_truth" / defect / f"{image.stem}_mask.png",
                          category, f"ground_truth/{defect}"))
    for stem, mask in sorted(masks.items()):
        conversion.problems.append(f"{mask}: mask without an image named {stem}.* in {base / images_dir}")
    return tasks


def convert_bmad(src: Path, dst: Path, manifest: dict, options: dict, conversion: Conversion) -> list[Task]:
    base = _find(src, "test/Ungood/img", "pass the BMAD subset folder (e.g. Brain or Brain_AD) as --src")
    category = next(iter(manifest["categories"]))
    tasks = []
    for source, out_dir in (("train/good/img", "train/good"), ("test/good/img", "test/good"), ("test/Ungood/img", "test/Ungood")):
        for image in _images(base / source):
            tasks.append(Task("copy", image, dst / category / out_dir / image.name, category, out_dir))
            if out_dir == "test/Ungood":
                mask = base / "test/Ungood/label" / image.name
                tasks.append(Task("mask", mask, dst / category / "ground_truth/Ungood" / f"{image.stem}_mask.png",
                                  category, "ground_truth/Ungood"))
    return tasks


CONVERTERS = {"visa": convert_visa, "btad": convert_btad, "images_masks": convert_images_masks, "bmad": convert_bmad}


def prepare(name: str, src: str | Path, dst: str | Path, *, progress: bool = False) -> Conversion:
    """Convert the raw copy at src into the manifest's layout at dst; returns (and writes) the report."""
    from ..provenance import write_json_atomic

    manifest = load_manifest(name)
    options = manifest["layout"]["prepare"]
    if options is None:
        raise DataError(f"{manifest['id']}: no conversion needed or none available ({manifest['layout']['source']}); "
                        f"check a copy with `zsad data verify {manifest['id']} --root DIR`")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"{src}: no such folder (pass the extracted raw download as --src)")
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: --dst must differ from --src (the raw copy is never changed)")
    conversion = Conversion(manifest["id"], options["converter"], str(src), str(dst))
    tasks = CONVERTERS[options["converter"]](src, dst, manifest, options, conversion)
    dst.mkdir(parents=True, exist_ok=True)
    _run(tasks, conversion, progress)
    write_json_atomic(dst / REPORT_NAME, {**conversion.__dict__, "ok": conversion.ok})
    return conversion
