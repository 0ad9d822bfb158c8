"""What the notebooks share: profile settings, datasets, train/evaluate with resume, tables beside
the papers' numbers.

    wb = Workbook(profile, results_dir, "20_anomalyclip", data_root=data_root, backbone=backbone)
    method = wb.method("anomalyclip")
    wb.train(method, "prompts")                       # on the profile's auxiliary domain
    result = wb.evaluate(method, "synth_industrial_b", tag="main")
    table = wb.table({"AnomalyCLIP": results})        # percent, one decimal
    wb.beside_paper(table, paper="AnomalyCLIP", method="AnomalyCLIP")

Every artefact goes under `<results_dir>/<notebook>/`; train/evaluate resume from what is there, so a
re-executed notebook reuses finished work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ZsadError

METRIC_LABELS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
                 "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "aupro": "AUPRO",
                 "aupro_legacy": "AUPRO (legacy)"}
# our dataset ids -> the names the paper tables use
PAPER_DATASET = {"mvtec_ad": "MVTec AD", "visa": "VisA", "mpdd": "MPDD", "btad": "BTAD", "sdd_kolektorsdd": "SDD",
                 "dagm2007": "DAGM", "dtd_synthetic": "DTD-Synthetic", "headct": "HeadCT", "brainmri": "BrainMRI",
                 "br35h": "Br35H", "isic2016": "ISIC", "cvc_clinicdb": "CVC-ClinicDB", "cvc_colondb": "CVC-ColonDB",
                 "kvasir": "Kvasir", "endo": "Endo", "tn3k": "TN3K", "ksdd2": "KSDD2", "rsdd": "RSDD",
                 "covid19_radiography": "COVID-19"}
# (level, metric) in the paper tables for each of our metric names
PAPER_METRIC = {"image_auroc": ("image", "AUROC"), "image_ap": ("image", "AP"), "image_f1max": ("image", "F1-max"),
                "pixel_auroc": ("pixel", "AUROC"), "pixel_ap": ("pixel", "AP"), "pixel_f1max": ("pixel", "F1-max"),
                "aupro": ("pixel", "AUPRO")}


def option_tag(options) -> str:
    """A folder-safe tag for a list of KEY=VALUE options ("default" for none)."""
    import re

    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "", str(o).replace("=", "")) for o in options) or "default"


@dataclass
class Profile:
    """What a profile runs: backbone, resolution, auxiliary (training) and target datasets, budget."""

    name: str
    backbone: str
    image_size: int | None  # None: each method's official resolution
    train_domain: str
    test_domains: list[str]
    epochs: int | None  # None: the official recipe
    max_steps: int | None = None
    batch_size: int | None = None
    few_shot_k: int = 1
    extra: dict = field(default_factory=dict)


def profile_settings(profile: str, backbone: str | None = None) -> Profile:
    if profile == "smoke":
        # The tiny random CLIP at 112 px (grid 8) keeps every notebook at a minute or so on 2 CPU
        # cores; the code path is the one the paper profile runs at the official resolution.
        return Profile("smoke", backbone or "tiny", 112, "synth_industrial_a",
                       ["synth_industrial_b", "synth_medical"], epochs=2, batch_size=8)
    if profile == "paper":
        return Profile("paper", backbone or "ViT-L-14-336:openai", None, "mvtec_ad",
                       ["visa", "mpdd", "btad", "sdd_kolektorsdd", "dagm2007", "dtd_synthetic"], epochs=None,
                       extra={"mvtec_target_train_domain": "visa"})
    raise ZsadError(f"unknown profile {profile!r}; use smoke or paper")


class Workbook:
    def __init__(self, profile: str, results_dir: str | Path, notebook: str, *, data_root: str | None = None,
                 backbone: str | None = None, device: str | None = None, log=print):
        import torch

        self.profile = profile_settings(profile, backbone)
        self.out = Path(results_dir) / notebook
        self.out.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root) if data_root else None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.log = log
        self._backbone = None
        torch.manual_seed(0)
        if self.device == "cpu" and self.profile.name == "smoke":
            # tiny tensors: one thread is fastest, and on a shared CPU OpenMP threads waiting on each
            # other make small ops 5-20x slower
            torch.set_num_threads(1)

    # ------------------------------------------------------------------ models and data
    @property
    def backbone(self):
        if self._backbone is None:
            from .backbone import load_backbone

            self._backbone = load_backbone(self.profile.backbone, device=self.device)
        return self._backbone

    def method(self, name: str, options=(), checkpoint: str | Path | None = None, seed: int = 0, **overrides):
        """A method on the shared backbone at the profile's resolution (seeded: untrained parts are
        reproducible)."""
        import torch

        from .methods import create_method

        torch.manual_seed(seed)
        method = create_method(name, self.backbone, options=list(options), image_size=self.profile.image_size,
                               **overrides)
        if checkpoint:
            method.load_checkpoint(checkpoint)
        return method.to(self.device)

    def dataset(self, name: str) -> tuple[Path, object]:
        """(root, manifest) of a dataset: synthetic domains are generated on first use; real ones must be
        under data_root/<name> (the error says what is missing and how to fix it)."""
        from .data import SYNTHETIC_DOMAINS, ensure_synthetic, known_manifests

        if name in SYNTHETIC_DOMAINS:
            root = ensure_synthetic(log=self.log)[name]
            return root, root / "manifest.json"
        if name not in known_manifests():
            raise ZsadError(f"unknown dataset {name!r}")
        if self.data_root is None:
            raise ZsadError(f"dataset {name!r} needs data_root (zsad reproduce --profile paper --data-root DIR): "
                            f"expected DIR/{name}/<category>/test/...")
        root = self.data_root / name
        if not root.is_dir():
            raise ZsadError(f"dataset {name!r} is missing: {root} does not exist. Download it (see "
                            f"data_manifests/{name}.json for the source), then `zsad data verify {name} --root {root}`")
        return root, name

    def find_checkpoint(self, method_name: str) -> Path | None:
        """The newest `last.safetensors` any notebook of this results folder trained for a method (its
        untagged run first), or None."""
        root = self.out.parent
        untagged = sorted(root.glob(f"*/train/{method_name}/last.safetensors"))
        tagged = sorted(root.glob(f"*/train/{method_name}-*/last.safetensors"), key=lambda p: p.stat().st_mtime)
        found = untagged or tagged[::-1]
        return found[0].resolve() if found else None

    # ------------------------------------------------------------------ train / evaluate (resumable)
    def train(self, method, tag: str = "", dataset: str | None = None, epochs: int | None = None,
              subset: int | None = None, subset_seed: int = 0, max_steps: int | None = None, **kw) -> dict:
        """Train on the profile's auxiliary domain (test split, categories pooled) into
        <out>/train/<method>[-tag]; resumes / reuses finished epochs.

        subset=k: only k images per category (seeded draw, `subset_seed`; the papers' k-shot training),
        into <method>[-tag]-subset<k>[-seed<s>]; the drawn images are listed in its config.json.
        max_steps caps the steps per epoch (default: the profile's; e.g. cheap smoke ablations on the
        first batches of each epoch)."""
        import torch

        from .data import auxiliary_training_set, subset_per_category
        from .train import train

        name = dataset or self.profile.train_domain
        root, manifest = self.dataset(name)
        data = auxiliary_training_set(root, manifest, image_size=method.image_size,
                                      image_convention=method.image_convention, mask_convention=method.mask_convention)
        folder = method.name + (f"-{tag}" if tag else "")
        config = {"dataset": name, "tag": tag}
        if subset is not None:
            indices = subset_per_category(data, subset, seed=subset_seed)
            config.update(subset_per_category=int(subset), subset_seed=int(subset_seed),
                          subset_images=[str(data.samples[i].path.relative_to(data.root)) for i in indices])
            data = torch.utils.data.Subset(data, indices)
            folder += f"-subset{int(subset)}" + (f"-seed{int(subset_seed)}" if subset_seed else "")
        out = self.out / "train" / folder
        kw.setdefault("progress", self.profile.name != "smoke")
        return train(method, data, out, epochs=epochs or self.profile.epochs, batch_size=self.profile.batch_size,
                     max_steps=max_steps or self.profile.max_steps, device=self.device, config=config,
                     log=lambda *_: None, **kw)

    def evaluate(self, method, dataset: str, tag: str = "", legacy: bool = True, few_shot: int = 0, **kw) -> dict:
        """Canonical metrics of `method` on a dataset's test split, per category and mean, into
        <out>/eval/<method>[-tag]/<dataset>; finished categories are reused. A method that samples
        (Bayes-PFL) starts from its seed, so a result does not depend on what ran before it."""
        from .evaluate import evaluate

        kw.setdefault("progress", self.profile.name != "smoke")
        root, manifest = self.dataset(dataset)
        _fresh_sampling(method)
        out = self.out / "eval" / (method.name + (f"-{tag}" if tag else "")) / dataset
        return evaluate(method, root, manifest, out, device=self.device, legacy=legacy, few_shot=few_shot,
                        config={"dataset": dataset, "tag": tag, "backbone_fingerprint": self.backbone.fingerprint},
                        log=lambda *_: None, **kw)

    def train_and_evaluate(self, name: str, dataset: str, options=(), *, tag: str | None = None,
                           epochs: int | None = None, checkpoint: str | Path | None = None,
                           train_dataset: str | None = None) -> tuple:
        """One variant of a method (ablations, sweeps): trained on the auxiliary domain (or
        `train_dataset`) unless a `checkpoint` gives its parameters, then evaluated on `dataset`.
        Returns (method, evaluate() result). The tag names both result folders; by default it is
        derived from the options (or the checkpoint's hash), so a cached run is reused only for the
        same configuration."""
        method = self.method(name, options=options, checkpoint=checkpoint)
        if tag is None:
            if checkpoint:
                from .provenance import sha256_file

                tag = (f"{option_tag(options)}-" if options else "") + f"ckpt-{sha256_file(checkpoint)[:12]}"
            else:
                tag = option_tag(options) + (f"-e{epochs}" if epochs else "")
        if not checkpoint:
            self.train(method, tag=tag, dataset=train_dataset, epochs=epochs)
        return method, self.evaluate(method, dataset, tag=tag)

    def examples(self, method, dataset: str, per_category: int = 1) -> dict:
        """The first `per_category` anomalous test images of each category, preprocessed for `method`:
        {"images", "masks", "class_names", "titles"} (for qualitative figures)."""
        import torch

        from .data import AnomalyDataset

        root, manifest = self.dataset(dataset)
        data = AnomalyDataset(root, manifest, split="test", image_size=method.image_size,
                              image_convention=method.image_convention, mask_convention=method.mask_convention)
        picked, seen = [], {}
        for i, s in enumerate(data.samples):
            if s.label and seen.get(s.category, 0) < per_category:
                seen[s.category] = seen.get(s.category, 0) + 1
                picked.append(i)
        items = [data[i] for i in picked]
        return {"images": torch.stack([it["image"] for it in items]), "masks": torch.stack([it["mask"] for it in items]),
                "class_names": [it["class_name"] for it in items],
                "titles": [f"{it['category']}/{it['defect_type']}" for it in items]}

    def maps(self, method, examples: dict, batched: bool = False):
        """Anomaly maps of `method` for the example images (each image with its own class name; a
        sampling method starts from its seed; scores that normalise over a class's images are
        meaningless here and their warnings are silenced).

        batched=True: one forward over all examples, finalized together - faster, and the same maps
        only for methods whose `finalize` does not normalise across images (e.g. AnomalyCLIP; not
        AA-CLIP, whose maps are min-maxed per call)."""
        import warnings

        import torch

        _fresh_sampling(method)
        if batched:
            method.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                raw = method(examples["images"].to(self.device), list(examples["class_names"]))
                return method.finalize({k: v.cpu() for k, v in raw.items()}).anomaly_maps
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = [method.predict(examples["images"][i:i + 1], c).anomaly_maps
                   for i, c in enumerate(examples["class_names"])]
        return torch.cat(out)

    # ------------------------------------------------------------------ tables
    @staticmethod
    def table(results: dict, metrics=("image_auroc", "image_ap", "pixel_auroc", "aupro")):
        """{row label: {dataset: evaluate() result}} -> DataFrame of means in percent (1 decimal),
        columns (dataset, metric)."""
        import pandas as pd

        rows = {}
        for label, per_dataset in results.items():
            rows[label] = {(ds, METRIC_LABELS[m]): 100 * r["mean"][m]["mean"]
                           for ds, r in per_dataset.items() for m in metrics if m in r["mean"]}
        return pd.DataFrame(rows).T.round(1)

    @staticmethod
    def beside_paper(ours: dict, paper_rows: dict, metrics=("image_auroc", "image_ap", "pixel_auroc", "aupro")):
        """Our means beside the papers' numbers, with the trust mark of each paper number.

        ours: {(method label, dataset label): evaluate() result}; paper_rows: {method label: dict of
        paper_numbers filters (paper=, method=, table=...)} and the dataset to read them for under key
        'dataset' (a paper dataset name like 'MVTec AD'). Returns a long DataFrame."""
        import pandas as pd

        from .paper_tables import paper_numbers

        records = []
        for (label, dataset), result in ours.items():
            filters = dict(paper_rows.get(label, {}))
            paper_dataset = filters.pop("dataset", None)
            reported = paper_numbers(**filters, dataset=paper_dataset) if paper_dataset and filters else None
            for m in metrics:
                level, metric = PAPER_METRIC[m]
                value = result["mean"].get(m, {}).get("mean", float("nan"))
                row = {"method": label, "our data": dataset, "metric": METRIC_LABELS[m], "ours": round(100 * value, 1)}
                if reported is not None:
                    hit = reported[(reported.level == level) & (reported.metric == metric)]
                    row.update({"paper data": paper_dataset,
                                "paper": float(hit.value.iloc[0]) if len(hit) else np.nan,
                                "mark": hit.trust.iloc[0] if len(hit) else ""})
                records.append(row)
        return pd.DataFrame(records)

    @staticmethod
    def beside_paper_table(ours: dict, metrics=("image_auroc", "image_ap", "pixel_auroc", "aupro"),
                           stand_in: dict | None = None, **filters):
        """The paper's table, row by row, with our number beside each paper number.

        Rows: the datasets of `paper_numbers(**filters)` in the paper's order, then any of ours the
        paper does not report. ours: {our dataset id: evaluate() result}, set beside the paper's row
        PAPER_DATASET[id]; stand_in: {domain: our dataset id} for paper rows without a dataset of their
        own (the smoke profile's synthetic domains stand in for the paper's industrial / medical sets).
        Columns: `our data` (where each row's numbers come from), (metric, ours | paper) in percent with
        one decimal, and `mark`, the trust mark(s) of the row's paper numbers."""
        import pandas as pd

        from .paper_tables import paper_numbers

        reported = paper_numbers(**filters)
        by_paper_name = {PAPER_DATASET.get(ds, ds): ds for ds in ours}
        standing_in = set((stand_in or {}).values())
        rows = list(dict.fromkeys(reported.dataset)) + [n for n, ds in by_paper_name.items()
                                                        if n not in set(reported.dataset) and ds not in standing_in]
        domains = dict(zip(reported.dataset, reported.domain))
        records = {}
        for name in rows:
            ds = by_paper_name.get(name) or (stand_in or {}).get(domains.get(name))
            record, marks = {("our data", ""): ds if ds in ours else "-"}, []
            for m in metrics:
                level, metric = PAPER_METRIC[m]
                hit = reported[(reported.dataset == name) & (reported.level == level) & (reported.metric == metric)]
                value = ours[ds]["mean"].get(m, {}).get("mean", np.nan) if ds in ours else np.nan
                record[(METRIC_LABELS[m], "ours")] = round(100 * value, 1)
                record[(METRIC_LABELS[m], "paper")] = float(hit.value.iloc[0]) if len(hit) else np.nan
                marks += list(hit.trust.iloc[:1])
            record[("mark", "")] = " / ".join(dict.fromkeys(marks)) or "-"
            records[name] = record
        table = pd.DataFrame.from_dict(records, orient="index")
        table.columns = pd.MultiIndex.from_tuples(table.columns)
        table.index.name = "dataset"
        return table

    def save(self, frame, name: str) -> Path:
        """Write a table as CSV under the notebook's results folder."""
        path = self.out / f"{name}.csv"
        frame.to_csv(path)
        return path

    def provenance(self, **extra) -> dict:
        from .provenance import provenance, write_json_atomic

        record = provenance({"profile": self.profile.__dict__, **extra}, backbone=self.backbone.fingerprint)
        write_json_atomic(self.out / "provenance.json", record)
        return record


def _fresh_sampling(method) -> None:
    """Methods that draw random numbers at test time (Bayes-PFL: seeded generator, cached
    image-agnostic samples) restart from their seed, as one official test run per dataset does."""
    reset = getattr(method, "reset_sampling", None)
    if callable(reset):
        reset()
