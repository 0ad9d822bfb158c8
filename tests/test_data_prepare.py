"""`zsad data prepare` on small fake raw downloads built here (never on real data): VisA's
split CSV with multi-class index masks, BTAD's per-product extensions, a polyp images/masks folder."""
import json

import numpy as np
import pytest
from PIL import Image

from zsad_core.data import AnomalyDataset, DataError, load_manifest
from zsad_core.data.prepare import REPORT_NAME, prepare
from zsad_core.data.verify import verify


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def fake_image(path, seed, size=(40, 30), mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)
    return path


def index_mask(path, size=(40, 30), values=(0, 1, 3)):
    """A VisA-like multi-class index mask in palette mode (the index is the class id, 0 = background)."""
    array = np.zeros((size[1], size[0]), np.uint8)
    array[5:10, 5:20] = values[1]
    array[20:25, 10:15] = values[2]
    img = Image.fromarray(array, mode="P")
    img.putpalette([0, 0, 0] * 256)  # all-black palette: converting to 'L' would lose the classes
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return array != 0


@pytest.fixture
def fake_visa(tmp_path):
    src = tmp_path / "VisA_20220922"
    rows = ["object,split,label,image,mask"]
    expected_masks = {}
    for obj in ("candle", "pcb1"):
        for i in range(3):
            fake_image(src / obj / f"Data/Images/Normal/{i:04d}.JPG", len(obj) * 10 + i, fmt="JPEG")
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{obj}/Data/Images/Normal/{i:04d}.JPG,")
        for i in range(2):
            fake_image(src / obj / f"Data/Images/Anomaly/{i:03d}.JPG", 7 + i, fmt="JPEG")
            expected_masks[(obj, i)] = index_mask(src / obj / f"Data/Masks/Anomaly/{i:03d}.png")
            rows.append(f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,{obj}/Data/Masks/Anomaly/{i:03d}.png")
    (src / "split_csv").mkdir()
    (src / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return src, expected_masks


def test_visa_split_csv_to_mvtec_layout(fake_visa, tmp_path):
    src, expected_masks = fake_visa
    dst = tmp_path / "visa"
    conversion = prepare("visa", tmp_path, dst)  # the parent of the archive folder is found too
    assert conversion.ok, conversion.format()
    assert conversion.counts["candle"] == {"train/good": 2, "test/good": 1, "test/bad": 2, "ground_truth/bad": 2}
    assert conversion.written == 2 * 7 and conversion.mask_values == {"0,1,3": 4}
    # images are copied byte for byte; masks become 0/255 wherever the class index is != 0
    assert (dst / "pcb1/test/bad/001.JPG").read_bytes() == (src / "pcb1/Data/Images/Anomaly/001.JPG").read_bytes()
    assert (dst / "candle/train/good/0001.JPG").read_bytes() == (src / "candle/Data/Images/Normal/0001.JPG").read_bytes()
    mask = pixels(dst / "pcb1/ground_truth/bad/001_mask.png")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, expected_masks[("pcb1", 1)])
    report = json.loads((dst / REPORT_NAME).read_text())
    assert report["ok"] and report["converter"] == "visa"

    # the result verifies against the VisA manifest with this fake's counts, and loads
    manifest = load_manifest("visa")
    manifest["categories"] = {obj: {**manifest["categories"][obj], "train_good": 2, "test_good": 1,
                                    "test_anomalous": 2, "defect_types": {"bad": 2}} for obj in ("candle", "pcb1")}
    assert verify(manifest, dst).ok
    ds = AnomalyDataset(dst, manifest, image_size=16)
    assert [s.path.name for s in ds.samples[:3]] == ["000.JPG", "001.JPG", "0002.JPG"] and sum(ds.labels) == 4

    again = prepare("visa", src, dst)  # a re-run resumes: everything is already there
    assert again.written == 0 and again.kept_existing == 14


def test_visa_problems_are_reported_and_the_rest_is_kept(fake_visa, tmp_path):
    src, _ = fake_visa
    (src / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with open(src / "split_csv/1cls.csv", "a") as f:
        f.write("pcb1,validation,normal,pcb1/Data/Images/Normal/0000.JPG,\n")
    conversion = prepare("visa", src, tmp_path / "out")
    assert not conversion.ok and conversion.written == 13
    assert conversion.problems[0].startswith(f"{src}/split_csv/1cls.csv:12: split 'validation'")
    assert conversion.problems[1] == f"{src}/pcb1/Data/Masks/Anomaly/000.png: missing source file; restore it from the archive"
    assert (tmp_path / "out/pcb1/test/bad/000.JPG").is_file()


def test_visa_wrong_csv_is_named(tmp_path):
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text("object,image\ncandle,x.JPG\n")
    with pytest.raises(DataError, match=r"1cls.csv: columns \['object', 'image'\], expected"):
        prepare("visa", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="no split_csv/1cls.csv here or one folder below"):
        prepare("visa", tmp_path / "split_csv", tmp_path / "out")


def test_btad_mixed_extensions_become_one_png_layout(tmp_path):
    src = tmp_path / "BTech_Dataset_transformed"
    extensions = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for k, (product, (image_ext, mask_ext)) in enumerate(extensions.items()):
        fake_image(src / product / f"train/ok/0000{image_ext}", k, fmt="BMP" if image_ext == ".bmp" else "PNG")
        fake_image(src / product / f"test/ok/0000{image_ext}", k + 10, fmt="BMP" if image_ext == ".bmp" else "PNG")
        fake_image(src / product / f"test/ko/0003{image_ext}", k + 20, fmt="BMP" if image_ext == ".bmp" else "PNG")
        mask = np.zeros((30, 40), np.uint8)
        mask[3:9, 4:30] = 255 if product != "03" else 1
        (src / product / "ground_truth/ko").mkdir(parents=True)
        Image.fromarray(mask).save(src / product / f"ground_truth/ko/0003{mask_ext}")
    dst = tmp_path / "btad"
    conversion = prepare("btad", src, dst)
    assert conversion.ok, conversion.format()
    assert conversion.notes == ["01: source images .bmp, masks .png", "02: source images .png, masks .png",
                                "03: source images .bmp, masks .bmp"]
    for product, (image_ext, _) in extensions.items():
        assert sorted(p.relative_to(dst / product).as_posix() for p in (dst / product).rglob("*.*")) == [
            "ground_truth/ko/0003_mask.png", "test/good/0000.png", "test/ko/0003.png", "train/good/0000.png"]
        # lossless: every pixel of the converted image equals the source
        assert np.array_equal(pixels(dst / product / "test/ko/0003.png"), pixels(src / product / f"test/ko/0003{image_ext}"))
        mask = pixels(dst / product / "ground_truth/ko/0003_mask.png")
        assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 6 * 26
    assert conversion.mask_values == {"0,1": 1, "0,255": 2}

    (src / "02/ground_truth/ko/0003.png").unlink()
    redo = prepare("btad", src, tmp_path / "btad2")
    assert redo.problems == [f"{src}/02/ground_truth/ko/0003.*: missing mask of {src}/02/test/ko/0003.png; "
                             "restore it from btad.zip"]


def test_polyp_images_and_masks_are_paired_by_name(tmp_path):
    src = tmp_path / "Kvasir"
    for stem in ("b", "a", "c"):
        fake_image(src / f"images/{stem}.png", ord(stem))
    for stem in ("a", "b", "z"):  # c has no mask, z has no image: sorted-order pairing would mix them up
        mask = np.zeros((30, 40), np.uint8)
        mask[: ord(stem) - 90] = 255
        (src / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(src / f"masks/{stem}.png")
    dst = tmp_path / "kvasir"
    conversion = prepare("kvasir", src, dst)
    assert conversion.counts == {"Kvasir": {"test/polyp": 2, "ground_truth/polyp": 2}}
    assert conversion.problems == [f"{src}/masks/c.*: no mask with the name of {src}/images/c.png; images and masks "
                                   "are paired by name", f"{src}/masks/z.png: mask without an image named z.* in {src}/images"]
    assert (pixels(dst / "Kvasir/ground_truth/polyp/b_mask.png") == 255).sum() == (98 - 90) * 40


def test_prepare_refuses_datasets_without_a_converter(tmp_path):
    with pytest.raises(DataError, match="mvtec_ad: no conversion needed"):
        prepare("mvtec_ad", tmp_path, tmp_path / "out")
