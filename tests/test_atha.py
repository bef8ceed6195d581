"""ATHA against references that do not come from its own code.

1. A hand-built case: four channels, the identity projection and a known ln_post, so the class
   vectors are u~_c = (t_c - b) / gamma = 3 e_c; ten patch tokens whose cosines, head and tail sets
   and edited values are written out below by hand. Swapping argmax and argmin, flipping the tail
   sign, pushing the wrong class or normalising the read-out each changes an expected number.
2. The whole method on the test CLIP against a loop-by-loop transcription of docs/concepts/methods.md (ATHA
   steps 1-4), whose text read-out comes from open_clip's own ``encode_text`` on a copy of the
   model cut after text block n - 2, and whose minimum-norm solve is ``torch.linalg.lstsq``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.interventions import ATHA, ATHAConfig
from cdfsl_core.methods import create_method
from cdfsl_core.token_text import atha_class_vectors

# --------------------------------------------------------------------------- the hand-built case
# Text read-outs t_c = (6 e_c, 1 in the last channel); ln_post gain 2 and bias (0, 0, 0, 1); P = I.
# So u_c = t_c and u~_c = (t_c - (0, 0, 0, 1)) / 2 = 3 e_c: unit vectors e_0, e_1, e_2 of norm 3.
TEXT = torch.tensor([[6.0, 0, 0, 1], [0, 6.0, 0, 1], [0, 0, 6.0, 1]])
# Patch tokens; cosines with e_0, e_1, e_2 are the first three entries over the norm:
#   j  token            |x|^2  cosines             max   c+  c-
#   1  (4, 2, 1, 0)       21   .873 .436 .218      .873   0   2
#   2  (1, 5, 2, 0)       30   .183 .913 .365      .913   1   0
#   3  (2, 1, 6, 0)       41   .312 .156 .937      .937   2   1
#   4  (3, 2, 1, 3)       23   .626 .417 .209      .626   0   2
#   5  (1, 3, 2, 4)       30   .183 .548 .365      .548   1   0
#   6  (2, 1, 3, 5)       39   .320 .160 .480      .480   2   1
#   7  (3, 1, 2, 9)       95   .308 .103 .205      .308   0   1
#   8  (1, 3, 2, 10)     114   .094 .281 .187      .281   1   0
#   9  (2, 1, 3, 12)     158   .159 .080 .239      .239   2   1
#  10  (1, 2, 3, 20)     414   .049 .098 .147      .147   2   0
# L = 10: head = the floor(0.3 L) = 3 largest maxima {3, 2, 1}; tail = the floor(0.2 L) = 2
# smallest {10, 9}. CLS = (100, 0, 0, 0) is not ranked (cosine 1 with e_0 would put it in the head).
PATCHES = [[4, 2, 1, 0], [1, 5, 2, 0], [2, 1, 6, 0], [3, 2, 1, 3], [1, 3, 2, 4],
           [2, 1, 3, 5], [3, 1, 2, 9], [1, 3, 2, 10], [2, 1, 3, 12], [1, 2, 3, 20]]
SQUARED_NORMS = [21, 30, 41, 23, 30, 39, 95, 114, 158, 414]
CLS = [100, 0, 0, 0]
ALPHA, BETA = 0.5, 0.25  # at block 1; alpha * u~ = 1.5 e_c, beta * u~ = 0.75 e_c


class HandBuiltTower(nn.Module):
    """What ATHA reads from a vision tower: ``ln_post`` and ``proj`` (and two blocks to hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_post = nn.LayerNorm(4)
        with torch.no_grad():
            self.ln_post.weight.fill_(2.0)
            self.ln_post.bias.copy_(torch.tensor([0.0, 0, 0, 1]))
        self.proj = nn.Parameter(torch.eye(4))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([nn.Identity(), nn.Identity()])


def _stream() -> torch.Tensor:
    return torch.tensor([[CLS, *PATCHES]], dtype=torch.float32)  # [1, 1 + 10, 4]


def _edited(config: ATHAConfig = ATHAConfig(), text: torch.Tensor = TEXT) -> torch.Tensor:
    atha = ATHA(2, config)
    with torch.no_grad():
        atha.alpha.zero_()
        atha.alpha[1] = ALPHA
        atha.beta[1] = BETA
    tower = HandBuiltTower()
    return atha.edit(1, _stream(), atha.prepare(tower, text))[0].detach()


def _expected(changes: dict[int, list[float]]) -> torch.Tensor:
    """The stream with rows ``changes`` (0 = CLS, j = patch j) replaced."""
    rows = [CLS, *PATCHES]
    return torch.tensor([changes.get(j, rows[j]) for j in range(len(rows))], dtype=torch.float32)


def test_class_vectors_of_the_hand_built_tower_are_three_times_the_unit_vectors():
    vectors = atha_class_vectors(HandBuiltTower(), TEXT)
    assert torch.allclose(vectors, 3 * torch.eye(4)[:3], atol=1e-6)


def test_head_tokens_move_toward_their_best_class_and_tail_tokens_away_from_their_least_similar():
    expected = _expected({
        1: [4 + 1.5, 2, 1, 0],  # head, c+ = 0
        2: [1, 5 + 1.5, 2, 0],  # head, c+ = 1
        3: [2, 1, 6 + 1.5, 0],  # head, c+ = 2
        9: [2, 1 - 0.75, 3, 12],  # tail, c- = 1
        10: [1 - 0.75, 2, 3, 20],  # tail, c- = 0
    })
    assert torch.allclose(_edited(), expected, atol=1e-5)


@pytest.mark.parametrize("tail_class, token9, token10", [
    ("most", [2, 1, 3 - 0.75, 12], [1, 2, 3 - 0.75, 20]),  # away from c+ = 2 for both
    ("mean", [2 - 0.25, 1 - 0.25, 3 - 0.25, 12], [1 - 0.25, 2 - 0.25, 3 - 0.25, 20]),  # mean vector (1, 1, 1, 0)
])
def test_the_tail_class_options(tail_class, token9, token10):
    edited = _edited(ATHAConfig(tail_class=tail_class))
    assert torch.allclose(edited[9], torch.tensor(token9, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(edited[10], torch.tensor(token10, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(edited[1], torch.tensor([5.5, 2, 1, 0]), atol=1e-5)  # the head is the same


def test_include_cls_ranks_cls_first_so_token_1_leaves_the_head():
    # L = 11 ranked tokens: head floor(3.3) = 3 = {CLS (cosine 1), 3, 2}; tail floor(2.2) = 2 = {10, 9}
    expected = _expected({0: [100 + 1.5, 0, 0, 0], 2: [1, 6.5, 2, 0], 3: [2, 1, 7.5, 0],
                          9: [2, 0.25, 3, 12], 10: [0.25, 2, 3, 20]})
    assert torch.allclose(_edited(ATHAConfig(include_cls=True)), expected, atol=1e-5)


def test_unit_text_norm_solves_with_the_normalised_read_out():
    # t_0 / |t_0| = (6, 0, 0, 1) / sqrt(37): u~_0 = ((6, 0, 0, 1) / sqrt(37) - (0, 0, 0, 1)) / 2
    root = math.sqrt(37)
    u0 = torch.tensor([3 / root, 0, 0, (1 / root - 1) / 2])
    assert torch.allclose(atha_class_vectors(HandBuiltTower(), TEXT, "unit")[0], u0, atol=1e-6)
    # token 1 is no longer a head token, since the cosines changed; its value is unchanged
    edited = _edited(ATHAConfig(text_norm="unit"))
    assert not torch.allclose(edited, _edited(), atol=1e-3)


def test_the_edit_size_is_measured_against_the_tokens_it_edits():
    atha = ATHA(2, ATHAConfig())
    with torch.no_grad():
        atha.alpha.zero_()
        atha.alpha[1] = ALPHA
        atha.beta[1] = BETA
    tower = HandBuiltTower()
    with atha.measuring() as stats:
        atha.edit(1, _stream(), atha.prepare(tower, TEXT))
    token_norm = sum(math.sqrt(n) for n in SQUARED_NORMS) / 10  # mean patch-token norm entering the block
    assert stats[1]["token_norm"] == pytest.approx(token_norm, rel=1e-6)
    assert stats[1]["head_vector_norm"] == pytest.approx(3.0) and stats[1]["tail_vector_norm"] == pytest.approx(3.0)
    assert stats[1]["head_edit"] == pytest.approx(ALPHA * 3 / token_norm, rel=1e-6)
    assert stats[1]["tail_edit"] == pytest.approx(BETA * 3 / token_norm, rel=1e-6)
    assert stats[1]["alpha"] == ALPHA and stats[1]["beta"] == BETA


def test_a_zero_ln_post_gain_is_a_clear_error():
    tower = HandBuiltTower()
    with torch.no_grad():
        tower.ln_post.weight[2] = 0.0
    with pytest.raises(ValueError, match=r"ln_post .* \|gamma\| = 0 at channel 2 .*infinite or NaN"):
        atha_class_vectors(tower, TEXT)


def test_the_projection_solve_is_cached_but_follows_an_edited_projection():
    tower = HandBuiltTower()
    first = atha_class_vectors(tower, TEXT)
    with torch.no_grad():
        tower.proj.mul_(0.5)  # P = I/2: pinv(P^T) = 2 I, so u_c = 2 t_c
    second = atha_class_vectors(tower, TEXT)
    assert torch.allclose(second[:, :3], 2 * first[:, :3], atol=1e-6)


# --------------------------------------------------------------------------- the whole method
NAMES = ["red circle", "blue square", "green star", "pink ring", "black bar"]


def _reference_logits(bundle, images, alpha, beta, text_norm="none", scale=4.0, rho_head=0.3, rho_tail=0.2):
    """docs/concepts/methods.md's ATHA, written out token by token with open_clip's own text tower."""
    model = bundle.model
    tokens = bundle.tokenizer([f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        classifier = F.normalize(model.encode_text(tokens), dim=-1)
        cut = copy.deepcopy(model)
        cut.transformer.resblocks = cut.transformer.resblocks[:-1]  # read out after block n - 2
        readout = cut.encode_text(tokens)  # ln_final(h[EOT]) @ text_projection, not normalised
    if text_norm == "unit":
        readout = F.normalize(readout, dim=-1)
    visual = model.visual
    solution = torch.linalg.lstsq(visual.proj.detach().T.double(), readout.T.double(), driver="gelsd").solution
    vectors = ((solution.T - visual.ln_post.bias.double()) / visual.ln_post.weight.double()).float()  # [C, width]

    def hook(block):
        def edit(module, args, kwargs):
            x = (args[0] if args else kwargs["q_x"]).clone()
            for b in range(x.shape[0]):
                patches = x[b, 1:]
                cosines = [[float(F.cosine_similarity(p, v, dim=0)) for v in vectors] for p in patches]
                best = [max(row) for row in cosines]
                order = sorted(range(len(best)), key=lambda j: best[j])
                head = order[len(best) - int(rho_head * len(best)):]
                tail = order[:int(rho_tail * len(best))]
                for j in head:
                    x[b, 1 + j] += alpha[block] * vectors[cosines[j].index(max(cosines[j]))]
                for j in tail:
                    x[b, 1 + j] -= beta[block] * vectors[cosines[j].index(min(cosines[j]))]
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "q_x": x})
        return edit

    blocks = visual.transformer.resblocks
    handles = [blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(len(blocks))]
    try:
        with torch.no_grad():
            image = F.normalize(model.encode_image(images), dim=-1)
    finally:
        for handle in handles:
            handle.remove()
    return scale * image @ classifier.T


@pytest.mark.parametrize("text_norm", ["none", "unit"])
def test_the_method_reproduces_a_token_by_token_transcription(bundle, text_norm):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    alpha, beta = [0.7, -0.4], [0.3, 0.6]
    method = create_method(bundle, NAMES, "coop", "atha", logit_scale=4.0, intervention_config=ATHAConfig(text_norm=text_norm)).eval()
    with torch.no_grad():
        method.intervention.alpha.copy_(torch.tensor(alpha))
        method.intervention.beta.copy_(torch.tensor(beta))
        ours = method(images)
    reference = _reference_logits(bundle, images, alpha, beta, text_norm)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)
    plain = _reference_logits(bundle, images, [0.0, 0.0], [0.0, 0.0])
    assert (ours - plain).abs().max() > 1e-3  # the edit acts: the comparison above is not vacuous


def test_the_two_text_norms_give_different_logits(bundle):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    logits = {}
    for norm in ("none", "unit"):
        method = create_method(bundle, NAMES, "coop", "atha", intervention_config=ATHAConfig(text_norm=norm)).eval()
        with torch.no_grad():
            logits[norm] = method(images)
    assert (logits["none"] - logits["unit"]).abs().max() > 1e-4


def test_the_read_out_the_method_hands_to_atha_is_not_normalised(bundle):
    method = create_method(bundle, NAMES, "coop", "atha")
    tokens = bundle.tokenizer([f"a photo of a {name}." for name in NAMES])
    cut = copy.deepcopy(bundle.model)
    cut.transformer.resblocks = cut.transformer.resblocks[:-1]
    with torch.no_grad():
        expected = cut.encode_text(tokens)
        _, readout = method.text_features()
    assert torch.allclose(readout, expected, atol=1e-5)
    assert not torch.allclose(readout.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-2)
