"""FAPrompt against shared/goldens/faprompt (README tolerances): inference, one official training step,
the official checkpoint format (import, export, zsad predict), and the paper / ablation options.

The golden's main tensors were made with the deep-prompt fp16 cast removed (its edit E1), so they are
compared with `deep_prompts_fp16=false`; the default (the official cast) is checked against the
`*_fp16quirk` tensors. The 518 x 518 passes run once: the `zsad predict` run on the four golden images
(fixture `predicted`) records the DPAM vision pass it makes, and one official training step on that
pass (fixture `step`: same checkpoint, same four images in order) gives both the inference tensors and
the training tensors (the golden's batch-1 inference and batch-4 training tensors agree to 1e-7).
"""
import hashlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import (GOLDEN, check_foreign_checkpoints_fail_in_one_line, check_zsad_checkpoint_round_trip,
                       assert_close, golden, golden_hash, input_paths)
from zsad_core.cli import main
from zsad_core.errors import CheckpointError, OptionError
from zsad_core.losses import pairwise_cosine_loss
from zsad_core.maps import patch_map
from zsad_core.methods import create_method
from zsad_core.methods.faprompt import FAPrompt
from zsad_core.preprocess import load_images, preprocess_mask

CKPT = GOLDEN / "faprompt" / "ckpt_init.pth"
AS_GOLDEN = "deep_prompts_fp16=false"  # the golden's edit E1
LABELS = torch.tensor([0, 1, 0, 1])
# README "Recommended tolerances"
RAW = dict(atol=5e-5, rtol=1e-4)  # raw encoder outputs
NORMED = dict(atol=1e-5, rtol=0.0)  # normalised embeddings, similarities, prior bias, scores, maps
LOSS = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-4, rtol=1e-3)
PARAM = dict(atol=1e-5, rtol=0.0)


def make(tiny, *options, checkpoint=True, image_size=None):
    method = create_method("faprompt", tiny, options=list(options), image_size=image_size)
    if checkpoint:
        method.load_checkpoint(CKPT)
    return method


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def ref():
    return golden("faprompt", "inference.safetensors")


@pytest.fixture(scope="module")
def train_ref():
    return golden("faprompt", "training.safetensors")


@pytest.fixture(scope="module")
def masks():
    return torch.stack([preprocess_mask(Image.open(p) if y else None, 518, "bilinear")
                        for p, y in zip(input_paths(masks=True), LABELS)]).float()


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """`zsad predict --checkpoint ckpt_init.pth` on the four golden images (in process), and the
    vision pass that run made (recorded, for the other tests)."""
    recorded = []
    original = FAPrompt.encode_image

    def recording(self, images):
        recorded.append(original(self, images))
        return recorded[-1]

    out = tmp_path_factory.mktemp("predict") / "x.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FAPrompt, "encode_image", recording)
        code = main(["predict", "--method", "faprompt", "--backbone", "tiny", "--checkpoint", str(CKPT),
                     "--set", AS_GOLDEN, "--out", str(out), *map(str, input_paths())])
    assert code == 0 and len(recorded) == 1
    return load_file(str(out)), recorded[0]


@pytest.fixture(scope="module")
def step(tiny, predicted, masks):
    """One official training step (Adam, recipe) on the golden batch from the recorded vision pass."""
    method = make(tiny, AS_GOLDEN)
    tiny.set_activation("quick_gelu")
    optimizer, scheduler = method.make_optimizer("prompts", steps_per_epoch=1, epochs=1)
    out = method.paths(predicted[1])
    terms = method.loss_terms(out, LABELS, masks)
    optimizer.zero_grad()
    terms["total"].backward()
    params = official_parameters(method)
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    optimizer.step()
    out = {k: v.detach() for k, v in out.items()}
    return dict(method=method, out=out, terms=terms, grads=grads, params=params, optimizer=optimizer,
                scheduler=scheduler)


def official_parameters(method) -> dict:
    """Learnable parameters under their official names."""
    state = method.official_state_dict()
    named = {**{k: p for k, p in method.prompt_learner.named_parameters()},
             **{f"patch_meta_net.{k}": p for k, p in method.patch_meta_net.named_parameters()}}
    assert set(named) <= set(state)
    return named


# ------------------------------------------------------------------ inputs and vision
def test_inputs_are_the_goldens(ref, masks):
    images = load_images(input_paths(), 518, "squash")
    for key, tensor in (("input.image", images), ("input.gt_mask", masks)):
        expected = golden_hash("faprompt", f"inference.safetensors:{key}")
        assert list(tensor.shape) == expected["shape"] and sha256(tensor) == expected["sha256"], key
    assert torch.equal(LABELS.float(), ref["input.label"])


def test_vision(tiny, predicted, ref, step):
    vision = predicted[1]
    assert torch.equal(tiny.positional_embedding(37, "bilinear"), ref["vision.pos_embed_interp"])
    assert_close(tiny.global_embedding(vision, ln_post=False), ref["image.embed_raw"], **RAW, name="image.embed_raw")
    assert_close(step["out"]["image_embed"], ref["image.embed"], **NORMED, name="image.embed")
    tokens = vision.tokens[24]
    assert_close(tokens.norm(dim=-1), ref["patch.token_norm"], **RAW, name="patch.token_norm")
    assert_close(tokens[:, :11], ref["patch.tokens_raw_first11"], **RAW, name="patch.tokens_raw_first11")


# ------------------------------------------------------------------ inference
def test_static_text(tiny, ref, step):
    out = step["out"]
    assert_close(out["static_raw"][:1], ref["text.static.normal_raw"], **RAW, name="text.static.normal_raw")
    assert_close(out["static_raw"][1:], ref["text.static.abnormal_raw_k"], **RAW, name="text.static.abnormal_raw_k")
    assert_close(out["static_text"][0], ref["text.static.scoring"], **NORMED, name="text.static.scoring")
    official = make(tiny)  # the default: deep prompts rounded to fp16 as the unedited official code does
    assert official.options.deep_prompts_fp16
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        rounded = official.prompt_features()[0]
    assert_close(rounded[:1], ref["text.static.normal_raw_fp16quirk"], **RAW, name="normal_raw_fp16quirk")
    assert_close(rounded[1:], ref["text.static.abnormal_raw_k_fp16quirk"], **RAW, name="abnormal_raw_k_fp16quirk")
    assert (rounded - out["static_raw"]).abs().max() > 1e-4  # the rounding is really there


def test_truncated_text_tower_equals_the_full_one(tiny, step):
    """Dropping the rows after the last EOT (causal attention) changes only float32 rounding: here the
    two differ by 2.1e-6 while the full float32 pass is itself 3.8e-6 from a float64 one."""
    learner = step["method"].prompt_learner
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        full = learner.encode(tiny, deep_prompts_fp16=False)
        short = learner.encode(tiny, deep_prompts_fp16=False, truncate=True)
    assert_close(short, full, atol=1e-5, rtol=0.0, name="truncated text tower")


def test_static_and_dap_paths(ref, step):
    out = step["out"]
    assert_close(out["static_sim"], ref["static.sim"], **NORMED, name="static.sim")
    assert torch.equal(out["topk_index"], ref["dap.topk_index"])
    assert_close(out["static_sim"][:, 1:, 1].gather(1, out["topk_index"]), ref["dap.topk_value"], **NORMED,
                 name="dap.topk_value")
    assert torch.equal(out["selected_index"], ref["dap.selected_patch_index"])  # the official bug: patches 0..9
    assert_close(out["selected_tokens"], ref["dap.selected_tokens"], **NORMED, name="dap.selected_tokens")
    assert_close(out["prior_bias"], ref["dap.prior_bias"], **NORMED, name="dap.prior_bias")
    assert_close(out["dap_raw"][:, 1:], ref["text.dap.abnormal_raw_k"], **RAW, name="text.dap.abnormal_raw_k")
    assert_close(out["dap_raw"][:, 0], ref["text.static.normal_raw"].expand(4, -1), **RAW, name="normal, no prior")
    assert_close(out["dap_text"], ref["text.dap.scoring"], **NORMED, name="text.dap.scoring")
    assert_close(out["dap_sim"], ref["dap.sim"], **NORMED, name="dap.sim")


def test_scores(ref, step):
    out = step["out"]
    for name, key in (("text_prob", "score.text_prob"), ("map_max_static", "score.map_max_static"),
                      ("map_max_dap", "score.map_max_dap"), ("image_scores", "score.final")):
        assert_close(out[name], ref[key], **NORMED, name=key)


def test_predict_with_the_official_checkpoint_reproduces_the_golden(predicted, ref):
    prediction = predicted[0]
    assert prediction["anomaly_maps"].shape == (4, 518, 518)
    assert_close(prediction["image_scores"], ref["score.final"], **NORMED, name="score.final")
    assert_close(prediction["anomaly_maps"][:, ::7, ::7], ref["map.final@s7"], **NORMED, name="map.final")


# ------------------------------------------------------------------ one official training step
def test_training_forward(train_ref, step):
    out = step["out"]
    pairs = {"image_embed": "train.image_embed", "static_sim": "train.static.sim", "dap_sim": "train.dap.sim",
             "selected_tokens": "train.dap.selected_tokens", "prior_bias": "train.dap.prior_bias",
             "static_text": "train.text.static.scoring", "dap_text": "train.text.dap.scoring",
             "text_logits": "train.text_logits", "text_prob": "train.score.text_prob",
             "map_max_static": "train.score.map_max_static", "map_max_dap": "train.score.map_max_dap",
             "image_scores": "train.score.score2"}
    for name, key in pairs.items():
        expected = train_ref[key]
        assert_close(out[name].reshape(expected.shape), expected, **NORMED, name=key)
    assert torch.equal(out["topk_index"], train_ref["train.dap.topk_index"])
    assert_close(out["static_sim"][:, 1:, 1].gather(1, out["topk_index"]), train_ref["train.dap.topk_value"],
                 **NORMED, name="train.dap.topk_value")
    raw = {"train.text.static.normal_raw": out["static_raw"][:1], "train.text.static.abnormal_raw_k": out["static_raw"][1:],
           "train.text.dap.abnormal_raw_k": out["dap_raw"][:, 1:]}
    for key, value in raw.items():
        assert_close(value, train_ref[key], **RAW, name=key)


def test_training_patch_norms(predicted, train_ref):
    assert_close(predicted[1].tokens[24].norm(dim=-1), train_ref["train.patch.token_norm"], **RAW,
                 name="train.patch.token_norm")


def test_losses(train_ref, step):
    terms = step["terms"]
    recorded = {k[len("loss."):] for k in train_ref if k.startswith("loss.")} - {"prior.per_normal_image"}
    assert set(terms) == recorded
    for name, value in terms.items():
        assert value.shape == () and value.requires_grad, name
        assert_close(value, train_ref[f"loss.{name}"], **LOSS, name=f"loss.{name}")
    per_image = FAPrompt.prior_loss_per_image(step["out"]["prior_bias"], LABELS)
    assert_close(per_image, train_ref["loss.prior.per_normal_image"], **LOSS, name="loss.prior.per_normal_image")


def test_gradients_and_parameters_after_the_adam_step(train_ref, step):
    grads, params, optimizer = step["grads"], step["params"], step["optimizer"]
    recorded = sorted(k[len("grad."):] for k in train_ref if k.startswith("grad."))
    assert sorted(grads) == recorded  # the dead projections get no gradient
    for name in recorded:
        assert_close(grads[name], train_ref[f"grad.{name}"], **GRAD, name=f"grad.{name}")
        assert_close(params[name], train_ref[f"param_after.{name}"], **PARAM, name=f"param_after.{name}")
    initial = torch.load(CKPT, weights_only=True)["prompt_learner"]
    for name, p in params.items():
        if name.startswith("compound_prompt_projections"):  # in the optimizer, never stepped
            assert p.grad is None and p not in optimizer.state and torch.equal(p, initial[name])
    assert step["scheduler"] is None
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.5, 0.999), 1e-8, 0.0)
    assert {id(p) for p in group["params"]} == {id(p) for p in params.values()} and len(group["params"]) == 30


# ------------------------------------------------------------------ training hook and recipe
SMALL = 84  # a 6 x 6 patch grid: cheap passes for the hooks and options


@pytest.fixture(scope="module")
def small_images():
    return load_images(input_paths()[:2], SMALL, "squash")


@pytest.fixture(scope="module")
def small_vision(tiny, small_images):
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        return make(tiny, image_size=SMALL, checkpoint=False).encode_image(small_images)


@pytest.fixture(scope="module")
def small_default(tiny, small_vision):
    with torch.no_grad():
        return make(tiny, image_size=SMALL).paths(small_vision)


def small_batch(small_images, masks=None):
    return dict(images=small_images, masks=torch.zeros(2, SMALL, SMALL) if masks is None else masks,
                labels=torch.tensor([0, 1]), class_names=["brick"] * 2)


def test_training_loss_hook_and_recipe(tiny, small_images, small_vision):
    method = make(tiny, image_size=SMALL)
    batch = small_batch(small_images)
    terms = method.training_loss(batch, "prompts")
    with torch.no_grad():
        expected = method.loss_terms(method.paths(small_vision), batch["labels"], batch["masks"])
    assert terms.keys() == expected.keys() and torch.equal(terms["total"].detach(), expected["total"])
    terms["total"].backward()
    assert method.prompt_learner.ctx_neg.grad.abs().sum() > 0 and method.patch_meta_net.linear1.weight.grad is not None
    assert all(not p.requires_grad for p in tiny.parameters())
    assert method.stages == ("prompts",)
    r = method.recipe["prompts"]
    assert (r["optimizer"], r["lr"], r["betas"], r["epochs"], r["batch_size"], r["seed"], r["split"]) == \
        ("Adam", 1e-3, (0.5, 0.999), 15, 8, 111, "test")


# ------------------------------------------------------------------ options: paper and ablations
def test_top_m_selection_is_the_papers(tiny, ref, step, small_vision, small_default):
    method = make(tiny, "dap_selection=top_m", image_size=SMALL)
    selected, top = method.prior_patches(step["out"]["static_sim"])
    assert torch.equal(selected, ref["dap.topk_index"]) and torch.equal(top, selected)
    with torch.no_grad():
        out = method.paths(small_vision)
    patches = out["patch_features"][:, 1:]
    assert torch.equal(out["selected_tokens"], patches[torch.arange(2)[:, None], out["topk_index"]])
    assert (out["image_scores"] - small_default["image_scores"]).abs().max() > 1e-6
    assert torch.equal(out["static_sim"], small_default["static_sim"])  # only the prior's input changes


def test_paper_image_score(tiny, step):
    out = step["out"]
    paper = make(tiny, "image_score=paper", checkpoint=False)
    expected = 0.5 * (out["text_prob"] + (out["map_max_static"] + out["map_max_dap"]) / 2)
    assert torch.allclose(0.5 * (out["text_prob"] + paper.map_max_score(out)), expected, atol=0, rtol=0)
    official = step["method"].map_max_score(out)
    assert (official - paper.map_max_score(out)).abs().max() > 1e-6


def test_cap_only(tiny, small_images, small_default):
    method = make(tiny, "prior=false", "sigma=0", image_size=SMALL)
    with torch.no_grad():
        out = method.infer(small_images)
    assert "dap_sim" not in out and "prior_bias" not in out
    static = patch_map(out["static_sim"], SMALL)
    assert torch.equal(out["anomaly_maps"], (static[:, 1] + 1 - static[:, 0]) / 2)
    assert torch.allclose(out["image_scores"], 0.5 * (out["text_prob"] + out["map_max_static"]))
    assert torch.equal(out["static_sim"], small_default["static_sim"])
    terms = method.training_loss(small_batch(small_images))
    assert "prior" not in terms and not any(k.startswith("map_dap") for k in terms)
    terms["total"].backward()
    assert method.patch_meta_net.linear1.weight.grad is None  # psi stays in the checkpoint, unused


def test_dap_only_and_sizes(tiny, small_vision):
    method = make(tiny, "n_abnormal=1", "n_ctx_normal=3", "n_ctx_abnormal=4", "top_m=5", "oc_weight=0",
                  checkpoint=False, image_size=SMALL)
    state = method.official_state_dict()
    assert state["ctx_pos"].shape == (1, 1, 3, 128) and state["ctx_neg"].shape == (1, 1, 4, 128)
    assert state["patch_meta_net.linear1.weight"].shape == (40, 640)
    assert method.prompt_learner.sentences("object") == ("N N N object.", "N N N A A A A damaged object.")
    terms = method.loss_terms(method.paths(small_vision), torch.tensor([0, 1]), torch.ones(2, SMALL, SMALL))
    assert terms["oc"] == 0  # one abnormal prompt: no pairs
    terms["total"].backward()
    assert method.patch_meta_net.linear1.weight.grad.abs().sum() > 0


def test_orthogonal_loss_and_weights(tiny, small_vision):
    t = torch.randn(10, 128, dtype=torch.float64)
    loop = sum(abs(torch.dot(t[k], t[m]) / (t[k].norm() * t[m].norm())) for k in range(10) for m in range(k + 1, 10))
    assert torch.allclose(pairwise_cosine_loss(t), loop, rtol=1e-12)
    method = make(tiny, "oc_weight=0", "prior_weight=2", "dap_map_weight=1", image_size=SMALL)
    with torch.no_grad():
        off = method.loss_terms(method.paths(small_vision), torch.tensor([0, 1]), torch.zeros(2, SMALL, SMALL))
    expected = (off["map_static.focal"] + off["map_static.dice_abnormal"] + off["map_static.dice_normal"]
                + off["map_dap.focal"] + off["map_dap.dice_abnormal"] + off["map_dap.dice_normal"])
    assert torch.allclose(off["map_total"], expected, rtol=1e-6)
    assert torch.allclose(off["total"], off["map_total"] + off["image_ce"] + off["image_focal"] + 2 * off["prior"],
                          rtol=1e-6)
    assert off["oc"] > 1  # computed (and logged), weighted 0


def test_bad_options_are_clear(tiny):
    with pytest.raises(OptionError, match="choose one of"):
        make(tiny, "dap_selection=best", checkpoint=False)
    with pytest.raises(OptionError, match="top_m"):
        make(tiny, "top_m=50", checkpoint=False, image_size=SMALL)
    with pytest.raises(OptionError, match="depth"):
        make(tiny, "depth=20", checkpoint=False)


# ------------------------------------------------------------------ checkpoints
def test_export_official_round_trip(tiny, tmp_path, small_images):
    source = make(tiny, image_size=SMALL)
    with torch.no_grad():  # other values than the golden's for everything training changes
        for name, p in official_parameters(source).items():
            if not name.startswith("compound_prompt_projections"):
                p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "epoch_1.pth"
    source.export_official(path)
    saved = torch.load(path, weights_only=True)
    reference = torch.load(CKPT, weights_only=True)["prompt_learner"]
    assert list(saved) == ["prompt_learner"] and list(saved["prompt_learner"]) == list(reference)
    assert all(saved["prompt_learner"][k].dtype == v.dtype and saved["prompt_learner"][k].shape == v.shape
               for k, v in reference.items())
    ptrs = {saved["prompt_learner"][f"compound_prompt_projections.{i}.weight"].untyped_storage().data_ptr()
            for i in range(8)}
    assert len(ptrs) == 1  # the identical dead projections share one storage, as in the official files
    loaded = make(tiny, image_size=SMALL, checkpoint=False)
    loaded.load_checkpoint(path)
    for key, value in source.learnable_state().items():
        assert torch.equal(loaded.learnable_state()[key], value), key
    with torch.no_grad():
        a, b = source(small_images, ["object"] * 2), loaded(small_images, ["object"] * 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    make(tiny).export_official(tmp_path / "again.pth")  # the imported golden exports to the golden
    again = torch.load(tmp_path / "again.pth", weights_only=True)["prompt_learner"]
    assert list(again) == list(reference) and all(torch.equal(again[k], v) for k, v in reference.items())


def test_zsad_checkpoint_round_trip(tiny, tmp_path):
    check_zsad_checkpoint_round_trip(make, tiny, tmp_path)


def test_wrong_checkpoint_is_one_clear_line(tiny, tmp_path, capsys):
    other = GOLDEN / "anomalyclip" / "checkpoint_init.pth"  # same container key, another prompt learner
    code = main(["predict", "--method", "faprompt", "--checkpoint", str(other), "--out", str(tmp_path / "o.safetensors"),
                 str(input_paths()[0])])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not an official FAPrompt checkpoint" in lines[0], lines
    assert str(other) in lines[0] and "--method anomalyclip" in lines[0]
    check_foreign_checkpoints_fail_in_one_line(make(tiny, checkpoint=False), tmp_path)


def test_checkpoint_of_other_sizes_says_which_option(tiny, tmp_path):
    state = torch.load(CKPT, weights_only=True)["prompt_learner"]
    cases = {
        "top_m": {**state, "patch_meta_net.linear1.weight": torch.zeros(40, 640),
                  "patch_meta_net.linear1.bias": torch.zeros(40), "patch_meta_net.linear2.weight": torch.zeros(128, 40)},
        "text width 768": {k: (torch.zeros(*v.shape[:-1], 768) if k.startswith("ctx") else v) for k, v in state.items()},
        "n_abnormal": {**state, "ctx_neg": torch.zeros(1, 4, 2, 128)},
    }
    for expected, broken in cases.items():
        torch.save({"prompt_learner": broken}, tmp_path / "x.pth")
        with pytest.raises(CheckpointError, match=expected):
            make(tiny, checkpoint=False).load_checkpoint(tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="depth"):
        make(tiny, "depth=5", checkpoint=False).load_checkpoint(CKPT)
