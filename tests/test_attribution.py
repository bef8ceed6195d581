"""captum attributions over patch tokens."""

from __future__ import annotations

import pytest
import torch

from analysis.attribution import PatchAttribution
from cdfsl_core.methods import create_method
from cdfsl_core.models import load_clip


@pytest.fixture
def method():
    torch.manual_seed(0)
    return create_method(load_clip("cdfsl-test-vit"), ["a", "b", "c"], "coop", "tir").eval()


def test_integrated_gradients_are_one_value_per_patch_and_complete(method):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attribution = PatchAttribution(method, n_steps=32)(images, target=torch.tensor([0, 2]))
    assert attribution.shape == (2, 4, 4)
    # completeness: attributions sum to logit(input) - logit(baseline of zero patch embeddings)
    with torch.no_grad():
        logits = method(images)
        conv = method.model.visual.conv1
        handle = conv.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        baseline = method(images)
        handle.remove()
    expected = logits[[0, 1], [0, 2]] - baseline[[0, 1], [0, 2]]
    assert torch.allclose(attribution.sum(dim=(1, 2)), expected, rtol=0.1, atol=0.05)


def test_gradient_x_activation_is_the_gradient_times_the_patch_embedding_and_bad_method(method):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attribution = PatchAttribution(method, "gradient-x-activation")(images, 1)
    assert attribution.shape == (2, 4, 4)
    # by hand: keep the patch embeddings (conv1's output), differentiate the class-1 logits w.r.t. them
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["embedding"] = out

    handle = method.model.visual.conv1.register_forward_hook(keep)
    try:
        method(images.clone().requires_grad_())[:, 1].sum().backward()
    finally:
        handle.remove()
    expected = (kept["embedding"].grad * kept["embedding"]).sum(dim=1).detach()
    assert torch.allclose(attribution, expected, atol=1e-6)
    with pytest.raises(ValueError, match="'saliency'"):
        PatchAttribution(method, "saliency")
