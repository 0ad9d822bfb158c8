"""Datasets: manifests, the MVTec-layout loader, verification, conversions and synthetic data.

    from zsad_core.data import AnomalyDataset, auxiliary_training_set, collate_batch, ensure_synthetic

    paths = ensure_synthetic()                       # smoke data, generated once under data/synthetic/
    train = auxiliary_training_set(paths["synth_industrial_a"], paths["synth_industrial_a"] / "manifest.json",
                                   image_size=224)   # test split, categories pooled (the ZSAD protocol)
    test = AnomalyDataset(paths["synth_industrial_b"], paths["synth_industrial_b"] / "manifest.json",
                          split="test", image_size=224)
"""
from .layout import DataError, Layout, Sample
from .loader import AnomalyDataset, auxiliary_training_set, collate_batch, subset_per_category
from .manifest import ManifestError, known_manifests, load_manifest
from .synth import DOMAINS as SYNTHETIC_DOMAINS
from .synth import ensure_synthetic

__all__ = ["AnomalyDataset", "auxiliary_training_set", "collate_batch", "subset_per_category", "ensure_synthetic", "load_manifest",
           "known_manifests", "DataError", "ManifestError", "Layout", "Sample", "SYNTHETIC_DOMAINS"]
