"""zsad_core.analysis (means over runs, time per image, 2-D projection) and the Workbook's fresh
sampling per evaluation."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from zsad_core.analysis import mean_over_runs, time_per_image
from zsad_core.embeddings import pca_2d


def result(**means):
    return {"mean": {k: {"mean": v, "n_categories": 1} for k, v in means.items()}}


def test_mean_over_runs_percent_mean_std_and_nan():
    runs = {"R = 1": [result(image_auroc=0.5, pixel_auroc=float("nan")), result(image_auroc=0.7, pixel_auroc=0.9)],
            "R = 3": [result(image_auroc=0.61234, pixel_auroc=0.8)]}
    table = mean_over_runs(runs, metrics=("image_auroc", "pixel_auroc"))
    assert list(table.index) == ["R = 1", "R = 3"]
    assert table.loc["R = 1", ("I-AUROC", "mean")] == 60.0
    assert table.loc["R = 1", ("I-AUROC", "std")] == 10.0  # population std of 50 and 70
    assert table.loc["R = 1", ("P-AUROC", "mean")] == 90.0  # the NaN run is skipped
    assert table.loc["R = 3", ("I-AUROC", "mean")] == 61.2 and table.loc["R = 3", ("I-AUROC", "std")] == 0.0
    assert table.loc["R = 1", ("runs", "")] == 2 and table.loc["R = 3", ("runs", "")] == 1


def test_mean_over_runs_all_nan_metric():
    table = mean_over_runs({"x": [result(image_auroc=0.5, aupro=float("nan"))]}, metrics=("image_auroc", "aupro"))
    assert math.isnan(table.loc["x", ("AUPRO", "mean")]) and math.isnan(table.loc["x", ("AUPRO", "std")])


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls, self.names = [], []

    def forward(self, images, class_names):
        self.calls.append(len(images))
        self.names.append(list(class_names))
        return {"image_scores": images.mean((1, 2, 3)) * self.weight}


def test_time_per_image_batches_warmup_and_names():
    method = Counting()
    images = torch.zeros(5, 3, 4, 4)
    out = time_per_image(method, images, ["a", "b", "c", "d", "e"], batch_size=2, warmup=1)
    assert method.calls == [2, 2, 2, 1]  # one warm-up batch, then every batch timed
    assert method.names[1:] == [["a", "b"], ["c", "d"], ["e"]]
    assert out["images"] == 5 and out["wall_ms"] >= 0 and out["cpu_ms"] >= 0
    assert not method.training
    method = Counting()
    time_per_image(method, images[:2], "one name", warmup=0)
    assert method.calls == [1, 1] and method.names == [["one name"], ["one name"]]


def test_project_2d_is_pca_with_fixed_signs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    y = pca_2d(x)
    assert y.shape == (40, 2)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    assert y[:, 0].var() > y[:, 1].var()  # first axis: largest variance
    np.testing.assert_allclose(pca_2d(-x), y, atol=1e-5)  # signs fixed: mirrored data, same picture
    for axis in range(2):
        assert y[np.abs(y[:, axis]).argmax(), axis] > 0
    assert pca_2d(torch.randn(3, 1)).shape == (3, 2)  # one feature: second axis zero


def test_workbook_evaluate_and_maps_restart_sampling(tmp_path, monkeypatch):
    import zsad_core.evaluate as evaluate_module
    from zsad_core.workbook import Workbook

    wb = Workbook("smoke", tmp_path, "nb")
    wb._backbone = SimpleNamespace(fingerprint="fp")
    monkeypatch.setattr(wb, "dataset", lambda name: (tmp_path, None))
    seen = []

    class Sampler:
        name = "sampler"
        resets = 0

        def reset_sampling(self):
            self.resets += 1

        def predict(self, images, class_name):
            seen.append((self.resets, class_name))
            return SimpleNamespace(anomaly_maps=torch.zeros(1, 2, 2))

    monkeypatch.setattr(evaluate_module, "evaluate", lambda method, *a, **kw: seen.append(getattr(method, "resets", None)) or {})
    method = Sampler()
    wb.evaluate(method, "any")
    wb.evaluate(method, "any", tag="again")
    assert seen == [1, 2]  # every evaluation starts from the seed
    maps = wb.maps(method, {"images": torch.zeros(2, 3, 2, 2), "class_names": ["a", "b"]})
    assert maps.shape == (2, 2, 2) and seen[2:] == [(3, "a"), (3, "b")]
    wb.evaluate(SimpleNamespace(name="plain"), "any")  # methods without sampling are untouched
    assert seen[-1] is None
