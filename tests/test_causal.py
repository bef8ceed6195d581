"""Causal tools: patching identities, logit attributions that add up (and a hand-built tower whose
contributions are known), and ablations checked against an empty set and a planted token the
read-out depends on, beside their random controls."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import embedded_images

from analysis.causal import (
    ablated,
    ablation_effects,
    logit_attribution,
    margins,
    patch_effects,
    patched_logits,
    random_like,
    summarize_effects,
    token_set,
)
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from cdfsl_core.errors import ConfigError
from cdfsl_core.methods import create_method
from cdfsl_core.models import load_clip

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checkered black shape"]


@pytest.fixture(scope="module")
def setting():
    bundle, images = embedded_images((0, 9, 20, 41, 50, 63))
    return bundle, images, torch.tensor([0, 1, 2, 3, 4, 0])


def _trained(bundle, intervention="none", seed=0):
    """A fine-tuned-looking method: LoRA's B drawn, so it differs from the pretrained model."""
    method = create_method(bundle, NAMES, "coop+lora", intervention)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        method.prompts.context.add_(0.05 * torch.randn(method.prompts.context.shape, generator=generator))
    return method.eval()


def test_patching_nothing_gives_a_everything_gives_b_and_a_into_a_changes_nothing(setting):
    bundle, images, _ = setting
    a = create_method(bundle, NAMES, "zeroshot", "none").eval()
    b = _trained(bundle, "tir")
    with torch.no_grad():
        logits_a, logits_b = a(images), b(images)
        assert torch.allclose(patched_logits(a, b, images), logits_a, atol=1e-5)
        assert torch.allclose(patched_logits(a, b, images, list(range(6)), "all", text=True), logits_b, atol=1e-5)
        assert torch.allclose(patched_logits(a, b, images, [5], "all", text=True), logits_b, atol=1e-5)
        assert torch.allclose(patched_logits(a, a, images, list(range(6)), "all", text=True), logits_a, atol=1e-5)
        # CLS and the patch tokens together are the whole block output
        cls_then_patches = patched_logits(a, b, images, [5], "cls", text=True)
        assert torch.allclose(cls_then_patches, logits_b, atol=1e-5)  # after the last block only CLS is read
        assert not torch.allclose(patched_logits(a, b, images, [5], "patches", text=True), logits_b, atol=1e-3)


def test_patch_effects_recover_all_at_the_last_block_with_the_text(setting):
    bundle, images, labels = setting
    a = create_method(bundle, NAMES, "zeroshot", "none").eval()
    b = _trained(bundle)
    table = patch_effects(a, b, images, labels, blocks=[2, 5], tokens=("all", "cls"), method="b")
    assert set(table["site"]) == {"block output", "text"} and (table["method"] == "b").all()
    gap = table["margin_b"].iloc[0] - table["margin_a"].iloc[0]
    assert abs(gap) > 1e-3
    for _, row in table.iterrows():
        assert row["recovered"] == pytest.approx((row["margin"] - row["margin_a"]) / gap)
    with torch.no_grad():
        both = margins(patched_logits(a, b, images, [5], "all", text=True), labels).mean()
    assert (float(both) - table["margin_a"].iloc[0]) / gap == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("adaptation, intervention", [("zeroshot", "none"), ("coop+lora", "atha"), ("coop+lora", "tir")])
def test_the_contributions_add_up_to_the_logits(setting, adaptation, intervention):
    bundle, images, labels = setting
    method = _trained(bundle, intervention) if adaptation != "zeroshot" else create_method(bundle, NAMES, "zeroshot", "none").eval()
    table = logit_attribution(method, images, labels)
    with torch.no_grad():
        logits = method(images).numpy()
    summed = table.groupby(["image", "class"])["value"].sum().unstack().to_numpy()
    assert abs(summed - logits).max() < 1e-4
    heads = table[table["component"] == "attention"]
    assert set(heads["head"]) == {0, 1, 2, 3} and set(heads["block"]) == set(range(6))  # width 128 / head width 32
    assert table[table["true_class"]]["class"].tolist()[:1] == [0]
    batch = logit_attribution(method, images, labels, scale="batch")
    residual = batch[batch["component"] == "residual"]["value"].abs()
    assert residual.max() > 1e-3  # one scale for all images does not add up: the gap is reported
    assert abs(batch.groupby(["image", "class"])["value"].sum().unstack().to_numpy() - logits).max() < 1e-4


def test_a_hand_built_tower_gives_its_known_contributions_back():
    bundle = load_clip("cdfsl-test-vit")  # random weights, 2 blocks, width 64, 2 heads
    method = create_method(bundle, ["a b", "c d", "e f"], "zeroshot", "none").eval()
    visual = bundle.model.visual
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            block.mlp.c_proj.weight.zero_()  # no MLP writes anything
            block.mlp.c_proj.bias.zero_()
        first = visual.transformer.resblocks[0].attn
        first.out_proj.weight[:, :32].zero_()  # block 0, head 0 writes nothing
        visual.transformer.resblocks[1].attn.out_proj.weight.zero_()  # block 1 writes only its bias
        table = logit_attribution(method, images)
        logits = method(images)
    mlp = table[table["component"] == "mlp"]["value"].abs().max()
    dead = table[(table["component"] == "attention") & (table["block"] == 0) & (table["head"] == 0)]["value"]
    silent = table[(table["component"] == "attention") & (table["block"] == 1)]["value"]
    alive = table[(table["component"] == "attention") & (table["block"] == 0) & (table["head"] == 1)]["value"]
    assert mlp < 1e-6 and dead.abs().max() < 1e-6 and silent.abs().max() < 1e-6
    assert alive.abs().max() > 1e-3
    # what is left is exactly the embedding, the two attention biases, block 0 head 1 and ln_post's bias
    kept = table[table["component"].isin(["embedding", "attention bias", "ln_post bias"]) | table.index.isin(alive.index)]
    summed = kept.groupby(["image", "class"])["value"].sum().unstack().to_numpy()
    assert abs(summed - logits.numpy()).max() < 1e-4
    with pytest.raises(ConfigError, match="scale"):
        logit_attribution(method, images, scale="layer")


def test_ablating_nothing_changes_nothing_and_controls_have_the_sets_size(setting):
    bundle, images, labels = setting
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    empty = torch.zeros(len(images), 64, dtype=torch.bool)
    with torch.no_grad():
        base = method(images)
        for how in ("zero", "mean", "resample"):
            with ablated(method, 3, empty, how):
                assert torch.equal(method(images), base)
    mask = torch.zeros(len(images), 64, dtype=torch.bool)
    mask[0, :5] = True
    mask[2, 10:12] = True
    control = random_like(mask, torch.Generator().manual_seed(0))
    assert control.sum(1).tolist() == mask.sum(1).tolist() and not torch.equal(control, mask)
    with pytest.raises(ConfigError, match="ablation"):
        with ablated(method, 3, mask, "noise"):
            pass


def test_token_sets_are_the_diagnostics_flags_of_the_block_before(setting):
    bundle, images, _ = setting
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    with torch.no_grad():
        _, readout = method.text_features(readout=True)
        diagnostics = TokenDiagnostics(method.model.visual, readout, [2])
        with record(method, layers=[2]) as cache:
            method.encode_image(images, readout)
        expected = diagnostics.sink_masks(cache)[2]
    for name, mask in expected.items():
        assert torch.equal(token_set(method, images, 3, f"sink:{name}"), mask.cpu())
    head, tail = token_set(method, images, 3, "head"), token_set(method, images, 3, "tail")
    assert (head.sum(1) == int(0.3 * 64)).all() and not (head & tail).any()
    with pytest.raises(ConfigError, match="token set"):
        token_set(method, images, 3, "sinks")
    with pytest.raises(ConfigError, match="ablation block 0"):
        token_set(method, images, 0, "head")


def _attended_token(method, images, block: int, token: int, strength: float = 10.0):
    """A hook planting, at the output of block - 1, a token whose key at ``block`` CLS's query attends
    to (the centred, unit-variance direction that maximises CLS's attention logit, so ``ln_1`` gives
    it exactly), at ``strength`` x the image's median patch norm: a high-norm token the read-out
    depends on."""
    blocks = method.model.visual.transformer.resblocks
    target = blocks[block]

    def hook(module, args, out):
        out = out.clone()
        with torch.no_grad():
            z = target.ln_1(out)
            width = z.shape[-1]
            w_q, w_k = target.attn.in_proj_weight[:width], target.attn.in_proj_weight[width:2 * width]
            b_q = target.attn.in_proj_bias[:width]
            query = z[:, 0] @ w_q.T + b_q  # [B, width]
            direction = (query @ w_k) * target.ln_1.weight  # d logit / d u for ln_1(x) = gamma u + beta
            u = direction - direction.mean(-1, keepdim=True)
            u = u / u.pow(2).mean(-1, keepdim=True).sqrt()
            median = out[:, 1:].norm(dim=-1).median(dim=-1).values
            out[:, 1 + token] = u * (strength * median / u.norm(dim=-1)).unsqueeze(-1)
        return out

    return blocks[block - 1].register_forward_hook(hook)


@pytest.mark.parametrize("how", ["zero", "mean", "resample"])
def test_ablating_a_token_the_read_out_depends_on_matters_and_its_control_much_less(setting, how):
    bundle, images, labels = setting
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    block, token = 5, 27
    handle = _attended_token(method, images, block, token)
    try:
        flagged = token_set(method, images, block, "sink:high-norm")
        assert flagged[:, token].all()  # the planted token is a high-norm sink entering the block
        mask = torch.zeros_like(flagged)
        mask[:, token] = True
        with torch.no_grad():
            base = method(images)
            with ablated(method, block, mask, how):
                changed = (method(images) - base).abs().mean()
            generator = torch.Generator().manual_seed(0)
            controls = []
            for _ in range(5):
                with ablated(method, block, random_like(mask, generator), how):
                    controls.append(float((method(images) - base).abs().mean()))
    finally:
        handle.remove()
    assert float(changed) > 5 * sum(controls) / len(controls)  # 5 random single tokens, on average


def test_ablation_effects_and_their_paired_summary(setting):
    bundle, images, labels = setting
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    table = ablation_effects(method, images, labels, 3, sets=("head", "bucket:0"), how="mean", model="pretrained",
                             episode=0)
    assert len(table) == 4 and set(table["variant"]) == {"set", "control"}
    assert (table["d_margin"] == table["margin"] - table["base_margin"]).all()
    sizes = table.pivot_table(index="set", columns="variant", values="tokens")
    assert (sizes["set"] == sizes["control"]).all()
    # the paired summary, by hand: set effects 1, 2, 3 and control effects 0, 0, 3 over three episodes
    rows = [{"model": "m", "set": "s", "block": 3, "ablation": "zero", "episode": e, "variant": v, "tokens": 1.0,
             "d_margin": d} for e, (a, c) in enumerate([(1.0, 0.0), (2.0, 0.0), (3.0, 3.0)])
            for v, d in (("set", a), ("control", c))]
    summary = summarize_effects(pd.DataFrame(rows)).iloc[0]
    assert summary["set_effect"] == pytest.approx(2.0) and summary["control_effect"] == pytest.approx(1.0)
    assert summary["set_minus_control"] == pytest.approx(1.0)
    # differences 1, 2, 0: population std sqrt(2/3), half-width 1.96 sqrt(2/3) / sqrt(3)
    assert summary["difference_ci95"] == pytest.approx(1.96 * (2 / 3) ** 0.5 / 3**0.5, rel=1e-6)


def test_the_command_on_a_run_writes_every_table_and_the_figures_draw_them(tmp_path, capsys):
    from helpers import TINY

    from analysis import figures
    from analysis.run_causal import attribution_summary, main
    from cdfsl_core.runner import run

    folder = tmp_path / "run"
    run(TINY, folder, progress=False, save_states=True)
    assert main([str(folder), "--episodes", "0", "1", "--block", "1", "--sets", "head", "tail", "--queries", "3"]) == 0
    printed = capsys.readouterr().out
    assert "set vs its random control" in printed and "share of the margin difference recovered" in printed
    tables = {name: pd.read_csv(folder / "causal" / f"{name}.csv")
              for name in ("ablation", "ablation_summary", "patching", "attribution")}
    assert set(tables["ablation"]["model"]) == {"pretrained", "fine-tuned coop+lora/tir"}
    assert set(tables["ablation"]["episode"]) == {0, 1} and (tables["ablation"]["queries"] == 3).all()
    summary = tables["ablation_summary"]
    assert set(summary["statistic"]) == {"d_margin", "d_accuracy"} and (summary["episodes"] == 2).all()
    patching = tables["patching"]
    assert set(patching["site"]) == {"block output", "text"} and set(patching["b"]) == {"fine-tuned coop+lora/tir"}
    attribution = tables["attribution"]
    assert {"embedding", "attention", "mlp", "ln_post bias"} <= set(attribution["component"])
    figure = figures.ablation_effects(summary)
    assert [ax.get_title() for ax in figure.axes] == ["pretrained", "fine-tuned coop+lora/tir"]
    assert len(figures.patching(patching).axes) == 1
    heat = figures.logit_attribution(attribution)
    assert heat.axes[0].get_images()[0].get_array().shape == (2, 2 + 1)  # 2 blocks x (2 heads + MLP)
    # the summary by hand for one component: the true class's contribution minus the mean of the others
    raw = pd.DataFrame({"image": [0, 0, 0, 1, 1, 1], "component": "mlp", "block": 0, "head": float("nan"),
                        "class": [0, 1, 2] * 2, "value": [3.0, 1.0, 2.0, 0.0, 4.0, 2.0],
                        "true_class": [True, False, False, False, True, False]})
    row = attribution_summary(raw).iloc[0]
    assert row["to_true"] == pytest.approx((3.0 + 4.0) / 2) and row["to_margin"] == pytest.approx(((3 - 1.5) + (4 - 1)) / 2)
