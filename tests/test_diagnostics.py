"""Token diagnostics on hand-set inputs with exact expected counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from analysis.diagnostics import SINK_DEFINITIONS, SinkDefinition, TokenDiagnostics, _row_median
from analysis.recorder import ActivationCache, record


def _cache(x: torch.Tensor, pattern: torch.Tensor | None = None) -> ActivationCache:
    cache = ActivationCache([0], ("resid_post", "attn.pattern"))
    cache._put("blocks.0.resid_post", x)
    if pattern is not None:
        cache._put("blocks.0.attn.pattern", pattern)
    return cache


def test_a_token_with_a_known_huge_norm_is_one_high_norm_sink(bundle):
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    x[0, 5] *= 50.0  # one token far above the median norm in image 0
    text = F.normalize(torch.randn(3, 32), dim=-1)
    diag = TokenDiagnostics(bundle.model.visual, text, [0], sinks=[SINK_DEFINITIONS["high-norm"]])
    diag.update(_cache(x))
    row = diag.tables(model="m")["sinks"].iloc[0]
    assert row["images"] == 2 and row["mean_count"] == pytest.approx(0.5)  # 1 in image 0, 0 in image 1
    assert row["definition"] == "high-norm" and "2 x median patch norm" in row["label"] and row["model"] == "m"


def test_massive_activation_and_attention_mass_counts(bundle):
    x = torch.randn(1, 17, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3, 7] = 1e4  # one massive channel in token 2 (patch index)
    x[0, 12, 40] = -1e4  # and a negative one in token 11: magnitude counts
    pattern = torch.full((1, 2, 17, 17), 1 / 17)
    pattern[0, :, 0] = 0.0
    pattern[0, :, 0, 4] = 0.6  # CLS puts most attention on two patches
    pattern[0, :, 0, 9] = 0.4
    text = F.normalize(torch.randn(3, 32), dim=-1)
    sinks = [SINK_DEFINITIONS["massive-activation"], SinkDefinition("attention-mass", 5.0, "cls")]
    diag = TokenDiagnostics(bundle.model.visual, text, [0], sinks=sinks)
    diag.update(_cache(x, pattern))
    counts = diag.tables()["sinks"].set_index("definition")["mean_count"]
    assert counts["massive-activation"] == 2 and counts["attention-mass"] == 2


def test_norms_by_bucket_add_up_and_sum_all_counts_tokens_relevant_to_every_class(bundle):
    visual = bundle.model.visual
    with record(bundle.model, what=("resid_post",)) as cache, torch.no_grad():
        bundle.model.encode_image(torch.randn(4, 3, 32, 32))
    text = F.normalize(torch.randn(5, 32), dim=-1)
    diag = TokenDiagnostics(visual, text, [0, 1], sinks=[SINK_DEFINITIONS["sum-all"]])
    diag.update(cache)
    diag.update(cache)  # streaming: a second batch doubles the counts
    tables = diag.tables(dataset="d", episode=0)
    norms = tables["norms"]
    assert set(norms["bucket"]) == set(range(6))
    assert norms.groupby("layer")["count"].sum().tolist() == [2 * 4 * 16] * 2
    per_layer = norms[norms["layer"] == 1].set_index("bucket")
    patches = cache["blocks.1.resid_post"][:, 1:]
    from cdfsl_core.token_text import project_tokens, sum_score

    counts = sum_score(F.normalize(project_tokens(visual, patches), dim=-1) @ text.T, 0.3)
    assert per_layer.loc[5, "count"] == 2 * int((counts == 5).sum())
    expected_mean = patches.norm(dim=-1)[counts == 0].mean().item() if (counts == 0).any() else float("nan")
    if (counts == 0).any():
        assert per_layer.loc[0, "mean"] == pytest.approx(expected_mean, rel=1e-5)
    sinks = tables["sinks"].set_index("layer")
    assert sinks.loc[1, "mean_count"] == pytest.approx(float((counts == 5).sum(-1).float().mean()))
    head_tail = tables["head_tail"]
    assert head_tail.groupby("layer")["count"].sum().tolist() == [2 * 4 * 16] * 2
    assert (head_tail["head_cut"] >= head_tail["tail_cut"]).all()


def test_memory_does_not_grow_with_batches(bundle):
    diag = TokenDiagnostics(bundle.model.visual, F.normalize(torch.randn(3, 32), dim=-1), [0])
    x = torch.randn(8, 17, 64)
    pattern = torch.softmax(torch.randn(8, 2, 17, 17), dim=-1)
    diag.update(_cache(x, pattern))
    sizes = (diag._norm.nbytes, diag._sink.nbytes, diag._hist.nbytes)
    for _ in range(5):
        diag.update(_cache(x, pattern))
    assert (diag._norm.nbytes, diag._sink.nbytes, diag._hist.nbytes) == sizes
    assert diag.tables()["sinks"]["images"].iloc[0] == 48


def test_bad_settings(bundle):
    text = F.normalize(torch.randn(3, 32), dim=-1)
    with pytest.raises(ValueError, match="space='pixel'"):
        TokenDiagnostics(bundle.model.visual, text, [0], space="pixel")
    with pytest.raises(ValueError, match="unknown sink definition 'big'"):
        TokenDiagnostics(bundle.model.visual, text, [0], sinks=[SinkDefinition("big", 1.0)])
    diag = TokenDiagnostics(bundle.model.visual, text, [0], sinks=[SINK_DEFINITIONS["attention-mass"]])
    with pytest.raises(ValueError, match="needs 'attn.pattern'"):
        diag.update(_cache(torch.randn(1, 17, 64)))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1025])
def test_row_median_is_torch_median(n):
    values = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(_row_median(values), values.median(dim=-1).values)


def test_norms_and_sinks_alone_equal_the_full_statistics(bundle):
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(2))
    text = F.normalize(torch.randn(3, 32), dim=-1)
    sinks = [SINK_DEFINITIONS[k] for k in ("sum-all", "high-norm", "massive-activation")]
    full = TokenDiagnostics(bundle.model.visual, text, [0], sinks=sinks)
    lean = TokenDiagnostics(bundle.model.visual, text, [0], sinks=sinks, head_tail=False)
    full.update(_cache(x))
    lean.update(_cache(x))
    full_tables, lean_tables = full.tables(), lean.tables()
    assert "head_tail" in full_tables and set(lean_tables) == {"norms", "sinks"}
    for name in ("norms", "sinks"):
        assert full_tables[name].equals(lean_tables[name])
