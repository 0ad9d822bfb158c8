"""What the notebooks share: profile settings, datasets, train/evaluate with resume, and (from
zsad_core.tables) the tables beside the papers' numbers.

    wb = Workbook(profile, results_dir, "20_anomalyclip", data_root=data_root, backbone=backbone)
    method = wb.method("anomalyclip")
    wb.train(method, "prompts")                       # on the profile's auxiliary domain
    result = wb.evaluate(method, "synth_industrial_b", tag="main")
    table = wb.table({"AnomalyCLIP": {"synth_industrial_b": result}})   # percent, one decimal
    wb.beside_paper_table({"synth_industrial_b": result}, paper="AnomalyCLIP", method="AnomalyCLIP")

Every artefact goes under `<results_dir>/<notebook>/`; train/evaluate resume from what is there, so a
re-executed notebook reuses finished work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ZsadError

# the notebooks import the table constants from here too
from .tables import METRIC_LABELS, PAPER_DATASET, PAPER_METRIC, beside_paper, beside_paper_table, method_table  # noqa: F401


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
    # the notebooks' table helpers (zsad_core.tables)
    table = staticmethod(method_table)
    beside_paper = staticmethod(beside_paper)
    beside_paper_table = staticmethod(beside_paper_table)

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
