"""The model-organism statistics (analysis.organism), register tokens and pretraining checkpoints:
each statistic against a hand-computed case or a brute-force formula, and a planted high-norm token
on a flat patch found end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.organism import (
    Sample,
    checkpoints_of,
    high_norm_tokens,
    low_information_patches,
    main,
    massive_ratio,
    mean_pairwise_cosine,
    measure_model,
    simple_token_count,
    summary,
)
from cdfsl_core.errors import ConfigError
from cdfsl_core.models import load_clip
from cdfsl_core.registers import RegisterVisionTransformer, add_registers, registers_in_name
from cdfsl_core.towers import vision_tower


def test_mean_pairwise_cosine_by_hand():
    # pairs: (e1, e2) 0, (e1, e1+e2) 1/sqrt2, (e2, e1+e2) 1/sqrt2
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_cosine(features) == pytest.approx(2 / math.sqrt(2) / 3)
    with pytest.raises(ConfigError):
        mean_pairwise_cosine(features[:1])


def test_low_information_patches_are_the_flat_ones():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 8, 8)
    image[0, :, :4, :4] = 0.3  # patch 0 (top left) flat
    image[0, :, 4:, 4:] *= 0.01  # patch 3 (bottom right) nearly flat
    low = low_information_patches(image, (2, 2))
    # spreads 0, ~1, ~1, ~0.01: the (lower) median is patch 3's, so only patch 0 is below it
    assert low.tolist() == [[True, False, False, False]]
    with pytest.raises(ConfigError, match="patch grid"):
        low_information_patches(image, (3, 3))


def test_high_norm_statistics_by_hand():
    norms = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 2.0, 2.0, 2.0]])  # medians (lower) 1 and 2
    low_info = torch.tensor([[False, False, False, True], [True, True, False, False]])
    attention = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    stats = high_norm_tokens(norms, 2.0, low_info, attention)
    assert stats.per_image == 0.5  # one token (5 > 2 x 1) in two images
    assert stats.max_over_median == pytest.approx((5 / 1 + 2 / 2) / 2)
    assert stats.low_info_share == 1.0
    assert stats.attention_ratio == pytest.approx(0.7 / 0.25)  # mean attention on a patch: 2 / 8
    none = high_norm_tokens(torch.ones(2, 4), 2.0, low_info, attention)
    assert none.per_image == 0 and math.isnan(none.low_info_share) and math.isnan(none.attention_ratio)


def test_massive_ratio_by_hand():
    patches = torch.ones(1, 4, 3)
    patches[0, 2, 1] = -50.0  # |activation| 50 against a median of 1
    assert massive_ratio(patches) == pytest.approx(50.0)


def test_simple_tokens_match_a_brute_force_count():
    torch.manual_seed(1)
    projected, text, rho = torch.randn(3, 20, 6), torch.randn(4, 6), 0.3
    k = int(rho * 20)
    expected = 0
    for b, j in itertools.product(range(3), range(20)):
        in_all = all(j in torch.nn.functional.cosine_similarity(projected[b], text[c].expand(20, 6), dim=-1)
                     .topk(k).indices.tolist() for c in range(4))
        expected += in_all
    assert simple_token_count(projected, text, rho) == pytest.approx(expected / 3)
    # a token aligned with every class is in every top set: the positive control
    planted = projected.clone()
    planted[:, 5] = 100 * torch.nn.functional.normalize(text, dim=-1).sum(0)
    assert simple_token_count(planted, text, rho) >= 1


def test_register_tokens_sit_after_cls_and_are_not_patches():
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    tower = vision_tower(bundle.model)
    assert tower.n_registers == 0
    add_registers(bundle.model.visual, 3)
    assert isinstance(bundle.model.visual, RegisterVisionTransformer) and tower.n_registers == 3
    assert tower.n_prefix == 4
    visual = bundle.model.visual
    with torch.no_grad():
        visual.register_tokens.copy_(torch.arange(3 * 64, dtype=torch.float32).reshape(3, 64))
    seen = {}
    handle = tower.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = bundle.model.encode_image(images)
    handle.remove()
    x = seen["x"]  # [B, 1 + 3 + 16, width], after ln_pre
    assert x.shape[1] == 1 + 3 + 16
    expected = visual.ln_pre(visual.register_tokens)  # no positional embedding on registers
    assert torch.allclose(tower.registers(x)[0], expected, atol=1e-5)
    assert tower.patches(x).shape[1] == 16
    # the pooled feature is the CLS token's read-out, whatever the registers hold
    assert pooled.shape == (2, 32)
    assert registers_in_name("cdfsl-synth-vit-l8-reg4") == 4 and registers_in_name("cdfsl-synth-vit-l8") == 0


def test_pretraining_saves_checkpoints_and_register_weights_reload(tmp_path):
    from cdfsl_core.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(arch="cdfsl-synth-vit-l8-reg4", steps=3, images_per_class=1, batch_size=4, warmup=1,
                            checkpoint_every=2, threads=1)
    weights = pretrain(config, tmp_path)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_00000.safetensors", "step_00002.safetensors", "step_00003.safetensors"]
    recorded = json.loads((tmp_path / "pretrain_config.json").read_text())
    assert recorded["finished"] is True and recorded["checkpoint_every"] == 2
    reloaded = load_clip(config.arch, weights)
    assert reloaded.model.visual.n_registers == 4
    from safetensors.torch import load_file

    saved = load_file(str(weights))["visual.register_tokens"].float()
    assert torch.allclose(reloaded.model.visual.register_tokens, saved)
    first = load_clip(config.arch, tmp_path / "checkpoints" / "step_00000.safetensors")
    assert not torch.allclose(first.model.visual.register_tokens, saved)  # trained between the two
    with pytest.raises(Exception, match="do not fit"):  # register weights in a tower without registers
        load_clip("cdfsl-synth-vit-l8", weights)
    listed = checkpoints_of(f"reg:{tmp_path}")
    assert [c.step for c in listed] == [0, 2, 3] and {c.run for c in listed} == {"reg"}


def test_checkpoints_of_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="pretrain_config.json"):
        checkpoints_of(str(tmp_path))
    (tmp_path / "pretrain_config.json").write_text('{"arch": "cdfsl-test-vit"}')
    with pytest.raises(ConfigError, match="checkpoint-every"):
        checkpoints_of(str(tmp_path))
    one = checkpoints_of("old:cdfsl-synth-vit=synthetic")
    assert one[0].run == "old" and one[0].weights == "synthetic" and one[0].step is None


def _flat_patch_sample(n_images: int = 4) -> Sample:
    torch.manual_seed(2)
    images = torch.randn(n_images, 3, 32, 32)
    images[:, :, :8, :8] = 0.0  # patch 0 is flat: a low-information patch
    classes = [f"class {c}" for c in range(5)]
    return Sample("synthetic", classes, [list(range(5))], [images])


def test_a_planted_high_norm_token_on_a_flat_patch_is_found_end_to_end():
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    add_registers(bundle.model.visual, 2)
    tower = vision_tower(bundle.model)
    last = tower.blocks[-1]

    def plant(module, args, output):
        output = output.clone()
        output[:, tower.n_prefix] *= 20  # patch 0's token after the last block
        return output

    sample = _flat_patch_sample()
    clean = measure_model(bundle.model, bundle.tokenizer, [sample], None, None)
    handle = last.register_forward_hook(plant)
    try:
        planted = measure_model(bundle.model, bundle.tokenizer, [sample], None, None)
    finally:
        handle.remove()

    def value(rows, statistic, block):
        return next(r["value"] for r in rows if r["statistic"] == statistic and r["block"] == block)

    final = tower.n_blocks - 1
    assert value(clean, "high_norm", final) < 1
    assert value(planted, "high_norm", final) >= 1
    assert value(planted, "high_norm_low_info", final) >= 1 / value(planted, "high_norm", final) - 1e-9
    assert value(planted, "max_over_median", final) > 10
    assert value(planted, "register_norm", 0) == pytest.approx(value(clean, "register_norm", 0))
    assert 0 < value(clean, "register_attention", 0)
    assert value(clean, "simple_tokens_chance", 0) == pytest.approx(0.3**5 * 16)
    texts = [r for r in clean if r["statistic"] == "text_cosine"]
    assert len(texts) == 1 and -1 <= texts[0]["value"] <= 1


def test_summary_reads_simple_tokens_at_tirs_blocks():
    import pandas as pd

    rows = [{"run": "r", "step": 0, "domain": "d", "block": b, "statistic": s, "value": float(b)}
            for b in range(8) for s in ("simple_tokens", "high_norm")]
    reduced = summary(pd.DataFrame(rows)).set_index("statistic")["value"]
    # 8 blocks: TIR edits the inputs of blocks 5 and 7, the outputs of blocks 4 and 6
    assert reduced["simple_tokens"] == pytest.approx((4 + 6) / 2)
    assert reduced["high_norm"] == 7  # the block where it is largest


@pytest.mark.slow
def test_the_command_measures_a_run_and_draws_the_emergence(tmp_path):
    from cdfsl_core.pretrain import PretrainConfig, pretrain

    run = tmp_path / "run"
    pretrain(PretrainConfig(arch="cdfsl-synth-vit-l8-reg4", steps=2, images_per_class=1, batch_size=4, warmup=1,
                            checkpoint_every=1, threads=1), run)
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out), "--subsets", "1", "--per-class", "1",
                 "--domains", "synthetic", "synthetic-crops"]) == 0
    import pandas as pd

    table = pd.read_csv(out / "organism.csv")
    assert sorted(table["step"].unique()) == [0, 1, 2]
    assert set(table["domain"]) == {"synthetic", "synthetic-crops"}
    assert {"zero_shot", "register_norm", "simple_tokens"} <= set(table["statistic"])
    assert (out / "emergence.png").stat().st_size > 0


def _trajectory_rows(method: str, episode: int, step: int, sum_all: float, accuracy: float,
                     alpha: list[float] | None = None) -> list[dict]:
    rows = [{"method": method, "domain": "d", "shots": 1, "episode": episode, "step": step, "statistic": "accuracy",
             "block": None, "value": accuracy}]
    for block in range(8):  # TIR's blocks on 8 blocks read the outputs of blocks 4 and 6
        value = sum_all if block in (4, 6) else 100.0  # other blocks must not enter
        rows.append({"method": method, "domain": "d", "shots": 1, "episode": episode, "step": step,
                     "statistic": "sinks:sum-all", "block": block, "value": value})
        if alpha is not None:
            rows.append({"method": method, "domain": "d", "shots": 1, "episode": episode, "step": step,
                         "statistic": "alpha", "block": block, "value": alpha[block]})
    return rows


def test_finetune_effects_are_paired_differences_by_hand():
    import pandas as pd

    from analysis.organism import finetune_effects

    rows = []
    for episode, (pre, base, tir, acc_base, acc_atha) in enumerate([(1.0, 3.0, 0.5, 0.6, 0.7), (2.0, 2.0, 1.0, 0.5, 0.8)]):
        rows += _trajectory_rows("coop+lora/none", episode, 0, pre, 0.4)
        rows += _trajectory_rows("coop+lora/none", episode, 60, base, acc_base)
        rows += _trajectory_rows("coop+lora/tir", episode, 0, pre, 0.4)
        rows += _trajectory_rows("coop+lora/tir", episode, 60, tir, 0.55)
        start = [0.0] * 8
        start[4] = 0.8  # alpha starts at block n // 2
        end = list(start)
        end[4] = 0.8 + 0.1 * (episode + 1)
        rows += _trajectory_rows("coop+lora/atha", episode, 0, pre, 0.4, alpha=start)
        rows += _trajectory_rows("coop+lora/atha", episode, 60, base, acc_atha, alpha=end)
    effects = finetune_effects(pd.DataFrame(rows)).set_index(["comparison", "statistic"])
    # coop+lora minus pretrained: simple tokens +2 and 0, mean 1, population std 1, CI 1.96 / sqrt(2)
    assert effects.loc[("coop+lora - pretrained", "sinks:sum-all"), "mean"] == pytest.approx(1.0)
    assert effects.loc[("coop+lora - pretrained", "sinks:sum-all"), "ci95"] == pytest.approx(1.96 / 2**0.5)
    assert effects.loc[("coop+lora - pretrained", "accuracy"), "mean"] == pytest.approx((0.2 + 0.1) / 2)
    assert effects.loc[("tir - coop+lora", "sinks:sum-all"), "mean"] == pytest.approx((-2.5 - 1.0) / 2)
    assert effects.loc[("atha - coop+lora", "accuracy"), "mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert effects.loc[("atha learned", "alpha"), "mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert set(effects["episodes"]) == {2}


@pytest.mark.slow
def test_finetune_effects_from_real_runs(tmp_path):
    from dataclasses import replace

    from helpers import TINY

    from cdfsl_core.config import MethodConfig
    from cdfsl_core.runner import run

    folders = []
    for intervention in ("none", "atha"):
        config = replace(TINY, train=replace(TINY.train, trajectory_steps=(0, 2)),
                         method=MethodConfig(adaptation="coop+lora", intervention=intervention))
        folder = tmp_path / intervention
        run(config, folder, progress=False)
        folders.append(str(folder))
    out = tmp_path / "out"
    assert main(["--finetune", *folders, "--out", str(out)]) == 0
    import pandas as pd

    effects = pd.read_csv(out / "finetune_effects.csv")
    assert {"coop+lora - pretrained", "atha - coop+lora", "atha learned"} <= set(effects["comparison"])
    episodes = len(_finished(folders[0]))
    assert (effects["episodes"] == episodes).all()


def _finished(folder: str) -> dict:
    from cdfsl_core.run_folder import RunFolder

    return RunFolder(folder).finished()


def test_the_emergence_figure_draws_every_run_and_domain_with_its_chance_lines():
    import pandas as pd

    from analysis.figures import organism_emergence

    rows = [{"run": run, "step": step, "domain": domain, "statistic": statistic, "value": step / 1000 + offset}
            for offset, run in enumerate(["l8", "l8-reg4"]) for step in (0, 500, 1000)
            for domain in ("synthetic", "synthetic-crops")
            for statistic in ("zero_shot", "simple_tokens", "simple_tokens_chance", "high_norm_low_info")]
    figure = organism_emergence(pd.DataFrame(rows))
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible() and ax.axison]
    assert titles == ["zero shot", "high norm low info", "simple tokens"]
    panel = {ax.get_title(): ax for ax in figure.axes}
    simple = panel["simple tokens"]
    drawn = [line for line in simple.get_lines() if len(line.get_xdata()) == 3]
    assert len(drawn) == 4  # 2 runs x 2 domains
    chance = [line for line in simple.get_lines() if line.get_linestyle() == "--"]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(0.0)  # l8's chance row at step 0
    assert [line for line in panel["high norm low info"].get_lines() if line.get_linestyle() == "--"][0].get_ydata()[0] == 0.5


def test_gaussian_null_matches_the_known_values_of_structureless_data():
    from analysis.organism import gaussian_null

    generator = torch.Generator().manual_seed(0)
    null = gaussian_null((200, 64, 128), 2.0, 5, 0.3, 64, generator)
    # 64 x 128 standard normal values: max/median |x| about 5.9 (5-95%: 5.2-6.6); chi(128) norms of
    # 64 tokens: the largest about 1.15 x the median; no token twice the median
    assert 5.2 < null["massive"] < 6.6
    assert 1.10 < null["max_over_median"] < 1.22
    assert null["high_norm"] == 0.0
    assert null["simple_tokens"] == pytest.approx(0.3**5 * 64)
    assert abs(null["text_cosine"]) < 0.1


def test_init_column_is_the_step_zero_value_of_the_same_run():
    from analysis.organism import with_init

    table = pd.DataFrame({"run": ["a", "a", "b", "b", "c"], "step": [0, 100, 0, 100, None],
                          "domain": ["s"] * 5, "block": [1.0] * 5, "statistic": ["massive"] * 5,
                          "value": [2.0, 5.0, 3.0, 4.0, 7.0]})
    result = with_init(table).set_index(["run", "step"], drop=False)
    assert result["init"].tolist()[:4] == [2.0, 2.0, 3.0, 3.0]
    assert np.isnan(result["init"].tolist()[4])  # ARCH=WEIGHTS: no step 0
