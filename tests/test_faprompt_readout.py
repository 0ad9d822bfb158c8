"""FAPrompt's read-outs for the notebook: the parts of the map, the prior's patches, the prompt cosines."""
import torch

from zsad_core.losses import pairwise_cosine_loss
from zsad_core.methods import create_method


def make(tiny, *options):
    torch.manual_seed(0)
    return create_method("faprompt", tiny, options=list(options), image_size=112)


def test_path_maps_are_the_parts_of_the_forward(tiny):
    method = make(tiny).eval()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    parts = method.path_maps(images)
    with torch.no_grad():
        out = method(images, ["object"] * 2)
    assert torch.equal(parts["final"], out["anomaly_maps"]) and torch.equal(parts["image_scores"], out["image_scores"])
    assert parts["static"].shape == parts["dap"].shape == (2, 112, 112)
    # the official prior reads the first M patches; the paper's top-M are those with the highest S_a
    assert parts["selected_index"].tolist() == [list(range(10))] * 2
    assert parts["topk_index"].shape == (2, 10) and not torch.equal(parts["topk_index"], parts["selected_index"])
    paper = make(tiny, "dap_selection=top_m").path_maps(images)
    assert torch.equal(paper["selected_index"], paper["topk_index"])
    cap_only = make(tiny, "prior=false").path_maps(images)
    assert set(cap_only) == {"static", "final", "image_scores"}


def test_abnormal_prompt_cosines_sum_to_the_orthogonal_loss(tiny):
    method = make(tiny, "n_abnormal=4")
    cosines = method.abnormal_prompt_cosines()
    assert cosines.shape == (4, 4)
    torch.testing.assert_close(cosines, cosines.T)
    torch.testing.assert_close(cosines.diagonal(), torch.ones(4))
    with torch.no_grad():
        oc = pairwise_cosine_loss(method.prompt_features()[0, 1:])
    torch.testing.assert_close(cosines.triu(1).abs().sum(), oc)
