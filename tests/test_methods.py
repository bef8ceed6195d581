"""Methods: LoRA, CoOp, ATHA, TIR and their shared math, on tiny models with analytic inputs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from cdfsl_core.errors import ConfigError
from cdfsl_core.interventions import ATHA, TIR, ATHAConfig, TIRConfig
from cdfsl_core.lora import LoRAAdapters, LoRAAttention, LoRAConfig
from cdfsl_core.methods import create_method, list_methods
from cdfsl_core.token_text import (
    class_vectors_in_residual,
    head_tail_sets,
    project_tokens,
    sum_score,
    tir_weights,
)

NAMES = ["red circle", "blue square", "green star", "pink ring", "black bar"]


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _zero_shot_logits(bundle, images, names):
    with torch.no_grad():
        image = F.normalize(bundle.model.encode_image(images), dim=-1)
        text = F.normalize(bundle.model.encode_text(bundle.tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    return image @ text.T


def test_registry_lists_every_pair():
    methods = list_methods()  # 4 adaptations x (none, atha, tir and the two test-time-register interventions)
    assert len(methods) == 4 * 5 and "coop+lora/tir" in methods and "zeroshot/none" in methods
    assert "coop+lora/tir+test-time-register" in methods


@pytest.mark.parametrize("kind, value, valid", [("adaptation", "loraa", "coop+lora"), ("intervention", "sink", "atha")])
def test_unknown_names_list_the_valid_ones(bundle, kind, value, valid):
    with pytest.raises(ValueError, match=f"Unknown {kind} '{value}'.*{re.escape(valid)}"):
        create_method(bundle, NAMES, **{kind: value})


def test_unknown_setting_is_refused(bundle):
    with pytest.raises(TypeError, match="lora_rank"):
        create_method(bundle, NAMES, lora_rank=4)


@pytest.mark.parametrize("adaptation", ["zeroshot", "lora", "coop", "coop+lora"])
def test_before_training_every_adaptation_is_the_zero_shot_model(bundle, images, adaptation):
    expected = _zero_shot_logits(bundle, images, NAMES)
    method = create_method(bundle, NAMES, adaptation, "none", logit_scale=1.0).eval()
    with torch.no_grad():
        assert torch.allclose(method(images), expected, atol=1e-5)


def test_coop_context_starts_as_the_embedding_of_a_photo_of_a(bundle):
    method = create_method(bundle, NAMES, "coop", "none")
    tokens = bundle.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(method.prompts.context.detach(), bundle.model.token_embedding.weight[tokens])


@pytest.mark.parametrize("bos", [True, False])
def test_coop_context_follows_the_tokenizers_own_leading_special_tokens(bundle, bos):
    """A Hugging-Face-style tokenizer: an optional BOS, the words, EOS, padding with 0 (SigLIP's has
    no CLIP SOT). The context is the embedding of 'a photo of a' wherever the words start, and the
    reassembled prompt is the tokens' own embedding (nothing shifted)."""
    vocab = {"a": 5, "photo": 6, "of": 7, "striped": 8, "red": 9, "shape": 10, "dotted": 11, "blue": 12,
             "plain": 13, "green": 14}

    def tokenizer(texts):
        rows = []
        for text in texts:
            ids = ([2] if bos else []) + [vocab[w] for w in text.replace(".", "").split()] + [1]
            rows.append(ids + [0] * (16 - len(ids)))
        return torch.tensor(rows)

    from cdfsl_core.text import PromptLearner

    names = ["striped red shape", "dotted blue shape", "plain green shape"]
    prompts = PromptLearner(bundle.model, tokenizer, names, n_ctx=4, learn_context=True)
    start = 1 if bos else 0
    table = bundle.model.token_embedding.weight
    assert torch.equal(prompts.context.detach(), table[torch.tensor([5, 6, 7, 5])])
    assert prompts.prefix.shape[1] == start
    torch.testing.assert_close(prompts.embeddings().detach(), table[tokenizer([f"a photo of a {n}." for n in names])])
    with pytest.raises(ConfigError, match="n_ctx=3 but .* are 4 tokens"):
        PromptLearner(bundle.model, tokenizer, names, n_ctx=3, learn_context=True)


def test_lora_b_zero_leaves_both_towers_unchanged(bundle, images):
    before = _zero_shot_logits(bundle, images, NAMES)
    adapters = LoRAAdapters(bundle.model, LoRAConfig(rank=4))
    assert len(adapters.adapters) == 4  # 2 vision + 2 text blocks
    assert all(torch.count_nonzero(b) == 0 for m in adapters.adapters for b in m.lora_B.values())
    with adapters.installed():
        assert torch.allclose(_zero_shot_logits(bundle, images, NAMES), before, atol=1e-5)


def test_lora_has_one_adapter_per_projection_and_fused_is_smaller(bundle):
    width = bundle.model.visual.transformer.width
    per_projection = LoRAAdapters(bundle.model, LoRAConfig(rank=4, towers=("visual",))).adapters[0]
    assert set(per_projection.lora_A) == {"q", "k", "v"}
    assert per_projection.lora_B["q"].shape == (width, 4)
    fused = LoRAAttention(per_projection.base, LoRAConfig(rank=4, targets=("qkv",)))
    assert fused.lora_B["qkv"].shape == (3 * width, 4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (the adapters only: base is shared)
    assert count(fused) == 4 * (width + 3 * width) < count(per_projection) == 3 * 4 * (width + width)


def test_a_merged_checkpoint_computes_what_the_installed_adapters_compute(bundle, images):
    from cdfsl_core.models import load_clip

    before = _zero_shot_logits(bundle, images, NAMES)  # the same model, before any adapter
    adapters = LoRAAdapters(bundle.model, LoRAConfig(rank=4, targets=("q", "k", "v", "o")))
    with torch.no_grad():
        for b in (b for m in adapters.adapters for b in m.lora_B.values()):
            b.normal_(0, 0.05)
    adapters.eval()
    with adapters.installed():
        adapted = _zero_shot_logits(bundle, images, NAMES)
    assert (adapted - before).abs().max() > 1e-3  # the adapters act
    state = adapters.merged_state_dict(bundle.model)
    first = adapters.adapters[0]
    q_rows = first.base.in_proj_weight[:64] + first.scale * first.lora_B["q"] @ first.lora_A["q"]  # W + scale B A
    assert torch.allclose(state["visual.transformer.resblocks.0.attn.in_proj_weight"][:64], q_rows, atol=1e-6)
    assert torch.allclose(_zero_shot_logits(bundle, images, NAMES), before, atol=1e-6)  # the shared model is untouched
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "merged.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        merged = load_clip("cdfsl-test-vit", path)
    assert torch.allclose(_zero_shot_logits(merged, images, NAMES), adapted, atol=1e-5)


def test_installed_adapters_are_removed_also_when_the_forward_raises(bundle):
    adapters = LoRAAdapters(bundle.model, LoRAConfig(rank=2))
    with pytest.raises(RuntimeError, match="boom"):
        with adapters.installed():
            assert isinstance(bundle.model.visual.transformer.resblocks[0].attn, LoRAAttention)
            raise RuntimeError("boom")
    assert all(isinstance(block.attn, torch.nn.MultiheadAttention)
               for tower in (bundle.model.visual.transformer, bundle.model.transformer) for block in tower.resblocks)


def test_lora_config_errors(bundle):
    with pytest.raises(ValueError, match="targets"):
        LoRAAdapters(bundle.model, LoRAConfig(targets=("q", "qkv")))
    with pytest.raises(ValueError, match="block 7 out of range"):
        LoRAAdapters(bundle.model, LoRAConfig(blocks=(7,)))


def test_only_adapter_context_and_intervention_parameters_train(bundle):
    method = create_method(bundle, NAMES, "coop+lora", "atha", lora=LoRAConfig(rank=2))
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n in {"prompts.context", "intervention.alpha", "intervention.beta"}
                             for n in trainable)
    assert {"prompts.context", "intervention.alpha", "intervention.beta"} <= trainable
    assert not any(p.requires_grad for p in bundle.model.parameters())  # the shared weights stay frozen


# ---------------------------------------------------------------- independent methods over shared weights
def _train(method, images, steps=3):
    from cdfsl_core.config import TrainConfig
    from cdfsl_core.episode_loop import train_episode

    method.set_classes(NAMES[:4])
    train_episode(method, images, torch.tensor([0, 1, 2, 3]), TrainConfig(steps=steps, lr_lora=5e-2, lr_context=1e-1,
                                                                          lr_intervention=1e-1))
    method.set_classes(NAMES)


def test_the_twelve_methods_build_in_any_order_on_one_bundle_and_stay_independent(bundle, images):
    import gc
    import random

    pairs = [tuple(m.split("/")) for m in list_methods() if m.split("/")[1] in ("none", "atha", "tir")]
    assert len(pairs) == 12
    random.Random(0).shuffle(pairs)  # zero-shot after LoRA, LoRA after zero-shot: any order
    weights = {id(p) for p in bundle.model.parameters()}
    methods = {}
    for adaptation, intervention in pairs:
        method = create_method(bundle, NAMES, adaptation, intervention, lora=LoRAConfig(rank=2)).eval()
        with torch.no_grad():
            for b in (b for m in (method.lora.adapters if method.lora else []) for b in m.lora_B.values()):
                b.normal_(0, 0.1)  # each its own adapters, away from zero
        methods[(adaptation, intervention)] = method
    assert {id(p) for p in bundle.model.parameters()} == weights  # nothing added to or copied from the model
    with torch.no_grad():
        logits = {key: method(images) for key, method in methods.items()}
    lora_methods = [key for key in methods if "lora" in key[0]]
    first, second = lora_methods[:2]
    assert not torch.allclose(logits[first], logits[second])  # two LoRA methods do not share adapters
    _train(methods[first].train(), images)  # training one method ...
    del methods[second]  # ... and deleting another
    gc.collect()
    with torch.no_grad():
        for key, method in methods.items():
            if key != first:
                assert torch.equal(method.eval()(images), logits[key]), key  # ... changes no other's logits
        assert not torch.equal(methods[first].eval()(images), logits[first])
        plain = create_method(bundle, NAMES, "zeroshot", "none", logit_scale=1.0)(images)
    assert torch.allclose(plain, _zero_shot_logits(bundle, images, NAMES), atol=1e-5)  # the model is the pretrained one


def test_reset_restores_the_initial_state_exactly(bundle, images):
    from cdfsl_core.config import TrainConfig
    from cdfsl_core.episode_loop import train_episode

    method = create_method(bundle, NAMES, "coop+lora", "atha", lora=LoRAConfig(rank=2))
    method.reset_parameters(torch.Generator().manual_seed(3))
    initial = {k: v.detach().clone() for k, v in method.state_dict().items()}
    labels = torch.tensor([0, 1, 2, 3])
    method.set_classes(NAMES[:4])
    train_episode(method, images, labels, TrainConfig(steps=3, lr_lora=1e-2, lr_context=1e-1, lr_intervention=1e-1))
    changed = method.state_dict()
    assert any(not torch.equal(initial[k], changed[k]) for k in initial if "lora_B" in k)
    method.set_classes(NAMES)
    method.reset_parameters(torch.Generator().manual_seed(3))
    for key, value in method.state_dict().items():
        assert torch.equal(value, initial[key]), key


# ---------------------------------------------------------------- shared math
def test_tir_weights_for_five_way_are_the_papers_table():
    counts = torch.arange(6)
    assert tir_weights(counts, 5).tolist() == [1.0, 2.0, 1.5, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("n", [2, 3, 7, 10])
def test_tir_weights_generalise_from_two_to_zero(n):
    weights = tir_weights(torch.arange(n + 1), n)
    assert weights[0] == 1.0 and weights[1] == pytest.approx(2.0) and weights[n] == pytest.approx(0.0, abs=1e-6)
    assert torch.all(weights[1:-1] > weights[2:])  # strictly decreasing in m


def test_sum_score_counts_classes_whose_top_k_holds_the_token():
    similarity = torch.zeros(1, 10, 3)
    similarity[0, 0] = 1.0  # token 0: top for every class
    similarity[0, 1, 0] = 0.9  # token 1: top for class 0 only
    similarity[0, 2:4, 1] = 0.5
    counts = sum_score(similarity, rho=0.2)  # k = 2
    assert counts[0, 0] == 3 and counts[0, 1] == 1
    assert counts.sum() == 3 * 2


def test_head_tail_sets_have_the_configured_sizes():
    head, tail = head_tail_sets(torch.randn(3, 64), 0.3, 0.2)
    assert head.sum(-1).tolist() == [19] * 3 and tail.sum(-1).tolist() == [12] * 3
    assert not (head & tail).any()


def test_class_vectors_map_back_to_the_text_features(bundle):
    visual = bundle.model.visual
    text = F.normalize(torch.randn(5, visual.output_dim), dim=-1)
    u = class_vectors_in_residual(visual, text)
    recovered = (u * visual.ln_post.weight + visual.ln_post.bias) @ visual.proj
    assert torch.allclose(recovered, text, atol=1e-4)


# ---------------------------------------------------------------- the hooks
def _capture_block_input(visual, block):
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("x", args[0].detach().clone())

    handle = visual.transformer.resblocks[block].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_atha_moves_exactly_the_head_and_tail_tokens_and_never_cls(bundle, images):
    visual = bundle.model.visual
    text = F.normalize(torch.randn(5, visual.output_dim), dim=-1)
    atha = ATHA(2, ATHAConfig(alpha_init=0.0))
    with torch.no_grad():
        atha.alpha.fill_(0.5)
        atha.beta.fill_(0.25)
    plain, h1 = _capture_block_input(visual, 1)
    with torch.no_grad():
        visual(images)
    h1.remove()
    # feed the unedited input of block 1 through the hook of block 1 only
    edited = atha.edit(1, plain["x"], atha.prepare(visual, text))
    assert edited.shape == plain["x"].shape
    assert torch.equal(edited[:, 0], plain["x"][:, 0])  # CLS untouched
    moved = (edited[:, 1:] - plain["x"][:, 1:]).norm(dim=-1) > 0
    length = plain["x"].shape[1] - 1
    assert moved.sum(-1).tolist() == [int(0.3 * length) + int(0.2 * length)] * len(images)


def test_atha_default_alpha_and_gradients_reach_alpha_and_beta(bundle, images):
    method = create_method(bundle, NAMES, "coop", "atha")
    assert method.intervention.alpha.tolist() == pytest.approx([0.0, 0.8])  # n // 2 = 1 of 2 blocks
    with torch.no_grad():
        method.intervention.beta.fill_(0.1)
    loss = F.cross_entropy(method(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert method.intervention.alpha.grad is not None and method.intervention.alpha.grad.abs().sum() > 0
    assert method.intervention.beta.grad.abs().sum() > 0


def test_tir_zeroes_tokens_relevant_to_every_class(bundle, images):
    visual = bundle.model.visual
    text = F.normalize(torch.randn(5, visual.output_dim), dim=-1)
    tir = TIR(TIRConfig(blocks=(1,)))
    plain, handle = _capture_block_input(visual, 1)
    with torch.no_grad():
        visual(images)
    handle.remove()
    x = plain["x"]
    edited = tir.edit(1, x, {"visual": visual, "text": text})
    similarity = F.normalize(project_tokens(visual, x[:, 1:]), dim=-1) @ text.T
    counts = sum_score(similarity, 0.3)
    ratio = edited[:, 1:].norm(dim=-1) / x[:, 1:].norm(dim=-1)
    expected = tir_weights(counts, 5)
    assert torch.allclose(ratio, expected, atol=1e-5)
    assert torch.equal(edited[:, 0], x[:, 0])


def test_intervention_hooks_are_removed_even_when_the_forward_raises(bundle, images):
    visual = bundle.model.visual
    tir = TIR(TIRConfig(blocks=(0, 1)))
    text = F.normalize(torch.randn(5, visual.output_dim), dim=-1)
    with pytest.raises(RuntimeError, match="boom"):
        with tir.active(visual, text):
            assert all(len(b._forward_pre_hooks) == 1 for b in visual.transformer.resblocks)
            raise RuntimeError("boom")
    assert all(len(b._forward_pre_hooks) == 0 for b in visual.transformer.resblocks)


def test_intervention_blocks_out_of_range(bundle):
    with pytest.raises(ValueError, match=r"TIR blocks \[8\] out of range .* 2 blocks"):
        create_method(bundle, NAMES, "coop", "tir", intervention_config=TIRConfig(blocks=(8,)))


@pytest.mark.parametrize("n, expected", [(12, [8, 10]), (6, [4, 5]), (2, [1])])
def test_tir_default_blocks_keep_the_papers_relative_depth(n, expected):
    assert TIR().blocks(n) == expected
