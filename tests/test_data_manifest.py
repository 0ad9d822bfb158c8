"""Manifests: every committed one is valid and agrees with the facts it was built from; a broken
one is rejected with a message that names each problem."""
import copy
import json
import re

import pytest

from zsad_core.data.manifest import MANIFEST_DIR, ManifestError, known_manifests, load_manifest, totals, validate_manifest

REQUIRED = {"mvtec_ad", "visa", "mpdd", "btad", "sdd_kolektorsdd", "dagm2007", "dtd_synthetic", "headct", "brainmri",
            "br35h", "isic2016", "cvc_clinicdb", "cvc_colondb", "kvasir", "endo", "tn3k",
            "synth_industrial_a", "synth_industrial_b", "synth_medical"}


def test_all_committed_manifests_are_valid():
    names = known_manifests()
    assert REQUIRED <= set(names) and len(names) == 30
    for name in names:
        manifest = load_manifest(name)  # raises on any schema problem
        assert manifest["id"] == name and manifest["schema_version"] == 1


def test_counts_and_checksums_match_the_facts():
    mvtec = load_manifest("mvtec_ad")
    assert totals(mvtec) == {"train_good": 3629, "test_good": 467, "test_anomalous": 1258}
    assert mvtec["categories"]["screw"]["defect_types"]["scratch_neck"] == 25
    assert mvtec["downloads"][0]["sha256"] == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    visa = load_manifest("visa")
    assert totals(visa) == {"train_good": 8659, "test_good": 962, "test_anomalous": 1200}
    assert visa["categories"]["pcb3"]["test_good"] == 101 and visa["layout"]["prepare"]["converter"] == "visa"
    assert "CC BY-NC-SA 4.0" in visa["license"]["conflict"]
    btad = load_manifest("btad")
    assert {k: v["defect_types"] for k, v in btad["categories"].items()} == {"01": {"ko": 49}, "02": {"ko": 200},
                                                                             "03": {"ko": 41}}
    assert totals(load_manifest("mpdd")) == {"train_good": None, "test_good": 176, "test_anomalous": 282}
    assert load_manifest("sdd_kolektorsdd")["categories"]["SDD"]["object_word"] == "electrical commutators"
    brain = load_manifest("brainmri")["categories"]["brain ct"]
    assert brain["test_good"] is None and brain["test_anomalous"] is None  # the only list is known to be incomplete
    assert load_manifest("kvasir")["categories"]["Kvasir"]["object_word"] == "colon"
    assert totals(load_manifest("tn3k")) == {"train_good": 0, "test_good": 0, "test_anomalous": None}


def test_no_hash_without_a_source_and_no_absolute_paths():
    for name in known_manifests():
        text = (MANIFEST_DIR / f"{name}.json").read_text()
        assert not re.search(r"/(work|tmp|root)/", text), f"{name}: absolute machine path"
        for download in load_manifest(name)["downloads"]:
            if download["sha256"] or download["md5"]:
                assert "anomalib" in download["hash_source"]


def test_a_broken_manifest_gives_a_clear_error(tmp_path):
    broken = copy.deepcopy(load_manifest("btad"))
    del broken["license"]
    broken["domian"] = "industrial"
    broken["downloads"][0]["sha256"] = "1234"
    broken["categories"]["01"]["test_anomalous"] = 50
    broken["categories"]["02"]["train_good"] = "399"
    broken["layout"]["mask_names"] = ["mask.png"]
    problems = validate_manifest(broken, "btad")
    assert problems == [
        "btad: missing field 'license' (dict)",
        "btad: unknown field 'domian' (typo? known fields: schema_version, id, name, domain, homepage, downloads, "
        "license, zsad_role, used_by, layout, categories, counts_source, mask_convention, image_size, notes, sources, "
        "facts_file, synthetic)",
        "btad.downloads[0].sha256: '1234' is not 64 lowercase hex digits",
        "btad.layout.mask_names: ['mask.png'] must be a non-empty list of patterns containing '{stem}'",
        "btad.categories['01']: defect_types add up to 49, but test_anomalous is 50",
        "btad.categories['02'].train_good: expected int or null, got str \"399\"",
    ]
    path = tmp_path / "btad.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ManifestError, match=r"btad.json: 6 schema problem\(s\); fix the manifest:\n  .*missing field 'license'"):
        load_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="btad.json: not valid JSON"):
        load_manifest(str(path))
    with pytest.raises(ManifestError, match="unknown dataset 'mvtec'; known: aitex, "):
        load_manifest("mvtec")


def test_booleans_are_not_counts():
    manifest = copy.deepcopy(load_manifest("synth_medical"))
    manifest["categories"]["retina"]["test_good"] = True
    assert validate_manifest(manifest, "m") == ["m.categories['retina'].test_good: expected int or null, got bool true"]
