"""The shared prompt learner configured as FAPrompt (5 shared normal vectors, 10 abnormal prompts with 2
own vectors each) reproduces FAPrompt's official buffers, key layout and static text features: one code
path for AnomalyCLIP and FAPrompt (tolerances of shared/goldens/faprompt/README.md)."""
import torch

from conftest import GOLDEN, assert_close, golden
from zsad_core.prompt_learner import PromptLearner

FAPROMPT = dict(n_ctx_normal=5, n_ctx_abnormal=2, n_abnormal=10, share_normal_ctx=True, placeholders=("N", "A"),
                owner="FAPrompt")


def official_faprompt_state():
    return torch.load(GOLDEN / "faprompt" / "ckpt_init.pth", weights_only=True)["prompt_learner"]


def test_faprompt_configuration_builds_the_official_buffers_and_layout(tiny):
    state = official_faprompt_state()
    learner = PromptLearner(tiny, **FAPROMPT)
    assert learner.sentences("object") == ("N N N N N object.", "N N N N N A A damaged object.")
    own = learner.state_dict()
    for key, value in own.items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype, key
        if key.startswith(("token_", "tokenized_")):
            assert torch.equal(state[key], value), key
    extra = {k: v for k, v in state.items() if k.startswith("patch_meta_net.")}
    assert list(learner.official_state_dict(extra)) == list(state)  # patch_meta_net sits after the buffers


def test_faprompt_static_text_features(tiny):
    ref = golden("faprompt", "inference.safetensors")
    state = official_faprompt_state()
    learner = PromptLearner(tiny, **FAPROMPT)
    learner.load_official_state({k: v for k, v in state.items() if not k.startswith("patch_meta_net.")}, "ckpt_init")
    tiny.set_activation("quick_gelu")
    with torch.no_grad():
        plain = learner.encode(tiny, deep_prompts_fp16=False)[0]  # the FAPrompt golden removed the fp16 cast
        rounded = learner.encode(tiny, deep_prompts_fp16=True)[0]
        shifted = learner.encode(tiny, abnormal_shift=torch.randn(3, 1, 1, 128))  # a per-image prior, batched
    tol = dict(atol=5e-5, rtol=1e-4)
    assert_close(plain[:1], ref["text.static.normal_raw"], **tol, name="normal")
    assert_close(plain[1:], ref["text.static.abnormal_raw_k"], **tol, name="abnormal")
    assert_close(rounded[:1], ref["text.static.normal_raw_fp16quirk"], **tol, name="normal fp16")
    assert_close(rounded[1:], ref["text.static.abnormal_raw_k_fp16quirk"], **tol, name="abnormal fp16")
    assert shifted.shape == (3, 11, 128)
    assert torch.allclose(shifted[:, 0], rounded[0].expand(3, -1), atol=1e-6)  # the normal prompt has no prior
