"""ViT-B/16 at real size on the CPU, with random weights: 224 px, 196 patch tokens, 12 blocks.

One coop+lora training step with ATHA (every block, alpha at block 6) and one with TIR (before
blocks 8 and 10), then one pass of every diagnostic over a few images: the papers' shapes and
block indices, which the small models of the other tests cannot show.
"""

from __future__ import annotations

import pytest
import torch

from analysis.config import AnalysisConfig

pytestmark = pytest.mark.slow

NAMES = ["class one", "class two", "class three", "class four", "class five"]


@pytest.fixture(scope="module")
def vit_b16():
    from cdfsl_core.models import load_clip

    torch.manual_seed(0)
    return load_clip("ViT-B-16")


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_the_papers_shapes_and_blocks(vit_b16):
    from cdfsl_core.interventions import TIR
    from cdfsl_core.methods import create_method

    visual = vit_b16.model.visual
    assert len(visual.transformer.resblocks) == 12 and visual.transformer.width == 768 and visual.output_dim == 512
    assert TIR().blocks(12) == [8, 10]
    atha = create_method(vit_b16, NAMES, "coop+lora", "atha").intervention
    assert atha.blocks(12) == list(range(12)) and atha.alpha.tolist()[6] == pytest.approx(0.8)


@pytest.mark.parametrize("intervention", ["atha", "tir"])
def test_one_training_step_at_real_size(vit_b16, images, intervention):
    from cdfsl_core.config import TrainConfig
    from cdfsl_core.episode_loop import train_episode
    from cdfsl_core.methods import create_method

    method = create_method(vit_b16, NAMES, "coop+lora", intervention, logit_scale=2.0)
    before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    seen = []
    hook = vit_b16.model.visual.transformer.resblocks[8].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        result = train_episode(method, images, torch.arange(5), TrainConfig(steps=1))
    finally:
        hook.remove()
    assert seen[0] == (5, 197, 768)  # CLS + 196 patch tokens entering block 8
    assert result["steps"] == 1 and result["loss_first"] == result["loss_first"]  # finite
    moved = [n for n, p in method.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and "prompts.context" in moved
    if intervention == "atha":
        assert "intervention.alpha" in moved and "intervention.beta" in moved


def test_every_diagnostic_at_real_size(vit_b16, images):
    from analysis.run_diagnostics import diagnose_model
    from cdfsl_core.methods import create_method

    method = create_method(vit_b16, NAMES, "coop+lora", "tir").eval()
    tables = diagnose_model(method, images[:2], torch.tensor([0, 1]), {"model": "vit-b16"}, AnalysisConfig(attribution_steps=2))
    assert set(tables["norms"]["layer"]) == set(range(12))
    assert tables["norms"].groupby("layer")["count"].sum().eq(2 * 196).all()
    assert tables["sinks"]["images"].eq(2).all()
    attention = tables["attention"]
    assert attention["row"].max() == 13 and attention["head"].nunique() == 12  # a 14 x 14 grid, 12 heads


def test_token_maps_and_a_trajectory_at_real_size(vit_b16, images):
    from analysis import figures as fig
    from analysis.diagnostics import measure_tokens
    from analysis.token_maps import display_images, token_maps
    from analysis.trajectory import TokenProbe, compact
    from cdfsl_core.config import TrainConfig
    from cdfsl_core.episode_loop import train_episode
    from cdfsl_core.methods import create_method

    method = create_method(vit_b16, NAMES, "coop+lora", "tir", logit_scale=2.0)
    table = token_maps(method, images[:2], layers=[8, 11])
    assert table["row"].max() == 13 and table["col"].max() == 13  # 14 x 14 patches, CLS excluded
    assert len(table[(table["quantity"] == "norm")]) == 2 * 2 * 196
    edits = table[table["quantity"] == "edit"].groupby("block")["value"].max()
    assert edits[8] > 0 and edits[11] == 0  # TIR acts before block 8, not 11
    figure = fig.token_maps(table, display_images(images[:2], vit_b16), block=8, quantities=("sum_score", "edit"))
    assert sum(1 for ax in figure.axes if ax.images) == 2 * 3
    probe = TokenProbe(method, images, torch.arange(5), None, AnalysisConfig(attribution_steps=1))
    points = []
    train_episode(method, images, torch.arange(5), TrainConfig(steps=2, trajectory_steps=(0, 2)), "fp32",
                  lambda step: points.append((step, probe(step))))
    assert [step for step, _ in points] == [0, 2]
    first = points[0][1]
    assert first["blocks"] == list(range(12)) and len(first["norm_count"][0]) == 6  # buckets m = 0..5
    assert sum(first["norm_count"][11]) == 5 * 196
    method.eval()  # the probe after the last step = the diagnostics of the trained model
    assert compact(measure_tokens(method, images).tables())["sinks"] == points[1][1]["sinks"]


def test_the_causal_tools_at_real_size(vit_b16, images):
    from analysis.causal import ablation_effects, logit_attribution, patched_logits
    from cdfsl_core.methods import create_method

    labels = torch.arange(5)
    a = create_method(vit_b16, NAMES, "zeroshot", "none").eval()
    b = create_method(vit_b16, NAMES, "coop+lora", "tir", logit_scale=2.0)
    with torch.no_grad():
        for name, p in b.lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        b.eval()
        logits_b = b(images)
        assert torch.allclose(patched_logits(a, b, images, [11], "all", text=True), logits_b, atol=1e-4)
    table = logit_attribution(b, images, labels)
    assert set(table[table["component"] == "attention"]["head"]) == set(range(12))  # 12 heads of width 64
    summed = table.groupby(["image", "class"])["value"].sum().unstack().to_numpy()
    assert abs(summed - logits_b.numpy()).max() < 1e-3
    effects = ablation_effects(a, images, labels, 8, sets=("head", "tail"), how="mean")
    assert set(effects["tokens"]) == {float(int(0.3 * 196)), float(int(0.2 * 196))}  # ATHA's fractions of 196 patches
