"""The training engine: recipe hooks, checkpoints, loss log, and resume after an interruption."""
from dataclasses import dataclass

import pytest
import torch

from zsad_core.methods.base import Method
from zsad_core.train import train


class FakeBackbone(torch.nn.Module):
    name, activation, native_image_size, device = "fake", "gelu", 8, torch.device("cpu")

    def grid_for(self, size):
        return size

    def set_activation(self, activation):
        return self


class Linear(Method):
    """A one-layer 'method' whose loss is a least-squares fit of the labels from the mean image."""
    name = "test_linear"
    stages = ("fit",)
    recipe = {"fit": {"epochs": 3, "batch_size": 4, "seed": 7}}

    @dataclass
    class Options:
        lr: float = 0.1

    def __init__(self, backbone, options=None, image_size=None):
        super().__init__(backbone, options, image_size)
        self.w = torch.nn.Parameter(torch.zeros(3))

    def make_optimizer(self, stage, steps_per_epoch, epochs):
        opt = torch.optim.SGD([self.w], lr=self.options.lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def training_loss(self, batch, stage):
        pred = batch["images"].mean(dim=(2, 3)) @ self.w
        mse = ((pred - batch["labels"].float()) ** 2).mean()
        return {"mse": mse, "total": mse}


def dataset(n=10):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 8, 8, generator=g), "mask": torch.zeros(8, 8), "label": i % 2, "category": "thing", "defect_type": "good", "path": "",
             "class_name": "thing"} for i in range(n)]


def test_trains_logs_and_checkpoints(tmp_path):
    method = Linear(FakeBackbone())
    summary = train(method, dataset(), tmp_path, progress=False, log=lambda *_: None)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["history"][-1]["mse"] < summary["history"][0]["mse"]
    assert (tmp_path / "fit_epoch3.safetensors").is_file() and (tmp_path / "losses.jsonl").is_file()
    assert len((tmp_path / "losses.jsonl").read_text().splitlines()) == 9  # 3 epochs x ceil(10/4)
    fresh = Linear(FakeBackbone())
    fresh.load_checkpoint(tmp_path / "fit_epoch3.safetensors")
    assert torch.equal(fresh.w, method.w)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    reference = Linear(FakeBackbone())
    train(reference, dataset(), tmp_path / "ref", progress=False, log=lambda *_: None)

    interrupted = Linear(FakeBackbone())
    calls = {"n": 0}
    original = interrupted.training_loss

    def flaky(batch, stage):
        calls["n"] += 1
        if calls["n"] == 7:  # during epoch 3
            raise KeyboardInterrupt
        return original(batch, stage)

    interrupted.training_loss = flaky
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, dataset(), tmp_path / "run", progress=False, log=lambda *_: None)
    resumed = Linear(FakeBackbone())
    summary = train(resumed, dataset(), tmp_path / "run", progress=False, log=lambda *_: None)
    assert [h["epoch"] for h in summary["history"]] == [3]
    assert torch.allclose(resumed.w, reference.w, atol=0, rtol=0)


def test_more_epochs_continue_a_finished_run_and_fewer_keep_it(tmp_path):
    reference = Linear(FakeBackbone())
    train(reference, dataset(), tmp_path / "ref", progress=False, log=lambda *_: None)  # 3 epochs

    short = Linear(FakeBackbone())
    train(short, dataset(), tmp_path / "run", epochs=2, progress=False, log=lambda *_: None)
    longer = Linear(FakeBackbone())
    summary = train(longer, dataset(), tmp_path / "run", epochs=3, progress=False, log=lambda *_: None)
    assert [h["epoch"] for h in summary["history"]] == [3]
    assert torch.equal(longer.w, reference.w)  # the schedule does not depend on the number of epochs

    messages = []
    again = Linear(FakeBackbone())
    summary = train(again, dataset(), tmp_path / "run", epochs=1, progress=False, log=messages.append)
    assert summary["history"] == [] and torch.equal(again.w, reference.w)
    assert any("more than the 1 asked" in m for m in messages)
