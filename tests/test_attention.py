"""Attention maps and rollout on hand-set patterns."""

from __future__ import annotations

import pytest
import torch

from analysis.attention import attention_rollout, attention_table, cls_attention_maps
from analysis.keys import act_name
from analysis.recorder import ActivationCache


def _cache(patterns):
    return ActivationCache.from_tensors({act_name("attn.pattern", i): p for i, p in enumerate(patterns)})


def test_cls_maps_put_the_cls_row_on_the_patch_grid():
    pattern = torch.zeros(1, 2, 5, 5)
    pattern[0, 1, 0, 3] = 1.0  # head 1: CLS looks at patch 2 (row 1, col 0 of a 2x2 grid)
    maps = cls_attention_maps(_cache([pattern]), [0])
    assert maps.shape == (1, 1, 2, 2, 2)
    assert maps[0, 0, 1, 1, 0] == 1.0 and maps.sum() == 1.0


def test_rollout_of_identity_attention_keeps_cls_on_itself_and_of_uniform_spreads_evenly():
    identity = torch.eye(5).expand(1, 2, 5, 5)
    assert attention_rollout(_cache([identity, identity]), [0, 1]).abs().sum() == 0
    uniform = torch.full((1, 2, 5, 5), 0.2)
    rollout = attention_rollout(_cache([uniform]), [0], residual=0.0)
    assert torch.allclose(rollout, torch.full((1, 2, 2), 0.2))


def test_rollout_multiplies_layers_in_order():
    a = torch.softmax(torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    b = torch.softmax(torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(1)), -1)
    rollout = attention_rollout(_cache([a, b]), [0, 1], residual=0.0)
    expected = (b[0, 0] @ a[0, 0])[0, 1:].reshape(2, 2)
    assert torch.allclose(rollout[0], expected, atol=1e-6)


def test_table_is_tidy_and_errors_are_clear():
    maps = torch.rand(1, 2, 3, 4, 4)
    table = attention_table(maps, [5], model="m")
    assert len(table) == 2 * 3 * 16 and set(table["layer"]) == {5} and table["value"].sum() == pytest.approx(maps.sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="residual=2"):
        attention_rollout(_cache([torch.rand(1, 1, 5, 5)]), [0], residual=2)
    with pytest.raises(ValueError, match="square grid"):
        cls_attention_maps(_cache([torch.rand(1, 1, 6, 6)]), [0])
