"""One real-size model per tower family, random weights, offline (slow): PE-Core-B-16 and EVA02-B-16
(CLIP's tokenizer, everything), ViT-B-16-SigLIP2 (its tokenizer needs hub files: refused with a
message, its vision side without one) and timm's vit_small_patch14_reg4_dinov2 (vision only).

Checks per family: the block inputs equal the tower's own intermediates, the recomputed attention
equals the tower's own (rotary embeddings for EVA/PE), the planted high-norm patch token is found
at its patch index with the registers excluded, and for the CLIP families LoRA with B = 0 leaves
the logits unchanged, one coop+lora step with ATHA and with TIR changes them, the 12 methods
forward, the attention-sink control is found, and every diagnostic and causal tool runs (direct
logit attribution where the image feature is the CLS token's read-out: EVA02, not PE-Core's
attention-pooling head). DINOv2 also runs the vision-only command."""

from __future__ import annotations

import pytest
import torch

from analysis.config import AnalysisConfig
from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from cdfsl_core.errors import ConfigError
from cdfsl_core.methods import create_method
from cdfsl_core.models import NoTokenizer, load_clip
from cdfsl_core.towers import vision_tower

pytestmark = pytest.mark.slow
NAMES = ["striped red shape", "dotted blue shape", "plain green shape"]


def _check_tower(module, size: int, expected_prefix: int) -> None:
    """Block inputs against forward_intermediates, attention against the tower's unfused path."""
    tower = vision_tower(module)
    assert tower.n_prefix == expected_prefix
    trunk = getattr(module, "trunk", module)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    seen, extras = [], []

    def hook(m, args, kwargs):
        seen.append(tower.block_input(args, kwargs).detach().clone())
        extras.append({k: v for k, v in kwargs.items() if k != tower.input_keyword})

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            outputs = trunk.forward_intermediates(images, norm=False, output_fmt="NLC", intermediates_only=False,
                                                  return_prefix_tokens=True)[1]
    finally:
        for h in handles:
            h.remove()
    # (tokens, prefix tokens) per block; a tower without prefix tokens gives the tokens alone
    outputs = [o if torch.is_tensor(o) else torch.cat([o[1], o[0]], dim=1) for o in outputs]
    for i in (1, len(seen) // 2, len(seen) - 1):
        torch.testing.assert_close(seen[i], outputs[i - 1], atol=1e-4, rtol=1e-4)
    block = tower.blocks[len(seen) // 2]
    attn = block.attn
    captured = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        with torch.no_grad():
            attn(block.norm1(seen[len(seen) // 2]), **extras[len(seen) // 2])
    finally:
        handle.remove()
        attn.fused_attn = True
    ours = tower.attention_probs(block, seen[len(seen) // 2], extras[len(seen) // 2])
    torch.testing.assert_close(ours, captured[0], atol=1e-5, rtol=1e-4)


def _check_clip(bundle, prefix: int) -> None:
    visual = bundle.model.visual
    size = visual.trunk.patch_embed.img_size[0]
    _check_tower(visual, size, prefix)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        zero_shot = create_method(bundle, NAMES, "zeroshot", "none").eval()(images)
        lora = create_method(bundle, NAMES, "lora", "none").eval()(images)
    torch.testing.assert_close(lora, zero_shot, atol=1e-4, rtol=1e-4)
    for intervention in ("atha", "tir"):
        method = create_method(bundle, NAMES, "coop+lora", intervention)
        with torch.no_grad():
            before = method.eval()(images)
        method.train()
        loss = torch.nn.functional.cross_entropy(method(images), torch.tensor([0, 1, 2]))
        loss.backward()
        torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2).step()
        with torch.no_grad():
            after = method.eval()(images)
        assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-5
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    _, readout = method.text_features(readout=True)
    layer = vision_tower(method).n_blocks // 2
    diagnostics = TokenDiagnostics(vision_tower(method), readout, [layer], sinks=AnalysisConfig().sinks())
    with torch.no_grad(), planted(method, [Plant("high-norm", layer=layer, token=7)]), \
            record(method, layers=[layer]) as cache:
        method.encode_image(images, readout)
    found = diagnostics.sink_masks(cache)[layer]["high-norm"]
    assert found[:, 7].all()
    _check_everything_runs(bundle, images)


def _check_everything_runs(bundle, images) -> None:
    """The 12 methods forward; the attention-sink control is found through the family's own keys;
    every diagnostic table, token maps, ablation and patching run; direct logit attribution adds
    up to the logits where the feature is the CLS token's read-out, and says why not elsewhere."""
    from analysis.causal import ablation_effects, logit_attribution, patch_effects
    from analysis.run_diagnostics import diagnose_model
    from cdfsl_core.methods import ADAPTATIONS, INTERVENTIONS

    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        for adaptation in ADAPTATIONS:
            for intervention in INTERVENTIONS:
                logits = create_method(bundle, NAMES, adaptation, intervention).eval()(images)
                assert logits.shape == (3, 3) and torch.isfinite(logits).all(), (adaptation, intervention)
    method = create_method(bundle, NAMES, "zeroshot", "tir").eval()
    tower = vision_tower(method)
    _, readout = method.text_features(readout=True)
    layer = tower.n_blocks // 2
    diagnostics = TokenDiagnostics(tower, readout, [layer], sinks=AnalysisConfig().sinks())
    with torch.no_grad(), planted(method, [Plant("attention-sink", layer=layer, token=11)]), \
            record(method, layers=[layer]) as cache:
        method.encode_image(images, readout)
    assert diagnostics.sink_masks(cache)[layer]["attention-mass"][:, 11].all()
    tables = diagnose_model(method, images, labels, {"model": "m"}, AnalysisConfig(attribution_steps=2,
                                                                                token_map_images=1))
    assert {"norms", "sinks", "head_tail", "attention", "rollout", "attribution", "token_maps"} <= set(tables)
    effects = ablation_effects(method, images, labels, block=layer, sets=("head",))
    assert set(effects["variant"]) == {"set", "control"}
    assert len(patch_effects(create_method(bundle, NAMES, "zeroshot", "none").eval(), method, images, labels,
                             blocks=[layer])) > 0
    if tower.pools_cls:
        table = logit_attribution(method, images, labels)
        with torch.no_grad():
            logits = method(images).numpy()
        assert abs(table.groupby(["image", "class"])["value"].sum().unstack().to_numpy() - logits).max() < 1e-3
    else:
        with pytest.raises(ConfigError, match="pools its image feature otherwise"):
            logit_attribution(method, images, labels)


def test_pe_core_b16():
    _check_clip(load_clip("PE-Core-B-16"), prefix=1)


def test_eva02_b16():
    _check_clip(load_clip("EVA02-B-16"), prefix=1)


def test_siglip2_asks_for_its_tokenizer_and_runs_its_vision_side_without_one(tmp_path):
    with pytest.raises(ConfigError, match="Hugging Face tokenizer 'timm/ViT-B-16-SigLIP2'.*--tokenizer PATH"):
        load_clip("ViT-B-16-SigLIP2")
    with pytest.raises(ConfigError, match="tokenizer folder .* does not exist"):
        load_clip("ViT-B-16-SigLIP2", tokenizer=tmp_path / "missing")
    bundle = load_clip("ViT-B-16-SigLIP2", tokenizer="none")
    assert isinstance(bundle.tokenizer, NoTokenizer)
    with pytest.raises(ConfigError, match="loaded without a tokenizer"):
        create_method(bundle, NAMES, "zeroshot", "none")
    _check_tower(bundle.model.visual, 224, expected_prefix=0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = vision_tower(bundle.model).readout(torch.randn(2, 196, 768))  # per-token read-out through the MAP head
        pooled = bundle.model.encode_image(images)
    assert tokens.shape == (2, 196, pooled.shape[-1])


def _word_tokenizer_folder(folder):
    """A Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json) of a few words, EOS
    appended: the kind of folder --tokenizer takes, made offline with the tokenizers library."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "<eos>", "<unk>", "a", "photo", "of", "striped", "red", "shape", "dotted", "blue", "plain",
             "green"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}))
    return folder


def test_siglip2_runs_the_methods_and_diagnostics_with_a_tokenizer_folder(tmp_path):
    """With a tokenizer folder (here a hand-made one: the real one needs hub files) SigLIP2 runs the
    12 methods, a coop+lora step with ATHA and with TIR changes its logits, and the diagnostics run;
    without a CLS token the attention tables are named in ``skipped`` and direct logit attribution
    says why it stops."""
    from analysis.causal import logit_attribution
    from analysis.run_diagnostics import diagnose_model
    from cdfsl_core.methods import ADAPTATIONS, INTERVENTIONS

    bundle = load_clip("ViT-B-16-SigLIP2", tokenizer=_word_tokenizer_folder(tmp_path / "tokenizer"))
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        zero_shot = create_method(bundle, NAMES, "zeroshot", "none").eval()(images)
        torch.testing.assert_close(create_method(bundle, NAMES, "lora", "none").eval()(images), zero_shot,
                                   atol=1e-4, rtol=1e-4)
        for adaptation in ADAPTATIONS:
            for intervention in INTERVENTIONS:
                logits = create_method(bundle, NAMES, adaptation, intervention).eval()(images)
                assert torch.isfinite(logits).all(), (adaptation, intervention)
    for intervention in ("atha", "tir"):
        method = create_method(bundle, NAMES, "coop+lora", intervention)
        with torch.no_grad():
            before = method.eval()(images)
        method.train()
        torch.nn.functional.cross_entropy(method(images), labels).backward()
        torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2).step()
        with torch.no_grad():
            assert (method.eval()(images) - before).abs().max() > 1e-5
    method = create_method(bundle, NAMES, "zeroshot", "tir").eval()
    tables = diagnose_model(method, images, labels, {"model": "siglip2"},
                            AnalysisConfig(attribution_steps=2, token_map_images=1, attention_source="mean"))
    assert {"attention", "rollout"} <= set(tables["skipped"]["quantity"])
    assert tables["sinks"]["images"].eq(3).all() and "head_tail" in tables
    with pytest.raises(ConfigError, match="pools its image feature otherwise"):
        logit_attribution(method, images, labels)


def test_dinov2_with_registers_vision_only():
    import timm

    trunk = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).eval()
    tower = vision_tower(trunk)
    assert (tower.n_prefix, tower.n_registers, tower.has_cls) == (5, 4, True)
    _check_tower(trunk, trunk.patch_embed.img_size[0], expected_prefix=5)


def test_dinov2_through_the_vision_only_command(tmp_path):
    from analysis.run_vision import main

    out = tmp_path / "dino"
    assert main(["vit_small_patch14_reg4_dinov2", "--image-size", "224", "--images", "4", "--out", str(out)]) == 0
    import pandas as pd

    registers = pd.read_csv(out / "registers.csv")
    assert sorted(registers["register"].unique()) == [0, 1, 2, 3] and registers["block"].nunique() == 12
    maps = pd.read_csv(out / "token_maps.csv")
    assert maps["token"].max() == 16 * 16 - 1  # 224 / 14: the four registers and CLS are not map tokens


def test_the_commands_take_an_eva02_model_name(tmp_path, monkeypatch):
    """``finetune --model EVA02-B-16`` trains an episode and ``run_diagnostics`` writes every table
    for it: the commands reach other towers by name."""
    import pandas as pd

    from analysis.run_diagnostics import main as diagnostics_main
    from cdfsl_core.finetune import main as finetune_main

    monkeypatch.chdir(tmp_path)  # the default episode file is written beside the run
    run = tmp_path / "eva"
    assert finetune_main(["--dataset", "synthetic-crops", "--model", "EVA02-B-16", "--pretrained", "none",
                          "--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "1", "--steps", "2",
                          "--lora-rank", "2", "--device", "cpu", "--intervention", "tir",
                          "--out", str(run)]) == 0
    assert diagnostics_main([str(run), "--out", str(tmp_path / "d"), "--attribution-steps", "2",
                             "--token-map-images", "1"]) == 0
    sinks = pd.read_csv(tmp_path / "d" / "sinks.csv")
    assert set(sinks["model"]) == {"pretrained", "fine-tuned coop+lora/tir"} and sinks["layer"].nunique() == 12
    assert (tmp_path / "d" / "token_maps.csv").exists() and (tmp_path / "d" / "attribution.csv").exists()


@pytest.mark.slow
def test_finetune_uses_the_tokenizer_folder_it_is_given(tmp_path):
    """``finetune --tokenizer FOLDER`` reaches the model loader of the run (it was dropped there, so
    a SigLIP2 run asked for the hub's tokenizer after its folder was written)."""
    from cdfsl_core.finetune import main
    from cdfsl_core.run_folder import RunFolder

    folder = _word_tokenizer_folder(tmp_path / "tokenizer")
    out = tmp_path / "run"
    assert main(["--model", "ViT-B-16-SigLIP2", "--pretrained", "none", "--tokenizer", str(folder), "--dataset",
                 "synthetic-crops", "--ways", "2", "--shots", "1", "--queries", "1", "--episodes", "1", "--steps", "1",
                 "--device", "cpu", "--episode-file", str(tmp_path / "ep.json"), "--out", str(out)]) == 0
    rows, _ = RunFolder(out).lines()
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert RunFolder(out).config_dict()["model"]["tokenizer"] == str(folder)
