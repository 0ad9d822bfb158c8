"""The MVTec-layout loader: bit-exact with the goldens, sorted, split/category selection, the
auxiliary-training convention and the training batch format."""
import hashlib
import json
import shutil

import pytest
import torch

from conftest import GOLDEN, golden_hash
from zsad_core.data import AnomalyDataset, DataError, auxiliary_training_set, collate_batch, load_manifest

# The four golden inputs as an MVTec layout: brick/test/{good,scratch}, gravel/test/{good,stain}.
# Sorted loader order = brick good, brick scratch, gravel good, gravel stain = the goldens' order.
GOLDEN_LAYOUT = {"brick_good": ("brick", "good"), "brick_scratch": ("brick", "scratch"),
                 "gravel_good": ("gravel", "good"), "gravel_stain": ("gravel", "stain")}


@pytest.fixture
def golden_root(tmp_path):
    root = tmp_path / "golden_mvtec"
    for name, (category, folder) in GOLDEN_LAYOUT.items():
        (root / category / "test" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOLDEN / "inputs" / f"{name}.png", root / category / "test" / folder / "000.png")
        if folder != "good":
            (root / category / "ground_truth" / folder).mkdir(parents=True)
            shutil.copyfile(GOLDEN / "inputs" / f"{name}_mask.png", root / category / "ground_truth" / folder / "000_mask.png")
        (root / category / "train" / "good").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GOLDEN / "inputs" / "brick_good.png", root / "brick" / "train" / "good" / "000.png")
    return root


def sha(t: torch.Tensor, dtype: str) -> str:
    return hashlib.sha256(t.to(getattr(torch, dtype)).contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("method,key,size,convention", [
    ("anomalyclip", "inputs.safetensors:images", 518, "squash"),
    ("clip_zeroshot", "inputs.safetensors:images", 336, "clip_center"),
    ("winclip", "inputs.safetensors:images", 336, "tensor_squash"),
])
def test_loader_images_are_bit_exact_with_goldens(golden_root, method, key, size, convention):
    ds = AnomalyDataset(golden_root, split="test", image_size=size, image_convention=convention)
    assert [(s.category, s.defect_type) for s in ds.samples] == list(GOLDEN_LAYOUT.values())
    images = collate_batch([ds[i] for i in range(len(ds))])["images"]
    expected = golden_hash(method, key)
    assert list(images.shape) == expected["shape"]
    assert sha(images, expected["dtype"]) == expected["sha256"]


@pytest.mark.parametrize("method,key,convention", [
    ("anomalyclip", "inputs.safetensors:masks", "bilinear"),
    ("aaclip", "inputs.safetensors:mask_u8", "nearest"),
    ("winclip", "inputs.safetensors:masks", "tensor_nearest"),
])
def test_loader_masks_are_bit_exact_with_goldens(golden_root, method, key, convention):
    expected = golden_hash(method, key)
    ds = AnomalyDataset(golden_root, image_size=expected["shape"][-1], mask_convention=convention)
    batch = collate_batch([ds[i] for i in range(len(ds))])
    assert batch["masks"].dtype == torch.float32 and set(batch["masks"].unique().tolist()) == {0.0, 1.0}
    assert sha(batch["masks"].reshape(expected["shape"]), expected["dtype"]) == expected["sha256"]
    assert batch["labels"].tolist() == [0, 1, 0, 1]
    assert batch["masks"][[0, 2]].sum() == 0  # normal images: all-zero masks, no file read


def test_batch_format_and_auxiliary_training_set(golden_root):
    ds = auxiliary_training_set(golden_root, image_size=32)
    assert ds.split == "test" and ds.categories == ["brick", "gravel"] and len(ds) == 4  # pooled test split
    batch = collate_batch([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (4, 32, 32) and batch["labels"].dtype == torch.long
    assert batch["class_names"] == ["brick", "brick", "gravel", "gravel"]
    assert batch["defect_types"] == ["good", "scratch", "good", "stain"]
    assert ds.category_indices() == {"brick": [0, 1], "gravel": [2, 3]}
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_batch)
    assert [b["labels"].tolist() for b in loader] == [[0, 1], [0, 1]]


def test_split_and_category_selection(golden_root):
    train = AnomalyDataset(golden_root, split="train", image_size=32)
    assert [(s.category, s.split, s.label) for s in train.samples] == [("brick", "train", 0)]
    both = AnomalyDataset(golden_root, split="all", image_size=32)
    assert [s.split for s in both.samples] == ["train", "test", "test", "test", "test"]
    gravel = AnomalyDataset(golden_root, categories=["gravel"], image_size=32)
    assert [s.path.parent.name for s in gravel.samples] == ["good", "stain"]
    with pytest.raises(DataError, match="unknown categories \\['screw'\\]"):
        AnomalyDataset(golden_root, categories=["screw"])


def test_manifest_object_words_and_test_only_layout(golden_root, tmp_path):
    manifest = load_manifest("synth_industrial_a")
    manifest = json.loads(json.dumps(manifest))
    manifest["categories"] = {"brick": {**manifest["categories"]["brick"], "object_word": "brick wall"},
                              "gravel": {**manifest["categories"]["brick"], "object_word": "gravel"}}
    ds = AnomalyDataset(golden_root, manifest, image_size=32)
    assert [ds[i]["class_name"] for i in range(len(ds))] == ["brick wall", "brick wall", "gravel", "gravel"]
    manifest["layout"]["splits"] = ["test"]
    for cat in manifest["categories"].values():
        cat["train_good"] = 0
    with pytest.raises(DataError, match="no train split"):
        AnomalyDataset(golden_root, manifest, split="train")
    assert len(AnomalyDataset(golden_root, manifest, split="all", image_size=32)) == 4  # train skipped


def test_missing_mask_and_bad_root_are_named(golden_root, tmp_path):
    (golden_root / "gravel" / "ground_truth" / "stain" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"gravel/test/stain/000.png: anomalous image without a mask.*000_mask.png"):
        AnomalyDataset(golden_root)
    with pytest.raises(DataError, match="no such dataset folder"):
        AnomalyDataset(tmp_path / "nowhere")
