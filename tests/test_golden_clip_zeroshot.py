"""CLIP zero-shot baseline against shared/goldens/clip_zeroshot (atol 1e-5, rtol 1e-4)."""
import pytest
import torch

from conftest import INPUT_CLASSES, assert_close, golden, input_paths
from zsad_core.methods import create_method
from zsad_core.preprocess import load_images

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def ref():
    return golden("clip_zeroshot", "inference.safetensors")


@pytest.fixture(scope="module")
def images():
    return load_images(input_paths(), 336, "clip_center")


def test_image_features_and_logit_scale(tiny, ref, images):
    method = create_method("clip_zeroshot", tiny)
    with torch.no_grad():
        out = method(images, INPUT_CLASSES)
        raw = tiny.encode_image(images)
    assert_close(raw, ref["image_features_raw"], **TOL, name="image_features_raw")
    assert_close(out["image_features"], ref["image_features"], **TOL, name="image_features")
    assert_close(method.logit_scale().reshape(1), ref["logit_scale_exp"], **TOL, name="logit_scale_exp")


@pytest.mark.parametrize("prompts", ["naive", "damaged", "cpe"])
def test_prompt_sets(tiny, ref, images, prompts):
    method = create_method("clip_zeroshot", tiny, options=[f"prompts={prompts}"])
    for cls in ("brick", "gravel"):
        assert_close(method.text_prototypes(cls), ref[f"text_features_{prompts}_{cls}"], **TOL, name=f"{prompts} {cls}")
    with torch.no_grad():
        out = method(images, INPUT_CLASSES)
    assert_close(out["logits"], ref[f"logits_{prompts}"], **TOL, name=f"logits_{prompts}")
    assert_close(out["image_scores"], ref[f"score_{prompts}"], **TOL, name=f"score_{prompts}")


def test_raw_cpe_prompt_embeddings(tiny, ref):
    from zsad_core.methods.clip_zeroshot import prompt_set

    tiny.set_activation("quick_gelu")
    for cls in ("brick", "gravel"):
        normal, anomalous = prompt_set("cpe", cls)
        assert (len(normal), len(anomalous)) == (147, 84)
        assert_close(tiny.encode_text(normal), ref[f"text_prompt_embeddings_raw_{cls}_normal"], **TOL, name="normal")
        assert_close(tiny.encode_text(anomalous), ref[f"text_prompt_embeddings_raw_{cls}_anomalous"], **TOL,
                     name="anomalous")


def test_predict_matches_per_category(tiny, ref, images):
    method = create_method("clip_zeroshot", tiny)
    brick = method.predict(images[:2], "brick", batch_size=1)
    gravel = method.predict(images[2:], "gravel")
    assert brick.anomaly_maps is None
    assert_close(torch.cat([brick.image_scores, gravel.image_scores]), ref["score_naive"], **TOL, name="predict")
