"""Token diagnostics on hand-set inputs with exact expected counts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.diagnostics import SINK_DEFINITIONS, SinkDefinition, TokenDiagnostics, _row_median
from analysis.recorder import ActivationCache


def _cache(x: torch.Tensor, pattern: torch.Tensor | None = None) -> ActivationCache:
    tensors = {"blocks.0.resid_post": x}
    if pattern is not None:
        tensors["blocks.0.attn.pattern"] = pattern
    return ActivationCache.from_tensors(tensors)


def test_a_token_with_a_known_huge_norm_is_one_high_norm_sink(bundle):
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    x[0, 5] *= 50.0  # one token far above the median norm in image 0
    text = F.normalize(torch.randn(3, 32), dim=-1)
    diag = TokenDiagnostics(bundle.model.visual, text, [0], sinks=[SINK_DEFINITIONS["high-norm"]])
    diag.update(_cache(x))
    row = diag.tables(model="m")["sinks"].iloc[0]
    assert row["images"] == 2 and row["mean_count"] == pytest.approx(0.5)  # 1 in image 0, 0 in image 1
    assert row["definition"] == "high-norm" and "2 x median patch norm" in row["label"] and row["model"] == "m"


def test_high_norm_compares_with_the_median_not_the_mean(bundle):
    # patch norms 1, 1, 1, 1, 1, 2.5, 2.5: median 1, so 2 tokens pass 2 x median; the mean, 1.43,
    # would put the threshold at 2.86 and find none
    x = torch.zeros(1, 8, 64)
    for j, norm in enumerate([1, 1, 1, 1, 1, 2.5, 2.5]):
        x[0, 1 + j, j] = norm
    text = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    diag = TokenDiagnostics(bundle.model.visual, text, [0], sinks=[SINK_DEFINITIONS["high-norm"]], head_tail=False)
    diag.update(_cache(x))
    assert diag.tables()["sinks"]["mean_count"].iloc[0] == 2.0


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


class HandBuiltTower(nn.Module):
    """ln_post with gain 1 and bias 0, P = I: for zero-mean tokens, cos(ln_post(x) P, t) = cos(x, t)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_post = nn.LayerNorm(4)
        self.proj = nn.Parameter(torch.eye(4))


# Two classes t_0 = (1, -1, 0, 0), t_1 = (0, 0, 1, -1); five zero-mean patch tokens per image.
# rho = 0.4: k = floor(0.4 x 5) = 2 tokens per class. Cosines (class 0, class 1), Sum score m, norm:
#   image 1: T1 (2,-2,1,-1) (.894,.447) m=1 |.|=sqrt10; T2 (1,-1,2,-2) (.447,.894) m=1 sqrt10;
#            T3 (1,-1,1,-1) (.707,.707) m=2 (in both top-2 sets) 2; T4 (-1,1,0,0) (-1, 0) m=0 sqrt2;
#            T5 (0,0,-1,1) (0,-1) m=0 sqrt2
#   image 2: T3 replaced by (-1,1,-1,1) (-.707,-.707): class 0's top-2 is {T1, T2}, class 1's {T2, T1},
#            so T1 and T2 have m=2, T3 m=0.
TEXT_2 = torch.tensor([[1.0, -1, 0, 0], [0, 0, 1, -1]])
IMAGE_1 = [[2, -2, 1, -1], [1, -1, 2, -2], [1, -1, 1, -1], [-1, 1, 0, 0], [0, 0, -1, 1]]
IMAGE_2 = [[2, -2, 1, -1], [1, -1, 2, -2], [-1, 1, -1, 1], [-1, 1, 0, 0], [0, 0, -1, 1]]


def _hand_stream() -> torch.Tensor:
    cls = [0.0, 0, 0, 0]
    return torch.tensor([[cls, *IMAGE_1], [cls, *IMAGE_2]], dtype=torch.float32)


def test_sum_buckets_norms_and_sum_all_sinks_on_a_hand_built_case():
    diag = TokenDiagnostics(HandBuiltTower(), TEXT_2, [0], rho=0.4, sinks=[SINK_DEFINITIONS["sum-all"]])
    diag.update(_cache(_hand_stream()))
    tables = diag.tables()
    norms = tables["norms"].set_index("bucket")
    # m = 0: T4, T5 of image 1 and T3', T4, T5 of image 2; m = 1: T1, T2 of image 1; m = 2: T3, then T1, T2
    assert norms["count"].tolist() == [5, 2, 3]
    r2, r10 = 2 ** 0.5, 10 ** 0.5
    assert norms.loc[0, "mean"] == pytest.approx((r2 + r2 + 2 + r2 + r2) / 5)
    assert norms.loc[1, "mean"] == pytest.approx(r10)
    assert norms.loc[2, "mean"] == pytest.approx((2 + r10 + r10) / 3)
    sinks = tables["sinks"].iloc[0]
    assert sinks["images"] == 2 and sinks["mean_count"] == pytest.approx(1.5)  # 1 sink in image 1, 2 in image 2
    assert sinks["std_count"] == pytest.approx(0.5)


def test_head_and_tail_cuts_on_a_hand_built_case():
    # ATHA's class vectors with gain 1, bias 0, P = I are the text vectors: max cosines per token
    # image 1: .894 .894 .707 0 0; image 2: .894 .894 -.707 0 0. rho_head 0.6: the 3rd largest
    # (.707 and 0); rho_tail 0.2: the smallest (0 and -.707).
    diag = TokenDiagnostics(HandBuiltTower(), TEXT_2, [0], rho_head=0.6, rho_tail=0.2, sinks=[])
    diag.update(_cache(_hand_stream()))
    table = diag.tables()["head_tail"]
    assert table["head_cut"].iloc[0] == pytest.approx((0.7071 + 0.0) / 2, abs=1e-4)
    assert table["tail_cut"].iloc[0] == pytest.approx((0.0 + -0.7071) / 2, abs=1e-4)
    assert table["count"].sum() == 10
    counts = dict(zip(table["bin_left"].round(2), table["count"]))
    assert counts[0.85] == 4 and counts[0.7] == 1 and counts[0.0] == 4 and counts[-0.75] == 1  # bins of width 0.05


def test_streaming_two_batches_equals_one_batch_of_both(bundle):
    x = torch.randn(6, 17, 64, generator=torch.Generator().manual_seed(3))
    pattern = torch.softmax(torch.randn(6, 2, 17, 17, generator=torch.Generator().manual_seed(4)), dim=-1)
    text = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    whole = TokenDiagnostics(bundle.model.visual, text, [0])
    parts = TokenDiagnostics(bundle.model.visual, text, [0])
    whole.update(_cache(x, pattern))
    parts.update(_cache(x[:2], pattern[:2]))
    parts.update(_cache(x[2:], pattern[2:]))
    for name, table in whole.tables().items():
        pd.testing.assert_frame_equal(table, parts.tables()[name], check_exact=False, rtol=1e-6)


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
