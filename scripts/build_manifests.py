"""Write data_manifests/*.json from the shared dataset facts (and the synthetic domains' manifests).

    python scripts/build_manifests.py [--facts ../shared/dataset_facts]

Facts (URLs, hashes, licenses, categories, counts, conventions) are taken from the facts JSONs
unchanged; this script only adds the choices zsad makes, each stated in LAYOUTS below: which
distribution's folder layout the manifest describes (raw archive, `zsad data prepare` output, or a
ZSAD repo's processed copy), and therefore the category folder names, the defect folder names and
the mask file names. A count that the facts do not give stays null. The per-image lists under
facts/lists are not read here (the facts' counts were derived from them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zsad_core.data.manifest import MANIFEST_DIR, SCHEMA_VERSION, check_manifest, totals  # noqa: E402

IMAGE_EXTS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]
FOLDER_WORD = "no fact source names a different prompt word; the category folder name is used"

# The layouts. Each says which copy of the data it describes.
RAW_MVTEC = {"source": "the raw archive (MVTec AD folder layout)", "splits": ["train", "test"], "normal_dir": "good",
             "image_extensions": [".png"], "mask_dir": "ground_truth", "mask_names": ["{stem}_mask.png"],
             "pixel_masks": True, "prepare": None}
BAYES_PFL = {"source": "Bayes-PFL's processed copy ('mvisa' layout: .bmp images, all anomalies in test/anomaly, "
                       "masks ground_truth/anomaly/<same stem>.png; see dataset facts zsad_layouts)",
             "splits": ["test"], "normal_dir": "good", "image_extensions": [".bmp"], "mask_dir": "ground_truth",
             "mask_names": ["{stem}.png"], "pixel_masks": True, "prepare": None}
GENERIC_UNKNOWN = {"source": "unknown: no ZSAD repo publishes a converter for this dataset; zsad expects the generic "
                             "MVTec-style layout <category>/test/{good,<defect>}",
                   "splits": ["test"], "normal_dir": "good", "image_extensions": IMAGE_EXTS, "mask_dir": "ground_truth",
                   "mask_names": ["{stem}_mask.png", "{stem}.png"], "pixel_masks": False, "prepare": None}


def prepared(converter: str, exts, **options) -> dict:
    return {"source": f"the output of `zsad data prepare` (converter '{converter}') from the raw download",
            "splits": ["train", "test"], "normal_dir": "good", "image_extensions": exts, "mask_dir": "ground_truth",
            "mask_names": ["{stem}_mask.png"], "pixel_masks": True, "prepare": {"converter": converter, **options}}


# id -> layout, category folder names (None: the facts' count keys / categories), the single defect
# folder of layouts that pool all anomalies into one folder, object words and extra notes.
LAYOUTS = {
    "mvtec_ad": {"layout": RAW_MVTEC},
    "visa": {"layout": prepared("visa", [".jpg"], split_csv="split_csv/1cls.csv"), "defect_dir": "bad",
             "note": "Prepared layout: the 1cls split has no defect types, so `zsad data prepare visa` puts every "
                     "anomalous image into test/bad (as spot-diff's prepare_data.py and anomalib do)."},
    "mpdd": {"layout": RAW_MVTEC},
    "btad": {"layout": prepared("btad", [".png"]), "defect_dir": "ko",
             "word_source": "category folder name, as AnomalyCLIP/AdaCLIP/AA-CLIP use it (AA-CLIP class_name '01'..'03'); "
                            "Bayes-PFL renames the classes 01->metal1, 02->wood, 03->metal2 (dataset facts)",
             "note": "Prepared layout: `zsad data prepare btad` converts every image and mask to PNG, renames "
                     "train/ok and test/ok to good, keeps test/ko and names masks <stem>_mask.png."},
    "sdd_kolektorsdd": {"layout": {**RAW_MVTEC, "source": "AdaCLIP's processed copy (data_preprocess/sdd-pre.py: "
                                   "SDD_anomaly_detection/SDD/{train/good, test/good, test/defect, ground_truth/defect}, "
                                   "masks <name>_mask.png); pass --root .../SDD_anomaly_detection"},
                        "categories": ["SDD"], "defect_dir": "defect",
                        "words": {"SDD": ("electrical commutators", "AnomalyCLIP's class name for SDD (dataset facts zsad_layouts)")},
                        "note": "Counts are null: no per-image list exists and the 3-way crop + 75/25 split must be "
                                "produced by AdaCLIP's sdd-pre.py. `zsad data prepare` has no converter for it yet."},
    "dagm2007": {"layout": BAYES_PFL, "defect_dir": "anomaly",
                 "word_source": "Bayes-PFL cls_name (lists/bayes_pfl/meta_DAGM.json, via the dataset facts)",
                 "note": "This manifest describes Bayes-PFL's re-annotated 7-class fabric variant (the only one with "
                         "a per-image list). The 10-class variant of AnomalyCLIP/AdaCLIP/FAPrompt is manifest "
                         "dagm2007_10class."},
    "dagm2007_10class": {"from": "dagm2007", "name_suffix": " (10-class variant, AdaCLIP layout)",
                         "layout": {**RAW_MVTEC, "source": "AdaCLIP's processed copy (data_preprocess/dagm-pre.py: "
                                    "DAGM_anomaly_detection/ClassN/{train/good, test/good, test/defect, "
                                    "ground_truth/defect})", "mask_names": ["{stem}_mask.png", "{stem}.png"],
                                    "image_extensions": IMAGE_EXTS},
                         "category_key": "AnomalyCLIP/AdaCLIP/FAPrompt", "defect_dir": "defect", "null_counts": True,
                         "note": "Counts are null: no per-image list exists for the 10-class variant. The mask file "
                                 "naming of AdaCLIP's copy is not in the facts, so <stem>_mask.png and <stem>.png are "
                                 "both accepted. Original DAGM masks are coarse ellipses."},
    "dtd_synthetic": {"layout": RAW_MVTEC, "defect_dir": "bad",
                      "note": "Defect folder 'bad' from the raw layout (test/{good,bad}); counts come from Bayes-PFL's "
                              "list, whose converter only globbed *.png. Bayes-PFL renames the classes (see "
                              "dataset facts zsad_layouts)."},
    "ksdd2": {"layout": BAYES_PFL, "defect_dir": "anomaly", "word_source": "Bayes-PFL cls_name (dataset facts)"},
    "rsdd": {"layout": BAYES_PFL, "defect_dir": "anomaly", "word_source": "Bayes-PFL cls_name (dataset facts)"},
    "elpv": {"layout": GENERIC_UNKNOWN, "categories": ["elpv"], "null_counts": True,
             "note": "FAPrompt's ELPV converter is not published: the layout and the binarisation of the defect "
                     "probabilities are unknown, so all counts are null (see the facts' zsad_split)."},
    "aitex": {"layout": {**GENERIC_UNKNOWN, "pixel_masks": None}, "categories": ["AITEX"], "null_counts": True,
              "note": "Whether the ZSAD copy has pixel masks is unknown (pixel_masks null: masks are used where "
                      "present and not required)."},
    "headct": {"layout": {**BAYES_PFL, "pixel_masks": False}, "defect_dir": "anomaly",
               "word_source": "Bayes-PFL cls_name 'head ct'; AnomalyCLIP's class folder is 'brain' and AdaCLIP's "
                              "category is 'headct' (dataset facts zsad_layouts)"},
    "brainmri": {"layout": {**BAYES_PFL, "pixel_masks": False}, "categories": ["brain ct"], "defect_dir": "anomaly",
                 "null_counts": True,
                 "word_source": "Bayes-PFL cls_name (dataset facts)",
                 "note": "Counts are null on purpose: Bayes-PFL's list (85 normal / 68 anomalous) drops files with "
                         "other extensions and is known to be incomplete (dataset facts, inconsistency 3)."},
    "br35h": {"layout": {**BAYES_PFL, "pixel_masks": False}, "defect_dir": "anomaly",
              "word_source": "Bayes-PFL cls_name (dataset facts)",
              "note": "The raw download's pred/ folder holds unlabeled images; it must not be counted as anomalous."},
    "covid19_radiography": {"layout": GENERIC_UNKNOWN, "null_counts": True,
                            "words": {"chest": ("chest", "AnomalyCLIP/FAPrompt meta class (dataset facts zsad_layouts)")}},
    "isic2016": {"layout": BAYES_PFL, "defect_dir": "anomaly", "word_source": "Bayes-PFL cls_name (dataset facts)"},
    "cvc_clinicdb": {"layout": {**prepared("images_masks", IMAGE_EXTS, images_dir="images", masks_dir="masks",
                                           defect_dir="polyp"), "splits": ["test"]}, "defect_dir": "polyp", "word": "colon"},
    "cvc_colondb": {"layout": {**prepared("images_masks", IMAGE_EXTS, images_dir="images", masks_dir="masks",
                                          defect_dir="polyp"), "splits": ["test"]}, "defect_dir": "polyp", "word": "colon"},
    "kvasir": {"layout": {**prepared("images_masks", IMAGE_EXTS, images_dir="images", masks_dir="masks",
                                     defect_dir="polyp"), "splits": ["test"]}, "defect_dir": "polyp", "word": "colon"},
    "cvc_300": {"layout": {**prepared("images_masks", IMAGE_EXTS, images_dir="images", masks_dir="masks",
                                      defect_dir="polyp"), "splits": ["test"]}, "defect_dir": "polyp", "word": "colon"},
    "endo": {"layout": BAYES_PFL, "defect_dir": "anomaly", "word_source": "Bayes-PFL cls_name (dataset facts)"},
    "tn3k": {"layout": {**prepared("images_masks", IMAGE_EXTS, images_dir="test-image", masks_dir="test-mask",
                                   defect_dir="nodule"), "splits": ["test"]},
             "categories": ["thyroid"], "defect_dir": "nodule", "tn3k": True},
    "bmad_brain": {"layout": prepared("bmad", [".png"]), "defect_dir": "Ungood"},
    "bmad_liver": {"layout": prepared("bmad", [".png"]), "defect_dir": "Ungood"},
    "bmad_retina_resc": {"layout": prepared("bmad", [".png"]), "defect_dir": "Ungood"},
    "lag": {"layout": {**GENERIC_UNKNOWN, "pixel_masks": None}, "categories": ["LAG"], "null_counts": True,
            "note": "Image-level use is only assumed (dataset facts), so pixel_masks is null: masks are used "
                    "where present and not required."},
}
POLYP_WORD_SOURCE = "AnomalyCLIP/FAPrompt meta class 'colon' (dataset facts zsad_layouts); AA-CLIP's class_name is the category"
PREPARE_NOTES = {
    "images_masks": "`zsad data prepare` pairs images and masks by file name (never by sorted order, the trap noted "
                    "in the dataset facts), copies the images unchanged and writes masks as 0/255 PNG (!= 0).",
    "bmad": "`zsad data prepare` copies <subset>/train/good/img, test/good/img and test/Ungood/img, and writes "
            "test/Ungood/label masks as ground_truth/Ungood/<stem>_mask.png (0/255, != 0). valid/ is not used.",
}


MASKS = {True: "pixel", False: "image-level", None: "unknown"}


def count_or_none(value):
    return value if isinstance(value, int) else None


def build(facts_dir: Path, dataset_id: str, spec: dict) -> dict:
    facts = json.loads((facts_dir / f"{spec.get('from', dataset_id)}.json").read_text())
    layout = dict(spec["layout"])
    layout["raw_layout"] = facts.get("raw_layout")
    per_category = (facts.get("counts") or {}).get("per_category") or {}
    if spec.get("null_counts"):
        per_category = {}
    if "categories" in spec:
        names = spec["categories"]
    elif per_category:
        names = sorted(per_category)
    else:
        names = facts["categories"][spec["category_key"]] if "category_key" in spec else facts["categories"]
    defect_dir = spec.get("defect_dir")
    categories = {}
    for name in names:
        counts = per_category.get(name, {}) if per_category else {}
        if spec.get("tn3k"):  # the facts know only that every image is anomalous
            counts = {"test_good": 0}
        defects = counts.get("defect_types")
        anomalous = count_or_none(counts.get("test_anomalous"))
        if defects is None and defect_dir and anomalous is not None:
            defects = {defect_dir: anomalous}  # the layout pools every anomaly in one folder
        word, word_source = spec.get("words", {}).get(name, (spec.get("word", name), spec.get("word_source")))
        if word_source is None:
            word_source = POLYP_WORD_SOURCE if spec.get("word") == "colon" else FOLDER_WORD
        categories[name] = {"object_word": word, "object_word_source": word_source,
                            "train_good": 0 if layout["splits"] == ["test"] else count_or_none(counts.get("train_good")),
                            "test_good": count_or_none(counts.get("test_good")), "test_anomalous": anomalous,
                            "defect_types": defects}
    notes = list(facts.get("notes") or [])
    if spec.get("note"):
        notes.append(spec["note"])
    if layout.get("prepare") and layout["prepare"]["converter"] in PREPARE_NOTES:
        notes.append(PREPARE_NOTES[layout["prepare"]["converter"]])
    if layout["splits"] == ["test"]:
        notes.append("Test-only in ZSAD use: train_good is 0 by the layout (no train split), not a count.")
    counts_source = (facts.get("counts") or {}).get("source") or "not given in the facts"
    if spec.get("null_counts"):
        counts_source = f"none used (see notes); facts: {counts_source}"
    license_ = facts.get("license") or {}
    domain = facts["domain"].split(" ")[0]  # "industrial (texture)" -> industrial
    manifest = {
        "schema_version": SCHEMA_VERSION, "id": dataset_id, "name": facts["name"] + spec.get("name_suffix", ""),
        "domain": domain, "homepage": facts.get("homepage"),
        "downloads": [{k: d.get(k) for k in ("url", "archive", "sha256", "md5", "hash_source", "notes")}
                      for d in facts.get("downloads", [])],
        "license": {"id": license_.get("id"), "source": license_.get("source") or "not found",
                    "conflict": license_.get("conflict")},
        "zsad_role": facts.get("zsad_role"), "used_by": facts.get("used_by", []), "layout": layout,
        "categories": categories, "counts_source": counts_source,
        "mask_convention": facts.get("mask_convention"),
        "image_size": {"value": facts.get("image_size", {}).get("value"),
                       "confidence": facts.get("image_size", {}).get("confidence") or "not given"},
        "notes": notes, "sources": facts.get("sources", []), "facts_file": f"{spec.get('from', dataset_id)}.json",
        "synthetic": None,
    }
    return check_manifest(manifest, dataset_id)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def readme_table(manifests: list[dict]) -> str:
    def fmt(v):
        return "?" if v is None else str(v)

    rows = ["| id | name | domain | #cat | train good | test normal | test anomalous | masks | license | sha256 pinned | layout read by zsad |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in manifests:
        t = totals(m)
        lic = m["license"]["id"] or "unknown"
        if m["license"].get("conflict"):
            lic += " (conflict)"
        pinned = "no"
        for d in m["downloads"]:
            if d.get("sha256"):
                pinned = "yes (third-party mirror)" if "Third-party" in (d.get("hash_source") or "") else "yes"
        layout = ("`zsad data prepare " + m["id"] + "`" if m["layout"]["prepare"] else
                  "generated" if m["synthetic"] else m["layout"]["source"].split(" (")[0].split(":")[0])
        rows.append(f"| `{m['id']}` | {m['name']} | {m['domain']} | {len(m['categories'])} | {fmt(t['train_good'])} "
                    f"| {fmt(t['test_good'])} | {fmt(t['test_anomalous'])} | {MASKS[m['layout']['pixel_masks']]} "
                    f"| {lic} | {pinned} | {layout} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default=str(ROOT.parent / "shared" / "dataset_facts"),
                        help="the shared dataset-facts folder (default: ../shared/dataset_facts)")
    args = parser.parse_args()
    facts_dir = Path(args.facts)
    MANIFEST_DIR.mkdir(exist_ok=True)
    manifests = []
    for dataset_id, spec in LAYOUTS.items():
        manifest = build(facts_dir, dataset_id, spec)
        write_json(MANIFEST_DIR / f"{dataset_id}.json", manifest)
        manifests.append(manifest)

    from zsad_core.data.synth import DOMAINS, domain_manifest

    for domain in DOMAINS:
        manifest = domain_manifest(domain, "smoke", 0)
        write_json(MANIFEST_DIR / f"{domain}.json", manifest)
        manifests.append(manifest)
    readme = (MANIFEST_DIR / "README.md").read_text()
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    if start in readme:
        head, rest = readme.split(start, 1)
        readme = head + start + "\n" + readme_table(manifests) + "\n" + end + rest.split(end, 1)[1]
        (MANIFEST_DIR / "README.md").write_text(readme)
    print(f"wrote {len(manifests)} manifests to {MANIFEST_DIR.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
