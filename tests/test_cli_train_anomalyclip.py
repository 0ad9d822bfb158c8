"""`zsad train --method anomalyclip`: the official recipe on an auxiliary dataset, interrupted and resumed,
exported in the official checkpoint format."""
import json

import torch

from zsad_core.cli import main
from zsad_core.methods import create_method
from zsad_core.methods.anomalyclip import AnomalyCLIP


def test_train_anomalyclip_recipe_resume_and_export(tmp_path, capsys, monkeypatch, tiny):
    out = tmp_path / "run"
    command = ["train", "--method", "anomalyclip", "--dataset", "synth_industrial_a", "--out", str(out),
               "--image-size", "112", "--max-steps", "2"]
    assert main(command + ["--epochs", "1"]) == 0
    steps = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(1, 1), (1, 2)]
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (1e-3, (0.5, 0.999), 1e-8, 0.0)
    recipe = AnomalyCLIP.recipe["prompts"]
    assert (recipe["seed"], recipe["epochs"], recipe["batch_size"], recipe["split"]) == (111, 15, 8, "test")
    assert json.loads((out / "config.json").read_text())["dataset_size"] == 33  # pooled test split of 3 categories

    original, calls = AnomalyCLIP.training_loss, {"n": 0}

    def interrupted(self, batch, stage="prompts"):
        calls["n"] += 1
        if calls["n"] == 2:  # second step of epoch 2
            raise KeyboardInterrupt
        return original(self, batch, stage)

    monkeypatch.setattr(AnomalyCLIP, "training_loss", interrupted)
    assert main(command + ["--epochs", "2"]) == 130
    monkeypatch.setattr(AnomalyCLIP, "training_loss", original)
    capsys.readouterr()
    assert main(command + ["--epochs", "2", "--export-official"]) == 0
    printed = capsys.readouterr().out
    assert "resuming after stage 'prompts' epoch 1" in printed and "1 epoch(s) this run" in printed
    assert (out / "prompts_epoch2.safetensors").is_file()

    official = create_method("anomalyclip", tiny, image_size=112)
    official.load_checkpoint(out / "official.pth")
    ours = create_method("anomalyclip", tiny, image_size=112)
    ours.load_checkpoint(out / "last.safetensors")
    assert torch.equal(official.prompt_learner.ctx_pos, ours.prompt_learner.ctx_pos)
