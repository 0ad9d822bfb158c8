"""Reading the MVTec-style folder layout every zsad dataset is stored in:

    <root>/<category>/train/<normal_dir>/<image>                    (absent for test-only datasets)
    <root>/<category>/test/<normal_dir>/<image>
    <root>/<category>/test/<defect type>/<image>
    <root>/<category>/<mask_dir>/<defect type>/<mask_names pattern>   e.g. 000_mask.png for 000.png

One scanner serves the loader and `zsad data verify`, so both see the same files in the same
(sorted) order. It only lists files; reading them is the caller's business.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZsadError
from ..provenance import write_bytes_atomic  # used here and by prepare/synth

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "test")


class DataError(ZsadError):
    """A dataset folder that cannot be read as asked; the message names the path and the fix."""


@dataclass(frozen=True)
class Layout:
    """The folder conventions of one dataset (the `layout` block of its manifest)."""

    splits: tuple[str, ...] = SPLITS
    normal_dir: str = "good"
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    mask_dir: str = "ground_truth"
    mask_names: tuple[str, ...] = ("{stem}_mask.png", "{stem}.png")
    pixel_masks: bool | None = True  # None: unknown; masks are used where present but not required

    @classmethod
    def from_manifest(cls, manifest: dict | None) -> "Layout":
        if manifest is None:
            return cls()
        lay = manifest["layout"]
        return cls(splits=tuple(lay["splits"]), normal_dir=lay["normal_dir"],
                   image_extensions=tuple(e.lower() for e in lay["image_extensions"]), mask_dir=lay["mask_dir"],
                   mask_names=tuple(lay["mask_names"]), pixel_masks=lay["pixel_masks"])

    def is_image(self, path: Path) -> bool:
        return path.suffix.lower() in self.image_extensions and not path.name.startswith(".")


@dataclass(frozen=True)
class Sample:
    """One image of the layout. `mask_path` is None for normal images and for a missing mask."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    category: str
    split: str  # "train" or "test"
    defect_type: str  # the folder under test/ ("good" for normal images)
    mask_path: Path | None = None


@dataclass
class CategoryScan:
    """What one category folder holds: its images, and the files that do not fit the layout."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    missing_masks: list[Sample] = field(default_factory=list)  # anomalous images without a mask file
    orphan_masks: list[Path] = field(default_factory=list)  # mask files that belong to no image
    stray_files: list[Path] = field(default_factory=list)  # non-image files where images are expected
    missing_dirs: list[Path] = field(default_factory=list)  # split folders the layout requires

    def count(self, split: str, label: int | None = None, defect: str | None = None) -> int:
        return sum(1 for s in self.samples if s.split == split and (label is None or s.label == label)
                   and (defect is None or s.defect_type == defect))

    def defect_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            if s.split == "test" and s.label == 1:
                out[s.defect_type] = out.get(s.defect_type, 0) + 1
        return dict(sorted(out.items()))


def _visible_entries(folder: Path) -> list[Path]:
    """Sorted entries of a folder, without hidden files (.DS_Store, ._* resource forks)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def discover_categories(root: Path) -> list[str]:
    """Category folders of a bare root: sorted sub-folders that hold a train/ or test/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder (check --root; `zsad data synth` makes a synthetic one)")
    return [p.name for p in _visible_entries(root) if p.is_dir() and ((p / "test").is_dir() or (p / "train").is_dir())]


def _images_in(folder: Path, layout: Layout, scan: CategoryScan) -> list[Path]:
    images = []
    for p in _visible_entries(folder):
        if p.is_file() and layout.is_image(p):
            images.append(p)
        elif p.is_file():
            scan.stray_files.append(p)
    return images


def find_mask(category_dir: Path, defect: str, image: Path, layout: Layout) -> Path | None:
    """The mask of an anomalous image: the first mask_names pattern that exists."""
    folder = category_dir / layout.mask_dir / defect
    for pattern in layout.mask_names:
        candidate = folder / pattern.format(stem=image.stem)
        if candidate.is_file():
            return candidate
    return None


def scan_category(root: Path, category: str, layout: Layout, splits=None) -> CategoryScan:
    """List one category's images (sorted by split, then folder, then file name) and what is off."""
    category_dir = Path(root) / category
    scan = CategoryScan(category)
    for split in splits or layout.splits:
        split_dir = category_dir / split
        if not split_dir.is_dir():
            scan.missing_dirs.append(split_dir)
            continue
        for folder in _visible_entries(split_dir):
            if not folder.is_dir():
                if folder.is_file():
                    scan.stray_files.append(folder)
                continue
            label = 0 if folder.name == layout.normal_dir else 1
            if split == "train" and label == 1:
                continue  # training folders other than good are not part of the layout
            for image in _images_in(folder, layout, scan):
                use_masks = label and layout.pixel_masks is not False
                mask = find_mask(category_dir, folder.name, image, layout) if use_masks else None
                sample = Sample(image, label, category, split, folder.name, mask)
                scan.samples.append(sample)
                if label and layout.pixel_masks is True and mask is None:
                    scan.missing_masks.append(sample)
    if layout.pixel_masks is not False and (category_dir / layout.mask_dir).is_dir():
        used = {s.mask_path for s in scan.samples if s.mask_path is not None}
        for folder in _visible_entries(category_dir / layout.mask_dir):
            if folder.is_dir():
                scan.orphan_masks += [p for p in _visible_entries(folder) if p.is_file() and p not in used]
    return scan


# ---------------------------------------------------------------------------- deterministic files
def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 [H,W] or [H,W,3] array. Pillow writes no time stamp and no metadata unless asked,
    and a fixed (fast) compression level makes the bytes a function of the pixels (for one zlib build)."""
    from PIL import Image

    if array.dtype != np.uint8:
        raise ValueError(f"png_bytes needs uint8 pixels, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_png(path: Path, array: np.ndarray) -> None:
    write_bytes_atomic(path, png_bytes(array))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: Path) -> tuple[str, int]:
    """One hash over every file under a folder (relative path + content), and the file count."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
        count += 1
    return digest.hexdigest(), count
