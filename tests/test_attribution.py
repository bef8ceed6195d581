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


def test_gradient_x_activation_and_bad_method(method):
    images = torch.randn(1, 3, 32, 32)
    assert PatchAttribution(method, "gradient-x-activation")(images, 1).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="'saliency'"):
        PatchAttribution(method, "saliency")
