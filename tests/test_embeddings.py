"""Embedding-space analyses (zsad_core.embeddings), the method hooks they read, and k-per-category
training subsets (Workbook.train(subset=k))."""
from dataclasses import dataclass

import matplotlib
import numpy as np
import pytest
import torch

from zsad_core import embeddings as E
from zsad_core.data import subset_per_category
from zsad_core.methods import create_method

matplotlib.use("Agg")


def unit_rows(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------ text
def test_text_similarity_of_orthogonal_sides():
    normal = torch.tensor([[2.0, 0, 0], [1.0, 0, 0]])  # any scale: normalised inside
    abnormal = torch.tensor([[0, 3.0, 0], [0, 0.5, 0]])
    s = E.text_similarity(normal, abnormal)
    assert s["anchor_cos"] == pytest.approx(0) and s["cross_mean"] == pytest.approx(0)
    assert s["within_normal"] == pytest.approx(1) and s["within_abnormal"] == pytest.approx(1)
    assert s["gap"] == pytest.approx(1)


def test_text_similarity_of_anomaly_unaware_text():
    base = torch.tensor([1.0, 0, 0])
    normal = unit_rows([1, 0.05, 0], [1, 0, 0.05])
    abnormal = unit_rows([1, -0.05, 0], [1, 0, -0.05], [1, 0.02, 0.02])
    s = E.text_similarity(normal, abnormal)
    assert s["anchor_cos"] > 0.99 and s["cross_max"] <= 1
    t_n, t_a = E.prototypes(normal, abnormal)
    assert np.linalg.norm(t_n) == pytest.approx(1) and t_n @ base.numpy() > 0.99
    assert s["anchor_cos"] == pytest.approx(float(t_n @ t_a))


def test_text_similarity_table_has_one_row_per_class_and_the_mean():
    spaces = {"same": lambda c: (unit_rows([1, 0]), unit_rows([1, 0.1])),
              "apart": lambda c: (unit_rows([1, 0]), unit_rows([0, 1]))}
    table = E.text_similarity_table(spaces, ["a", "b"])
    assert list(table.index) == ["a", "b", "mean"]
    assert table.loc["mean", ("anchor_cos", "apart")] == 0 and table.loc["a", ("anchor_cos", "same")] > 0.99


def test_text_points_flags_and_groups():
    pts = E.text_points(lambda c: (unit_rows([1, 0], [1, 0.1]), unit_rows([0, 1])), ["a", "b"])
    assert len(pts) == 6 and pts.abnormal.tolist() == [False, False, True] * 2
    assert pts.groups == ["a"] * 3 + ["b"] * 3


# ------------------------------------------------------------------------------------------ patches
def test_patch_labels_pool_the_mask_row_major():
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, 8:] = 1  # the top-right patch of a 2x2 grid
    mask[0, 8:12, :8] = 1  # half of the bottom-left patch
    coverage, abnormal = E.patch_labels(mask, grid=2, threshold=0.5)
    assert coverage.tolist() == [[0.0, 1.0, 0.5, 0.0]]
    assert abnormal.tolist() == [[False, True, True, False]]
    assert E.patch_labels(mask, 2, threshold=0.75)[1].tolist() == [[False, True, False, False]]


def test_patch_points_drop_partly_covered_patches():
    features = torch.randn(2, 4, 3)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, 8:] = 1
    masks[1, 8:10, :8] = 1  # a quarter of patch 2 of image 1: ambiguous
    pts = E.patch_points(features, masks, threshold=0.5, groups=["x", "y"])
    assert len(pts) == 7 and pts.abnormal.sum() == 1
    assert pts.groups == ["x"] * 4 + ["y"] * 3 and pts.extras["image"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert np.allclose(np.linalg.norm(pts.vectors, axis=1), 1)
    every = E.patch_points(features, masks, threshold=0.5, drop_partial=False)
    assert len(every) == 8 and every.abnormal.sum() == 1
    with pytest.raises(ValueError, match="square"):
        E.patch_points(torch.randn(1, 5, 3), masks[:1])


def test_patch_separation_of_separated_clusters():
    g = torch.Generator().manual_seed(0)
    normal = torch.tensor([1.0, 0, 0]) + 0.05 * torch.randn(40, 3, generator=g)
    abnormal = torch.tensor([0, 1.0, 0]) + 0.05 * torch.randn(10, 3, generator=g)
    pts = E.Points(np.concatenate([normal, abnormal]), np.array([False] * 40 + [True] * 10), ["c"] * 50)
    out = E.patch_separation(pts, text=(unit_rows([1, 0, 0]), unit_rows([0, 1, 0])))
    assert out["patches"] == 50 and out["abnormal"] == 10
    assert out["anchor_auroc"] == 1.0 and out["silhouette"] > 0.8 and out["centroid_cos"] < 0.2
    swapped = E.patch_separation(pts, text=(unit_rows([0, 1, 0]), unit_rows([1, 0, 0])))
    assert swapped["anchor_auroc"] == 0.0
    per_group = E.patch_separation(E.Points(pts.vectors, pts.abnormal, ["p"] * 25 + ["q"] * 25),
                                   text=lambda g: (unit_rows([1, 0, 0]), unit_rows([0, 1, 0])) if g == "p"
                                   else (unit_rows([0, 1, 0]), unit_rows([1, 0, 0])))
    assert 0 < per_group["anchor_auroc"] < 1  # class q's anchors are swapped: its patches score wrong
    one_class = E.Points(pts.vectors[:40], pts.abnormal[:40], [])
    assert np.isnan(E.patch_separation(one_class)["silhouette"])


# ------------------------------------------------------------------------------------------ projections
def clusters(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal([3, 0, 0, 0], 0.3, (n, 4)), rng.normal([0, 3, 0, 0], 0.3, (n, 4))])
    return x, np.array([False] * n + [True] * n)


def test_tsne_projection_is_seeded_and_deterministic():
    x, _ = clusters()
    a, b = E.project(x, "tsne", seed=0), E.project(x, "tsne", seed=0)
    assert a.shape == (48, 2) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown projection"):
        E.project(x, "pca")
    with pytest.raises(ValueError, match="at least 4"):
        E.project(x[:3], "tsne")


def test_umap_projection_and_the_figure():
    x, y = clusters()
    a, b = E.project(x, "umap", seed=0), E.project(x, "umap", seed=0)
    assert a.shape == (48, 2) and np.array_equal(a, b)
    # the two clusters stay apart: every point is nearer its own cluster's centre
    centres = [a[~y].mean(0), a[y].mean(0)]
    nearer = np.linalg.norm(a - centres[1], axis=1) < np.linalg.norm(a - centres[0], axis=1)
    assert (nearer == y).all()
    pts = E.Points(x, y, ["p"] * 24 + ["q"] * 24)
    fig, coords = E.projection_figure({"space": pts}, seed=0)
    assert set(coords) == {("space", "umap"), ("space", "tsne")} and np.array_equal(coords[("space", "umap")], a)
    assert len(fig.axes) == 2
    fig = E.similarity_figure({"A": (unit_rows([1, 0], [1, 0.2]), unit_rows([0, 1]))})
    assert len(fig.axes) == 2  # the panel and its colour bar


# ------------------------------------------------------------------------------------------ method hooks
def test_default_hooks_give_plain_clip_spaces(tiny):
    method = create_method("clip_zeroshot", tiny, image_size=112)
    normal, abnormal = method.analysis_text_embeddings("brick")
    prompts = method.analysis_prompts("brick")
    assert normal.shape == (len(prompts[0]), tiny.embed_dim) and abnormal.shape == (len(prompts[1]), tiny.embed_dim)
    expected = torch.nn.functional.normalize(tiny.encode_text(prompts[0]), dim=-1)
    torch.testing.assert_close(normal, expected)
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    patches = method.analysis_patch_embeddings(images)
    assert patches.shape == (2, 64, tiny.embed_dim)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, 64))


def test_aaclip_hooks_give_its_adapted_spaces(tiny):
    torch.manual_seed(0)
    method = create_method("aaclip", tiny, image_size=112)
    normal, abnormal = method.analysis_text_embeddings("brick")
    assert normal.shape == (6, tiny.embed_dim) and abnormal.shape == (10, tiny.embed_dim)
    t_n, t_a = E.prototypes(normal, abnormal)  # the anchors are the prototypes of this space
    anchors = method.text_anchors("brick")
    torch.testing.assert_close(torch.tensor(np.stack([t_n, t_a], 1), dtype=torch.float32), anchors, atol=1e-6, rtol=0)
    plain_n, _ = method.analysis_text_embeddings("brick", adapted=False)
    assert not torch.allclose(plain_n, normal)
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seg = method.encode_image(images).seg_tokens
    torch.testing.assert_close(method.analysis_patch_embeddings(images), seg[-1])
    torch.testing.assert_close(method.analysis_patch_embeddings(images, level=6), seg[0])
    plain = method.analysis_patch_embeddings(images, adapted=False)
    assert plain.shape == seg[-1].shape and not torch.allclose(plain, seg[-1])


# ------------------------------------------------------------------------------------------ subsets
class Categories:
    def __init__(self, sizes):
        self.sizes = sizes

    def category_indices(self):
        out, start = {}, 0
        for name, n in self.sizes.items():
            out[name] = list(range(start, start + n))
            start += n
        return out


def test_subset_per_category_is_seeded_and_capped():
    data = Categories({"b": 10, "a": 5, "c": 1})
    picked = subset_per_category(data, 2, seed=0)
    assert picked == sorted(picked) and picked == subset_per_category(data, 2, seed=0)
    per = {name: [i for i in picked if i in idx] for name, idx in data.category_indices().items()}
    assert [len(per[c]) for c in ("a", "b", "c")] == [2, 2, 1]
    assert any(subset_per_category(data, 2, seed=s) != picked for s in range(1, 5))
    assert subset_per_category(data, 100) == list(range(16))
    with pytest.raises(Exception, match="k >= 1"):
        subset_per_category(data, 0)


class FakeBackbone(torch.nn.Module):
    name, activation, native_image_size, device, fingerprint = "fake", "gelu", 8, torch.device("cpu"), "fake"

    def grid_for(self, size):
        return size

    def set_activation(self, activation):
        return self


def test_workbook_trains_on_a_seeded_subset(tmp_path):
    from zsad_core.methods.base import Method
    from zsad_core.workbook import Workbook

    class Mean(Method):
        name = "test_mean"
        stages = ("fit",)
        recipe = {"fit": {"epochs": 1, "batch_size": 4, "seed": 0}}

        @dataclass
        class Options:
            pass

        def __init__(self, backbone, options=None, image_size=None):
            super().__init__(backbone, options, image_size)
            self.w = torch.nn.Parameter(torch.zeros(3))

        def make_optimizer(self, stage, steps_per_epoch, epochs):
            return torch.optim.SGD([self.w], lr=0.1), None

        def training_loss(self, batch, stage):
            loss = ((batch["images"].mean(dim=(2, 3)) @ self.w - batch["labels"].float()) ** 2).mean()
            return {"total": loss}

    wb = Workbook("smoke", tmp_path, "nb", log=lambda *_: None)
    method = Mean(FakeBackbone(), image_size=8)
    summary = wb.train(method, subset=2, subset_seed=3, epochs=1)
    out = tmp_path / "nb" / "train" / "test_mean-subset2-seed3"
    assert summary["out_dir"] == str(out)
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["dataset_size"] == 6 and config["subset_per_category"] == 2 and config["subset_seed"] == 3
    assert len(config["subset_images"]) == 6 and {p.split("/")[0] for p in config["subset_images"]} == {
        "brick", "screw", "wood"}
    whole = wb.train(Mean(FakeBackbone(), image_size=8), tag="all", epochs=1)
    assert json.loads((tmp_path / "nb" / "train" / "test_mean-all" / "config.json").read_text())["dataset_size"] == 33
    assert whole["history"][0]["steps"] == 5  # 33 images in batches of 8 (smoke profile)
