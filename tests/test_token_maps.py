"""Token maps: per-token quantities on the patch grid, checked against planted artefacts, the
aggregate tables they must add up to, and TIR's weights computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import figures as fig
from analysis.config import AnalysisConfig
from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from analysis.token_maps import compare_token_maps, display_images, patch_grid, token_maps
from cdfsl_core.config import TIRConfig
from cdfsl_core.data import load_dataset
from cdfsl_core.errors import ConfigError
from cdfsl_core.methods import create_method
from cdfsl_core.models import EMBEDDED_MODEL, load_clip
from cdfsl_core.preprocess import protocol_transform

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checkered black shape"]
LAYER = 3


@pytest.fixture(scope="module")
def setting():
    bundle = load_clip(*EMBEDDED_MODEL)
    dataset = load_dataset("synthetic", split="test", images_per_class=1)
    transform = protocol_transform(bundle, 1.15)
    images = torch.stack([transform(dataset.load_image(i)) for i in (0, 9, 20, 41)])
    return bundle, images


def _flagged(table: pd.DataFrame, quantity: str, block: int) -> set[tuple]:
    part = table[(table["quantity"] == quantity) & (table["block"] == block) & (table["value"] > 0)]
    return set(zip(part["image"], part["row"], part["col"]))


@pytest.mark.parametrize("kind, token", [("high-norm", 9), ("massive-activation", 20)])
def test_a_planted_token_is_flagged_at_its_row_and_column_in_every_image_and_nothing_else_new(setting, kind, token):
    bundle, images = setting
    method = create_method(bundle, NAMES, "zeroshot", "none")
    plain = token_maps(method, images, layers=[LAYER])
    with planted(method, [Plant(kind, LAYER, token=token)]):
        marked = token_maps(method, images, layers=[LAYER])
    definition = f"sink:{kind}"
    row, col = divmod(token, 8)  # 8 x 8 patches, token j at (j // 8, j % 8)
    expected = {(i, row, col) for i in range(len(images))}
    found = _flagged(marked, definition, LAYER)
    assert expected <= found
    assert found - expected <= _flagged(plain, definition, LAYER)  # anything else was flagged without the plant too
    assert not _flagged(plain, definition, LAYER) & expected  # and the planted place was not flagged before


def test_maps_add_up_to_the_norms_sinks_and_head_tail_tables(setting):
    bundle, images = setting
    method = create_method(bundle, NAMES, "coop+lora", "atha")
    analysis = AnalysisConfig()
    table = token_maps(method, images, analysis=analysis)
    _, readout = method.text_features(readout=True)
    diagnostics = TokenDiagnostics.from_config(method.model.visual, readout, list(range(6)), analysis, "none")
    with record(method) as cache, torch.no_grad():
        method.encode_image(images, readout)
    diagnostics.update(cache)
    tables = diagnostics.tables()
    wide = table.pivot_table(index=["image", "token", "block"], columns="quantity", values="value").reset_index()
    norms = tables["norms"]
    for _, row in norms[norms["count"] > 0].iterrows():
        cell = wide[(wide["block"] == row["layer"]) & (wide["sum_score"] == row["bucket"])]
        assert len(cell) == row["count"]
        assert cell["norm"].mean() == pytest.approx(row["mean"], rel=1e-9)
    for _, row in tables["sinks"].iterrows():
        per_image = wide[wide["block"] == row["layer"]].groupby("image")[f"sink:{row['definition']}"].sum()
        assert per_image.mean() == pytest.approx(row["mean_count"], abs=1e-12)
    head_tail = tables["head_tail"]
    for layer in range(6):
        counts = head_tail[head_tail["layer"] == layer]["count"].to_numpy()
        best = wide[wide["block"] == layer]["max_similarity"].to_numpy()
        assert (np.histogram(best, bins=40, range=(-1, 1))[0] == counts).all()
        # head tokens are the floor(rho_head x 64) best of each image, tail the floor(rho_tail x 64) worst; the
        # table's cut points are the mean over images of the worst head and the best tail similarity
        part = wide[wide["block"] == layer]
        per_image = part.groupby("image")
        assert (per_image["head_tail"].apply(lambda v: (v == 1).sum()) == int(analysis.rho_head * 64)).all()
        assert (per_image["head_tail"].apply(lambda v: (v == -1).sum()) == int(analysis.rho_tail * 64)).all()
        head_cut = part[part["head_tail"] == 1].groupby("image")["max_similarity"].min().mean()
        tail_cut = part[part["head_tail"] == -1].groupby("image")["max_similarity"].max().mean()
        first = head_tail[head_tail["layer"] == layer].iloc[0]
        assert head_cut == pytest.approx(first["head_cut"], abs=1e-6)
        assert tail_cut == pytest.approx(first["tail_cut"], abs=1e-6)


def test_tir_edit_is_the_weight_change_at_tir_blocks_only(setting):
    bundle, images = setting
    method = create_method(bundle, NAMES, "coop+lora", "tir", intervention_config=TIRConfig(lam=0.5))
    table = token_maps(method, images)
    wide = table.pivot_table(index=["image", "token", "block"], columns="quantity", values="value").reset_index()
    tir_blocks = method.intervention.blocks(6)
    assert tir_blocks == [4, 5]
    # by hand for N = 5, lam = 0.5: w(m) = 1, 2, 1.5, 1, 0.5, 0 for m = 0..5
    hand = {0: 1.0, 1: 2.0, 2: 1.5, 3: 1.0, 4: 0.5, 5: 0.0}
    assert (wide["tir_weight"] == wide["sum_score"].map(hand)).all()
    assert (wide[~wide["block"].isin(tir_blocks)]["edit"] == 0).all()
    edited = wide[wide["block"] == 4]
    # the stream entering block 4 is scaled by w(m) of the Sum score of the stream after block 3
    after3 = wide[wide["block"] == 3].set_index(["image", "token"])["sum_score"].map(hand)
    expected = (after3 - 1).abs().to_numpy()
    assert np.allclose(edited.set_index(["image", "token"])["edit"].loc[after3.index].to_numpy(), expected, atol=1e-5)


def test_a_method_without_intervention_edits_nothing_and_labels_rows(setting):
    bundle, images = setting
    models = {"pretrained": create_method(bundle, NAMES, "zeroshot", "none"),
              "other": create_method(bundle, NAMES, "lora", "none")}
    table = compare_token_maps(models, images[:2], layers=[0, 5], image_ids=["a", "b"], dataset="synthetic")
    assert set(table["model"]) == {"pretrained", "other"}
    assert set(table["image"]) == {"a", "b"} and set(table["block"]) == {0, 5}
    assert (table["dataset"] == "synthetic").all()
    assert (table[table["quantity"] == "edit"]["value"] == 0).all()
    assert len(table) == 2 * 2 * 2 * 64 * table["quantity"].nunique()


def test_patch_grid_and_display_images():
    assert patch_grid(65) == (1, 8)
    assert patch_grid(197) == (1, 14)
    assert patch_grid(196) == (0, 14)
    assert patch_grid(201, prefix=5) == (5, 14)
    with pytest.raises(ConfigError, match="square patch grid"):
        patch_grid(70, prefix=1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    pixels = torch.rand(2, 8, 8, 3)
    normalised = (pixels.permute(0, 3, 1, 2) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert np.allclose(display_images(normalised, {"mean": mean, "std": std}), pixels.numpy(), atol=1e-6)


def test_the_figure_draws_every_model_and_quantity_over_the_pixels(setting):
    bundle, images = setting
    models = {"pretrained": create_method(bundle, NAMES, "zeroshot", "none"),
              "tir": create_method(bundle, NAMES, "coop+lora", "tir")}
    table = compare_token_maps(models, images[:2])
    quantities = ("sum_score", "head_tail", "pulled_class", "edit")
    figure = fig.token_maps(table, display_images(images, bundle), block=4, quantities=quantities)
    assert figure.axes[0].get_title() == "image"
    images_drawn = [a for a in figure.axes if a.images]
    assert len(images_drawn) == 2 * 2 * (1 + len(quantities))
    with pytest.raises(ValueError, match="not in the token-map table"):
        fig.token_maps(table, display_images(images, bundle), block=4, quantities=("nothing",))


def test_a_few_images_of_an_episode_cover_its_classes_first():
    from analysis.token_maps import balanced_indices

    labels = [0] * 3 + [1] * 3 + [2] * 3  # class-major, as an episode's queries
    assert balanced_indices(labels, 3) == [0, 3, 6]
    assert balanced_indices(labels, 5) == [0, 1, 3, 4, 6]
    assert balanced_indices(labels, 0) == list(range(9)) and balanced_indices(labels, 20) == list(range(9))
