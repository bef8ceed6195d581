"""The papers' protocol lives in one module: configurations built from it carry its numbers, and
no other source file writes a protocol number for a protocol setting (checked on the syntax tree)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cdfsl_core import protocol
from cdfsl_core.config import TrainConfig, episode_file_name, run_config
from cdfsl_core.episodes import EpisodeConfig
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import MethodConfig

ROOT = Path(__file__).parent.parent
# setting names (keywords, dataclass fields, argparse flags) -> the protocol values they must not be written as
PROTECTED = {
    "ways": {protocol.WAYS}, "n_way": {protocol.WAYS}, "queries": {protocol.QUERIES}, "n_query": {protocol.QUERIES},
    "episodes": {*protocol.EPISODES.values(), protocol.DEMO_EPISODES}, "n_episodes": {*protocol.EPISODES.values()},
    "steps": {protocol.STEPS, protocol.DEMO_STEPS}, "lr_lora": {protocol.LR_LORA}, "lr_context": {protocol.LR_CONTEXT},
    "lr_intervention": {protocol.LR_INTERVENTION}, "momentum": {protocol.MOMENTUM},
    "weight_decay_context": {protocol.WEIGHT_DECAY_CONTEXT}, "resize_ratio": {protocol.RESIZE_RATIO},
    "logit_scale": {protocol.LOGIT_SCALE, protocol.LOGIT_SCALE_ONE_SHOT}, "n_ctx": {protocol.CONTEXT_VECTORS},
    "rank": {protocol.LORA_RANK}, "lora_rank": {protocol.LORA_RANK}, "alpha": {protocol.LORA_ALPHA},
    "dropout": {protocol.LORA_DROPOUT}, "template": {protocol.PROMPT}, "rho": {protocol.TIR_RHO},
    "lam": {protocol.TIR_LAMBDA}, "rho_head": {protocol.ATHA_RHO_HEAD}, "rho_tail": {protocol.ATHA_RHO_TAIL},
    "alpha_init": {protocol.ATHA_ALPHA_INIT},
}
# the project's own sources; pretrain.py trains the embedded CLIP (its steps and rates are not the papers')
SOURCES = [p for folder in ("cdfsl_core", "analysis", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))
           if p.name not in ("protocol.py", "pretrain.py")]


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _violations(tree: ast.AST, where: str) -> list[str]:
    found = []

    def check(name: str, value: ast.AST, line: int) -> None:
        literal = _literal(value)
        if name in PROTECTED and isinstance(literal, (int, float, str)) and not isinstance(literal, bool) \
                and literal in PROTECTED[name]:
            found.append(f"{where}:{line}: {name} = {literal!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg:
            check(node.arg, node.value, node.value.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            check(node.target.id, node.value, node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(_literal(node.args[0]), str) \
                and str(_literal(node.args[0])).startswith("--"):  # argparse: add_argument("--steps", default=100)
            flag = str(_literal(node.args[0]))[2:].replace("-", "_")
            for keyword in node.keywords:
                if keyword.arg == "default":
                    check(flag, keyword.value, keyword.value.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "EpisodeConfig":
            if any(_literal(arg) is not None for arg in node.args):
                found.append(f"{where}:{node.lineno}: EpisodeConfig with literal numbers")
    return found


def test_no_protocol_number_is_written_outside_the_protocol_module():
    found = []
    for path in SOURCES:
        found += _violations(ast.parse(path.read_text()), str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                found += _violations(ast.parse("".join(cell["source"])), str(path.relative_to(ROOT)))
    assert not found, "protocol numbers written outside cdfsl_core/protocol.py:\n" + "\n".join(found)


def test_the_check_finds_a_protocol_number_when_there_is_one():
    # the positive control of the test above
    assert _violations(ast.parse("TrainConfig(steps=100)"), "x") == ["x:1: steps = 100"]
    assert _violations(ast.parse("p.add_argument('--queries', default=15)"), "x") == ["x:1: queries = 15"]
    assert _violations(ast.parse("class C:\n    resize_ratio: float = 1.15"), "x") == ["x:2: resize_ratio = 1.15"]
    assert _violations(ast.parse("EpisodeConfig(5, 1, 15, 20, 0)"), "x") == ["x:1: EpisodeConfig with literal numbers"]
    assert _violations(ast.parse("TrainConfig(steps=3)"), "x") == []


def test_configurations_take_their_defaults_from_the_protocol():
    assert (EpisodeConfig().n_way, EpisodeConfig().n_query) == (protocol.WAYS, protocol.QUERIES)
    assert TrainConfig().steps == protocol.STEPS and TrainConfig().lr_lora == protocol.LR_LORA
    assert (LoRAConfig().rank, LoRAConfig().alpha, LoRAConfig().scale) == (16, 8.0, 2.0)  # the authors': 8 / sqrt(16)
    assert MethodConfig().template == protocol.PROMPT


@pytest.mark.parametrize("shots, scale, episodes", [(1, 2.0, 800), (5, 4.0, 400)])
def test_run_config_is_the_papers_protocol(shots, scale, episodes):
    config = run_config("eurosat", shots, "coop+lora", "tir")
    assert config.method.logit_scale == scale and config.episodes.n_episodes == episodes
    assert (config.episodes.n_way, config.episodes.k_shot, config.episodes.n_query) == (5, shots, 15)
    assert config.train.steps == 100 and config.method.lora.rank == 16
    assert episode_file_name("eurosat", config.episodes) == f"eurosat_5w{shots}s15q_{episodes}ep_seed0.json"
