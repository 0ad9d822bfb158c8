"""Synthetic datasets: determinism, exact masks, manifests, reuse via the stamp, and `zsad data
verify` on a good copy and on a damaged one (one mask deleted, one image truncated)."""
import json
import shutil

import numpy as np
import pytest

from zsad_core.data import AnomalyDataset, auxiliary_training_set, load_manifest
from zsad_core.data.synth import (DEFECTS, DOMAINS, STAMP_NAME, SIZES, domain_manifest, ensure_synthetic, file_hashes,
                                  generate, image_rng, make_anomalous, parse_size)
from zsad_core.data.verify import verify

SIZE = "1,1,3,96"  # every category, every defect type (3 anomalous images cycle through <= 3 types), small


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SIZE, seed=0)
    return root


def test_same_seed_gives_byte_identical_files(synth_root, tmp_path):
    again = generate(tmp_path / "again", SIZE, seed=0)
    for domain, folder in again.items():
        first, second = file_hashes(synth_root / domain), file_hashes(folder)
        assert len(first) == {"synth_medical": 2 * 8 + 1}.get(domain, 3 * 8 + 1)  # 8 files per category + manifest
        assert first == second
    other = generate(tmp_path / "other", SIZE, seed=1, domains=["synth_industrial_b"])["synth_industrial_b"]
    changed = {k for k, v in file_hashes(other).items() if file_hashes(synth_root / "synth_industrial_b")[k] != v}
    assert len(changed) == 3 * 8 + 1  # every image and mask differs, and the manifest records the seed


def test_domains_have_disjoint_categories_and_the_expected_layout(synth_root):
    a, b = (set(c.name for c in DOMAINS[d].categories) for d in ("synth_industrial_a", "synth_industrial_b"))
    assert a == {"brick", "wood", "screw"} and b == {"gravel", "fabric", "nut"} and not a & b
    assert sorted(p.relative_to(synth_root / "synth_industrial_a").as_posix()
                  for p in (synth_root / "synth_industrial_a" / "screw").rglob("*.png")) == [
        "screw/ground_truth/hole/000_mask.png", "screw/ground_truth/missing_part/000_mask.png",
        "screw/ground_truth/scratch/000_mask.png", "screw/test/good/000.png", "screw/test/hole/000.png",
        "screw/test/missing_part/000.png", "screw/test/scratch/000.png", "screw/train/good/000.png"]


@pytest.mark.parametrize("domain,category", [(d, c.name) for d in DOMAINS for c in DOMAINS[d].categories])
def test_defects_change_exactly_the_masked_pixels(domain, category):
    cat = next(c for c in DOMAINS[domain].categories if c.name == category)
    for i, defect in enumerate(cat.defects):
        normal, anomalous, mask = make_anomalous(cat, defect, image_rng(7, domain, category, "test_anomalous", i), 96)
        changed = (normal != anomalous).any(axis=2)
        assert not (changed & ~mask).any(), f"{category}/{defect}: pixels changed outside the mask"
        assert mask.sum() >= 8 and changed[mask].mean() >= 0.9, f"{category}/{defect}: {changed[mask].mean():.2f}"


def test_every_defect_type_is_used():
    used = {d for domain in DOMAINS.values() for c in domain.categories for d in c.defects}
    assert used == set(DEFECTS)


def test_committed_synthetic_manifests_match_the_generator():
    for domain in DOMAINS:
        assert load_manifest(domain) == domain_manifest(domain, "smoke", 0)
    smoke = load_manifest("synth_industrial_a")
    assert smoke["categories"]["brick"] == {
        "object_word": "brick", "object_word_source": "synthetic category name", "train_good": 4, "test_good": 5,
        "test_anomalous": 6, "defect_types": {"crack": 2, "foreign_texture": 2, "stain": 2}}
    assert parse_size("smoke")[1] == SIZES["smoke"] and parse_size("2,3,4") == ("2,3,4,256", parse_size("2,3,4,256")[1])


def test_verify_passes_on_a_synthetic_copy(synth_root):
    for domain in DOMAINS:
        report = verify(synth_root / domain / "manifest.json", synth_root / domain)
        assert report.ok, report.format()
        assert report.format().splitlines()[-1].startswith(f"OK: {len(DOMAINS[domain].categories)}/")


def test_verify_fails_on_a_deleted_mask_and_a_truncated_image(synth_root, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(synth_root / "synth_industrial_b", copy)
    (copy / "nut/ground_truth/crack/000_mask.png").unlink()
    image = copy / "gravel/test/good/000.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    report = verify(copy / "manifest.json", copy)
    assert not report.ok
    errors = {c.name: [f.line() for f in c.errors] for c in report.categories}
    assert errors["fabric"] == []
    assert errors["nut"] == ["nut/ground_truth/crack/000_mask.png: missing mask of anomalous image "
                             "nut/test/crack/000.png; fix: regenerate the synthetic data (`zsad data synth --force "
                             "--out DIR`, same --size and --seed)"]
    assert len(errors["gravel"]) == 1 and errors["gravel"][0].startswith(
        "gravel/test/good/000.png: unreadable or truncated image (OSError: image file is truncated")
    text = report.format()
    assert "MISMATCH: 1/3 categories OK, 2 problem(s)" in text
    assert "  gravel    1 problem(s)" in text and "  fabric    OK" in text
    assert verify(copy / "manifest.json", copy, decode=False).categories[0].errors == []  # --quick reads headers only


def test_verify_reports_counts_and_extra_folders(synth_root, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(synth_root / "synth_medical", copy)
    shutil.move(copy / "retina/test/exudate", copy / "retina/test/drusen")
    shutil.move(copy / "retina/ground_truth/exudate", copy / "retina/ground_truth/drusen")
    (copy / "tissue/train/good/000.png").unlink()
    (copy / "scratch_notes").mkdir()
    (copy / "scratch_notes/test").mkdir()
    report = verify(copy / "manifest.json", copy)
    lines = {c.name: [f.line() for f in c.errors] for c in report.categories}
    assert lines["retina"][0].startswith("retina/test/exudate: folder missing")
    assert lines["retina"][1].startswith("retina/test/drusen: unexpected defect folder (1 images")
    assert lines["tissue"][0].startswith("tissue/train/good: 0 images, expected 1")
    assert [f.line().split(";")[0] for f in report.findings] == [
        "scratch_notes: folder is not a category of this dataset (ignored)"]


def test_ensure_synthetic_reuses_a_complete_copy_and_repairs_a_changed_one(tmp_path):
    paths = ensure_synthetic(tmp_path, SIZE, seed=3, domains=["synth_medical"])
    folder = paths["synth_medical"]
    first = file_hashes(folder)
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    assert stamp["seed"] == 3 and stamp["domains"]["synth_medical"]["files"] == len(first)
    marker = folder / "retina/train/good/000.png"
    before = marker.stat().st_mtime_ns
    ensure_synthetic(tmp_path, SIZE, seed=3, domains=["synth_medical"])
    assert marker.stat().st_mtime_ns == before  # reused, not rewritten
    marker.write_bytes(b"changed")
    ensure_synthetic(tmp_path, SIZE, seed=3, domains=["synth_medical"])
    assert file_hashes(folder) == first  # regenerated because a file no longer matched the stamp


def test_generated_data_feeds_the_loader(synth_root):
    root = synth_root / "synth_industrial_a"
    train = auxiliary_training_set(root, root / "manifest.json", image_size=64)
    assert train.categories == ["brick", "screw", "wood"] and len(train) == 3 * 4
    items = [train[i] for i in range(4)]  # brick: test/ folders in sorted order
    assert [it["defect_type"] for it in items] == ["crack", "foreign_texture", "good", "stain"]
    assert [it["class_name"] for it in items] == ["brick"] * 4
    assert [bool(it["mask"].sum() > 0) for it in items] == [True, True, False, True]
    test = AnomalyDataset(synth_root / "synth_industrial_b", synth_root / "synth_industrial_b" / "manifest.json",
                          image_size=64, image_convention="clip_center", mask_convention="nearest")
    assert sum(test.labels) == 9 and len(test) == 12
    assert [(s.category, s.defect_type) for s in test.samples[:4]] == [
        ("fabric", "cut_paste"), ("fabric", "good"), ("fabric", "hole"), ("fabric", "stain")]
    assert test[0]["mask"].sum() > 0 and np.array_equal(test[1]["mask"].numpy(), np.zeros((64, 64), np.float32))
