"""A torch Dataset over the MVTec-style layout, preprocessed like the official codes.

    ds = AnomalyDataset(root, manifest="mvtec_ad", split="test", image_size=518,
                        image_convention="squash", mask_convention="bilinear")
    ds[0] -> {"image": [3,S,S] float32, "mask": [S,S] float32 {0,1}, "label": 0/1,
              "class_name": object word for the prompts, "category", "defect_type", "path"}

Images go through zsad_core.preprocess (the conventions that are bit-exact with the goldens);
normal images get an all-zero mask without reading any file, as every official loader does.

The auxiliary-training convention of the ZSAD papers (AnomalyCLIP, APRIL-GAN, FAPrompt, AA-CLIP,
Bayes-PFL, AdaCLIP): train once on the *test* split of an auxiliary dataset with all its categories
pooled, then evaluate zero-shot on the other datasets -> `auxiliary_training_set(...)`, batched by
`collate_batch` into the training batch format of zsad_core.methods.base.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..preprocess import IMAGE_CONVENTIONS, MASK_CONVENTIONS, open_image, preprocess_image, preprocess_mask
from .layout import DataError, Layout, Sample, discover_categories, scan_category
from .manifest import load_manifest


class AnomalyDataset(torch.utils.data.Dataset):
    """Images of one dataset folder, in sorted order (category, split, defect folder, file name).

    root: the dataset folder (holding one folder per category).
    manifest: a manifest id / path / dict, or None for a bare root (categories found on disk,
        object word = category name, MVTec defaults for the layout).
    split: "test", "train" (train/good only) or "all".
    categories: names to keep (None = all); the dataset always holds them in sorted order.
    object_words: optional {category: word} overriding the manifest's prompt words.
    """

    def __init__(self, root: str | Path, manifest=None, *, split: str = "test", categories=None,
                 image_size: int = 518, image_convention: str = "squash", mask_convention: str = "bilinear",
                 object_words: dict[str, str] | None = None):
        if split not in ("train", "test", "all"):
            raise DataError(f"split {split!r}: use 'train', 'test' or 'all'")
        if image_convention not in IMAGE_CONVENTIONS:
            raise DataError(f"image convention {image_convention!r}: use one of {', '.join(IMAGE_CONVENTIONS)}")
        if mask_convention not in MASK_CONVENTIONS:
            raise DataError(f"mask convention {mask_convention!r}: use one of {', '.join(MASK_CONVENTIONS)}")
        self.root = Path(root)
        self.manifest = load_manifest(manifest) if manifest is not None else None
        self.layout = Layout.from_manifest(self.manifest)
        self.split, self.image_size = split, int(image_size)
        self.image_convention, self.mask_convention = image_convention, mask_convention

        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such dataset folder (check the path; `zsad data synth` makes a "
                            "synthetic one, `zsad data verify NAME --root DIR` checks a copy)")
        available = list(self.manifest["categories"]) if self.manifest else discover_categories(self.root)
        if categories is not None:
            unknown = [c for c in categories if c not in available]
            if unknown:
                raise DataError(f"{self.root}: unknown categories {unknown}; available: {', '.join(available)}")
            available = [c for c in available if c in categories]
        self.categories = sorted(available)
        words = {c: (self.manifest["categories"][c]["object_word"] if self.manifest else c) for c in self.categories}
        self.object_words = {**words, **(object_words or {})}

        splits = [s for s in ("train", "test") if split in (s, "all")]
        if "train" in splits and "train" not in self.layout.splits:
            if split == "train":
                raise DataError(f"{self.root}: this dataset has no train split (test-only in ZSAD use); "
                                "use split='test'")
            splits.remove("train")
        self.samples: list[Sample] = []
        for category in self.categories:
            if not (self.root / category).is_dir():
                raise DataError(f"{self.root / category}: category folder missing; run `zsad data verify` on the root")
            scan = scan_category(self.root, category, self.layout, splits)
            if scan.missing_masks:
                first = scan.missing_masks[0].path
                raise DataError(f"{first}: anomalous image without a mask (and {len(scan.missing_masks) - 1} more in "
                                f"{category}); expected {self.layout.mask_dir}/<defect>/"
                                f"{self.layout.mask_names[0].format(stem=first.stem)}. Run `zsad data verify` on the root")
            self.samples += scan.samples
        if not self.samples:
            raise DataError(f"{self.root}: no {split} images found for categories {self.categories}; "
                            "check the root (it must hold <category>/test/<folder>/<image>)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = preprocess_image(open_image(s.path), self.image_size, self.image_convention)
        mask = preprocess_mask(_open_mask(s.mask_path) if s.label and s.mask_path else None,
                               self.image_size, self.mask_convention)
        return {"image": image, "mask": mask.float(), "label": s.label, "class_name": self.object_words[s.category],
                "category": s.category, "defect_type": s.defect_type, "path": str(s.path)}

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def category_indices(self) -> dict[str, list[int]]:
        """Sample indices per category (the unit the metrics are computed on)."""
        out: dict[str, list[int]] = {c: [] for c in self.categories}
        for i, s in enumerate(self.samples):
            out[s.category].append(i)
        return out

    def __repr__(self) -> str:
        n_anomalous = sum(self.labels)
        return (f"AnomalyDataset({self.root}, split={self.split!r}, {len(self.categories)} categories, "
                f"{len(self) - n_anomalous} normal + {n_anomalous} anomalous, {self.image_size}px "
                f"{self.image_convention}/{self.mask_convention})")


def _open_mask(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable mask ({err.__class__.__name__}: {err}); restore it from the "
                        "archive (or re-run `zsad data prepare`)") from None


def auxiliary_training_set(root: str | Path, manifest=None, *, image_size: int = 518, image_convention: str = "squash",
                           mask_convention: str = "bilinear", categories=None) -> AnomalyDataset:
    """The ZSAD papers' training set: the *test* split of an auxiliary dataset, all categories pooled
    (e.g. MVTec AD test, 1725 images, to train for every other target; VisA test for MVTec AD)."""
    return AnomalyDataset(root, manifest, split="test", categories=categories, image_size=image_size,
                          image_convention=image_convention, mask_convention=mask_convention)


def subset_per_category(dataset: AnomalyDataset, k: int, seed: int = 0) -> list[int]:
    """Indices of k images per category (all of a smaller category), drawn without replacement by one
    seeded generator over the categories in sorted order; returned sorted. The papers' k-shot training
    set (AA-CLIP: "`shot` samples from each category"); which images the papers drew is not published."""
    if int(k) < 1:
        raise DataError(f"subset of {k} images per category: use k >= 1 (or no subset for the whole set)")
    rng = np.random.default_rng(int(seed))
    picked: list[int] = []
    for category, indices in sorted(dataset.category_indices().items()):
        take = min(int(k), len(indices))
        picked += [indices[i] for i in rng.choice(len(indices), size=take, replace=False)]
    return sorted(picked)


def collate_batch(items: list[dict]) -> dict:
    """Items of AnomalyDataset -> the training/evaluation batch: images [B,3,S,S], masks [B,S,S]
    float {0,1}, labels [B] long, class_names list[str] (plus categories, defect_types, paths)."""
    return {"images": torch.stack([it["image"] for it in items]),
            "masks": torch.stack([it["mask"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "class_names": [it["class_name"] for it in items],
            "categories": [it["category"] for it in items],
            "defect_types": [it["defect_type"] for it in items],
            "paths": [it["path"] for it in items]}
