"""The papers' protocol at cluster scale: a grid of runs as Ray tasks, into ordinary run folders.

    python -m cdfsl_core.sweep --grid grid.toml
    python -m cdfsl_core.sweep --datasets cropdiseases eurosat isic chestx --data-root /data \
        --model ViT-B-16 --pretrained openai --shots 1 5 \
        --methods coop+lora/none coop+lora/atha coop+lora/tir --gpus-per-task 0.25 --out runs/papers

A grid is datasets x shots x methods x seeds (a TOML file with the same names as the flags, or
the flags). Every cell is one run folder, ``OUT/<dataset>/<k>shot/<adaptation>_<intervention>/seed<s>``,
in the layout of the single-process runner, so ``compare``, the diagnostics, the study and the
notebooks read it unchanged; the runs of a dataset, shot setting and seed share one episode file
(``OUT/episodes/``), so their differences are paired. Each Ray task runs a shard of episodes of
one run; it asks for ``--cpus-per-task`` and ``--gpus-per-task`` (fractions share a GPU), and each
worker loads the model once and keeps it for every task it runs. Locally ``ray.init()`` uses this
machine's cores and GPUs; ``--address`` joins a cluster.

Nothing is lost and nothing is done twice: every run folder is checked and prepared before any task
starts; every episode is claimed with an OS file lock (released when a process dies) and recorded
once; a killed worker's task is retried; a sweep stopped and started again resumes. At the end it
prints the accuracy table with 95% CIs and the paired differences against the baseline.
Ray is an optional dependency: ``pip install '.[cluster]'``.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cdfsl_core import protocol
from cdfsl_core.atomic import write_table
from cdfsl_core.cli import (
    command,
    episode_batch_arg,
    logit_scale,
    non_negative_float,
    non_negative_int,
    parser,
    positive_float,
    positive_int,
    pretrained_arg,
    pretrained_value,
)
from cdfsl_core.config import episode_config, episode_file_name, run_config
from cdfsl_core.errors import ConfigError
from cdfsl_core.models import PRECISIONS
from cdfsl_core.names import ADAPTATIONS
from cdfsl_core.paths import check_writable_folder
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.stats import format_mean_ci

__all__ = ["SweepGrid", "load_grid", "plan_sweep", "sweep"]

DEFAULT_METHODS = ("coop+lora/none", "coop+lora/atha", "coop+lora/tir")


@dataclass(frozen=True)
class SweepGrid:
    """A grid of runs and how to run it; defaults: the papers' protocol on the embedded world."""

    datasets: tuple[str, ...] = ("synthetic-crops", "synthetic-satellite", "synthetic-lesions", "synthetic-xray")
    shots: tuple[int, ...] = protocol.SHOTS
    methods: tuple[str, ...] = DEFAULT_METHODS  # adaptation/intervention
    seeds: tuple[int, ...] = (0,)  # episode seeds: every seed is another episode file
    episodes: int | None = None  # per run (None: the papers', 800 for 1-shot and 400 for 5-shot)
    ways: int = protocol.WAYS  # classes per episode
    queries: int = protocol.QUERIES  # query images per class
    short_class_policy: str = "error"  # a class with too few images: 'error', 'skip' or 'cycle' (as finetune)
    steps: int = protocol.STEPS
    lora_rank: int = protocol.LORA_RANK  # LoRA rank r
    logit_scale: float | str = "auto"  # s in s * cos: a number, 'learned', or 'auto' (the protocol's per shots)
    augment: bool = False  # the authors' 5 views per support image
    model: str = "cdfsl-synth-vit"  # open_clip architecture
    pretrained: str | None = "synthetic"  # tag or weights file (None: random weights)
    data_root: str | None = None  # the datasets' root (None: $CDFSL_DATA_ROOT)
    precision: str = "auto"  # 'auto' (bf16 on GPUs), 'fp32', 'bf16'
    out: str = "runs/sweep"  # the sweep's folder
    baseline: str | None = None  # the method the paired differences are against (None: the first)
    shard: int = 10  # episodes per task
    episode_batch: int | str = "auto"  # episodes of a task trained together in one forward ('auto': per device)
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0  # fractions share a GPU; 0: CPU only
    max_retries: int = 3  # retries of a task whose worker died

    def validate(self) -> None:
        """Every value checked, each named as a grid key (the TOML file's and the flags' names)."""
        from cdfsl_core.data import list_datasets
        from cdfsl_core.interventions import list_interventions
        from cdfsl_core.names import SHORT_CLASS_POLICIES

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

        def check(key: str, ok: bool, expected: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise ConfigError(f"grid {key} = {list(value) if isinstance(value, tuple) else value!r}: expected "
                                  f"{expected}.")

        for key in ("datasets", "methods"):
            check(key, isinstance(getattr(self, key), (tuple, list)) and all(isinstance(v, str) for v in getattr(self, key)),
                  "a list of names")
        check("shots", isinstance(self.shots, (tuple, list)) and all(is_int(v) and v >= 1 for v in self.shots),
              "a list of positive integers")
        check("seeds", isinstance(self.seeds, (tuple, list)) and all(is_int(v) and v >= 0 for v in self.seeds),
              "a list of integers >= 0")
        check("episodes", self.episodes is None or (is_int(self.episodes) and self.episodes >= 1),
              "a positive integer (or leave it out: the papers' count)")
        check("ways", is_int(self.ways) and self.ways >= 2, "an integer >= 2")
        check("queries", is_int(self.queries) and self.queries >= 1, "a positive integer")
        check("short_class_policy", self.short_class_policy in SHORT_CLASS_POLICIES, f"one of {SHORT_CLASS_POLICIES}")
        check("steps", is_int(self.steps) and self.steps >= 0, "an integer >= 0")
        check("lora_rank", is_int(self.lora_rank) and self.lora_rank >= 1, "a positive integer")
        check("logit_scale", self.logit_scale in ("auto", "learned") or (is_number(self.logit_scale)
                                                                           and self.logit_scale > 0),
              "a positive number, 'learned' or 'auto'")
        check("augment", isinstance(self.augment, bool), "true or false")
        for key in ("model", "out", "precision"):
            check(key, isinstance(getattr(self, key), str) and getattr(self, key) != "", "a non-empty string")
        check("pretrained", self.pretrained is None or isinstance(self.pretrained, str), "a tag, a weights file or 'none'")
        check("data_root", self.data_root is None or isinstance(self.data_root, str), "a folder path")
        check("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        check("shard", is_int(self.shard) and self.shard >= 1, "a positive integer")
        check("episode_batch", self.episode_batch == "auto" or (is_int(self.episode_batch) and self.episode_batch >= 1),
              "'auto' or a positive integer")
        check("cpus_per_task", is_number(self.cpus_per_task) and self.cpus_per_task > 0, "a positive number")
        check("gpus_per_task", is_number(self.gpus_per_task) and self.gpus_per_task >= 0, "a number >= 0")
        check("max_retries", is_int(self.max_retries) and self.max_retries >= 0, "an integer >= 0")

        unknown = [d for d in self.datasets if d not in list_datasets()]
        if unknown:
            raise ConfigError(f"grid datasets {unknown} are not registered; expected some of {list_datasets()}.")
        for method in self.methods:
            adaptation, _, intervention = method.partition("/")
            if adaptation not in ADAPTATIONS or intervention not in list_interventions():
                raise ConfigError(f"grid method {method!r}: expected ADAPTATION/INTERVENTION with an adaptation in "
                                  f"{ADAPTATIONS} and an intervention in {list(list_interventions())}.")
        if self.baseline is not None and self.baseline not in self.methods:
            raise ConfigError(f"baseline {self.baseline!r} is not among the grid's methods {list(self.methods)}.")
        if not self.datasets or not self.shots or not self.methods or not self.seeds:
            raise ConfigError("the grid is empty: give at least one dataset, shot setting, method and seed.")
        if self.shard < 1 or self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ConfigError(f"shard={self.shard}, cpus_per_task={self.cpus_per_task}, gpus_per_task="
                              f"{self.gpus_per_task}: expected shard >= 1, cpus > 0 and gpus >= 0.")
        if self.gpus_per_task > 1 and self.gpus_per_task != int(self.gpus_per_task):
            raise ConfigError(f"gpus_per_task={self.gpus_per_task}: above 1 it must be a whole number of GPUs.")


def load_grid(path: str | os.PathLike[str], **overrides: Any) -> SweepGrid:
    """A grid from a TOML file whose keys are :class:`SweepGrid`'s fields; ``overrides`` win."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"grid file {path} is not valid TOML ({err}).") from None
    known = {f.name for f in fields(SweepGrid)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"grid file {path}: unknown keys {unknown}; expected some of {sorted(known)}.")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in {**raw, **overrides}.items()}
    if values.get("pretrained") is not None:
        values["pretrained"] = pretrained_value(values["pretrained"])
    grid = SweepGrid(**values)
    grid.validate()  # before Ray starts: a wrong value fails in a second, named as the file's key
    return grid


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    shots: int
    method: str
    seed: int
    folder: Path
    todo: tuple[int, ...] = field(default_factory=tuple)


def plan_sweep(grid: SweepGrid, device: str = "cpu") -> list[Cell]:
    """Check the grid and prepare every run folder (config, episode file, manifest) before any task
    starts: an unknown name, missing data or weights, or a folder that holds a run with other
    settings fails here. ``device``: where the episodes will run (the workers' device)."""
    import torch

    from cdfsl_core.runner import prepare_run

    grid.validate()
    out = Path(grid.out).absolute()
    cells = []
    for dataset in grid.datasets:
        for shots in grid.shots:
            for seed in grid.seeds:
                episodes = episode_config(shots, grid.episodes, seed, grid.ways, grid.queries,
                                                   grid.short_class_policy)
                episode_file = out / "episodes" / episode_file_name(dataset, episodes)
                for method in grid.methods:
                    adaptation, _, intervention = method.partition("/")
                    config = run_config(
                        dataset, shots, adaptation, intervention, episodes=episodes.n_episodes, steps=grid.steps,
                        seed=seed, model=grid.model, pretrained=grid.pretrained, device=device,
                        precision=grid.precision, data_root=grid.data_root, episode_file=str(episode_file),
                        scale=None if grid.logit_scale == "auto" else grid.logit_scale, lora_rank=grid.lora_rank,
                        augment=grid.augment, ways=grid.ways, queries=grid.queries,
                        short_class_policy=grid.short_class_policy)
                    folder = out / dataset / f"{shots}shot" / method.replace("/", "_") / f"seed{seed}"
                    plan = prepare_run(config, folder, device=torch.device(device))
                    cells.append(Cell(dataset, shots, method, seed, folder, tuple(plan.todo())))
    return cells


# --------------------------------------------------------------------------- the workers
_MODELS: dict[tuple, Any] = {}  # a worker process keeps every model it loaded, for all the tasks it runs
_FOOTPRINTS: dict[str, int] = {}  # and the measured bytes per episode of each run it worked on (GPU 'auto')


def _shard(folder: str, indices: list[int], threads: int, episode_batch: int | str = 1, gpu_share: float = 1.0) -> int:
    """A task: run episodes ``indices`` of the prepared run ``folder`` in this worker, ``episode_batch``
    at a time in one forward ('auto' on a GPU: sized by ``gpu_share`` of its free memory); how many
    it recorded."""
    import torch

    from cdfsl_core.runner import load_plan, measure_footprint, resolve_episode_batch, run_episodes, support_images

    torch.set_num_threads(max(1, threads))
    plan = load_plan(folder)
    key = (plan.config.model.name, plan.config.model.pretrained, str(plan.device), plan.config.episodes.seed
           if plan.config.model.pretrained is None else None)
    if key not in _MODELS:
        _MODELS[key] = plan.load_model()
    bundle = _MODELS[key]

    def footprint() -> int:
        if folder not in _FOOTPRINTS:
            _FOOTPRINTS[folder] = measure_footprint(plan, bundle)
        return _FOOTPRINTS[folder]

    batch = resolve_episode_batch(episode_batch, plan.device, support_images(plan.config),
                                  footprint if plan.device.type == "cuda" else None, gpu_share)
    return run_episodes(plan, bundle, indices, progress=False, episode_batch=batch)


def _check_address(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer is an error within seconds, not a hang."""
    if address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT (the head node's GCS port, usually 6379), "
                          "ray://HOST:PORT, or 'auto'.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"the Ray cluster at {address} does not answer ({err}) within {timeout:.0f} s. Start it "
                          "with `ray start --head` on the head node, check the address, or leave --address out to "
                          "run on this machine.") from None


def _connect(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the sweep runs on Ray, which is not installed: pip install '.[cluster]' "
                          "(or ray==2.60.0).") from None
    if not ray.is_initialized():
        if address is not None:
            _check_address(address)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray


def _check_resources(ray: Any, grid: SweepGrid) -> None:
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_gpus = max((resources.get("GPU", 0.0) for resources in nodes), default=0.0)
    most_cpus = max((resources.get("CPU", 0.0) for resources in nodes), default=0.0)
    if grid.gpus_per_task > most_gpus:
        raise ConfigError(f"--gpus-per-task {grid.gpus_per_task:g} but no node of the cluster has more than "
                          f"{most_gpus:g} GPU(s); ask for at most {most_gpus:g} (0 runs on CPUs).")
    if grid.cpus_per_task > most_cpus:
        raise ConfigError(f"--cpus-per-task {grid.cpus_per_task:g} but no node has more than {most_cpus:g} CPUs.")


def sweep(grid: SweepGrid, address: str | None = None, progress: bool = True) -> Any:
    """Run ``grid`` as Ray tasks (local Ray, or the cluster at ``address``) into run folders, resume
    what a stopped sweep left, and return the accuracy table: mean and 95% CI per cell and the paired
    difference against the baseline (a pandas DataFrame; also ``OUT/accuracy_table.csv``)."""
    from tqdm import tqdm

    from cdfsl_core.compare import accuracy_table
    from cdfsl_core.errors import RunInterrupted
    from cdfsl_core.runner import load_plan, summarize

    grid.validate()
    ray = _connect(address)
    _check_resources(ray, grid)
    cells = plan_sweep(grid, device="cuda" if grid.gpus_per_task > 0 else "cpu")
    threads = max(1, math.floor(grid.cpus_per_task))
    task = ray.remote(_shard).options(num_cpus=grid.cpus_per_task, num_gpus=grid.gpus_per_task,
                                      max_retries=grid.max_retries, retry_exceptions=False)
    pending = {}
    for cell in cells:
        for start in range(0, len(cell.todo), grid.shard):
            shard = list(cell.todo[start:start + grid.shard])
            pending[task.remote(str(cell.folder), shard, threads, grid.episode_batch, grid.gpus_per_task or 1.0)] = len(shard)
    bar = tqdm(total=sum(len(c.todo) for c in cells), desc=f"sweep of {len(cells)} runs", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ray.get(done[0])  # raises if the task failed after its retries
            bar.update(pending.pop(done[0]))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise RunInterrupted(f"the sweep in {grid.out} was stopped; every finished episode is saved. Rerun the same "
                             "command to resume.") from None
    finally:
        bar.close()
    runs: dict[tuple[str, int, str], list[Path]] = {}
    for cell in cells:
        summarize(load_plan(cell.folder, device=_planned_device(cell.folder)))
        runs.setdefault((cell.dataset, cell.shots, cell.method), []).append(cell.folder)
    table = accuracy_table(runs, grid.baseline or grid.methods[0])
    Path(grid.out).mkdir(parents=True, exist_ok=True)
    write_table(table, Path(grid.out) / "accuracy_table.csv")
    return table


def _planned_device(folder: Path) -> Any:
    """The device a prepared run's manifest records (a CPU-only driver summarises GPU runs)."""

    import torch

    return torch.device(RunFolder(folder).manifest()["device"])


# --------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    defaults = SweepGrid()
    result = parser("python -m cdfsl_core.sweep", __doc__)
    result.add_argument("--grid", type=Path, default=None, help="a TOML file of the grid (flags given here win)")
    grid = result.add_argument_group("the grid (defaults: the papers' protocol on the embedded world)")
    grid.add_argument("--datasets", nargs="+", default=None, help=f"datasets (None: {' '.join(defaults.datasets)})")
    grid.add_argument("--shots", type=positive_int, nargs="+", default=None, help="shot settings (None: 1 5)")
    grid.add_argument("--methods", nargs="+", default=None,
                      help=f"adaptation/intervention pairs (None: {' '.join(defaults.methods)})")
    grid.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, help="episode seeds (None: 0)")
    grid.add_argument("--episodes", type=positive_int, default=None,
                      help="episodes per run (None: the papers', 800 for 1-shot and 400 for 5-shot)")
    grid.add_argument("--ways", type=positive_int, default=None, help=f"classes per episode (None: {defaults.ways})")
    grid.add_argument("--queries", type=positive_int, default=None, help=f"queries per class (None: {defaults.queries})")
    grid.add_argument("--short-class-policy", choices=("error", "skip", "cycle"), default=None,
                      help="a class with fewer than shots + queries images (None: error)")
    grid.add_argument("--steps", type=non_negative_int, default=None, help=f"training steps (None: {defaults.steps})")
    grid.add_argument("--lora-rank", type=positive_int, default=None, help=f"LoRA rank (None: {defaults.lora_rank})")
    grid.add_argument("--logit-scale", type=logit_scale, default=None, help="a number, 'learned' or 'auto' (None: auto)")
    grid.add_argument("--augment", action="store_true", default=None, help="the authors' 5 views per support image")
    grid.add_argument("--model", default=None, help=f"open_clip architecture (None: {defaults.model})")
    grid.add_argument("--pretrained", type=pretrained_arg, default=None,
                      help=f"tag or weights file; 'none': random (None: {defaults.pretrained})")
    grid.add_argument("--data-root", default=None, help="the datasets' root (None: $CDFSL_DATA_ROOT)")
    grid.add_argument("--precision", choices=PRECISIONS, default=None, help="None: auto")
    grid.add_argument("--baseline", default=None, help="method of the paired differences (None: the first)")
    grid.add_argument("--out", default=None, help=f"the sweep's folder (None: {defaults.out})")
    grid.add_argument("--max-retries", type=non_negative_int, default=None,
                      help=f"retries of a task whose worker died (None: {defaults.max_retries})")
    ray_group = result.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None, help="a Ray cluster, HOST:PORT or 'auto' (None: this machine)")
    ray_group.add_argument("--shard", type=positive_int, default=None, help=f"episodes per task (None: {defaults.shard})")
    ray_group.add_argument("--episode-batch", type=episode_batch_arg, default=None,
                           help="episodes of a task trained together in one forward, at most --shard (the same results "
                                "for any value; None: auto, by the device)")
    ray_group.add_argument("--cpus-per-task", type=positive_float, default=None, help=f"None: {defaults.cpus_per_task:g}")
    ray_group.add_argument("--gpus-per-task", type=non_negative_float, default=None,
                           help=f"GPUs per task; fractions share a GPU (None: {defaults.gpus_per_task:g}, CPU only)")
    return result


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in (f.name for f in fields(SweepGrid)) if getattr(args, name, None)
             is not None}
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in given.items()}
    if "pretrained" in given:
        given["pretrained"] = pretrained_value(given["pretrained"])
    if args.grid is not None:
        grid = load_grid(args.grid, **given)
    else:
        grid = SweepGrid(**given)
        grid.validate()
    check_writable_folder(grid.out, "--out")
    table = sweep(grid, args.address)
    print_table(table)
    print(f"\nrun folders and accuracy_table.csv in {grid.out}")
    return 0


def print_table(table: Any) -> None:
    """The accuracy table as ``make demo`` prints it: accuracy with CI per cell, then paired differences."""
    view = table.assign(
        accuracy=[format_mean_ci(m, c) for m, c in zip(table["mean"], table["ci95"])],
        vs_baseline=[format_mean_ci(d, c, signed=True) for d, c in zip(table["diff_vs_baseline"], table["diff_ci95"])])
    print(view.pivot_table(index=["domain", "shots"], columns="method", values="accuracy", aggfunc="first",
                           sort=False).to_string())
    baseline = table.loc[table["diff_vs_baseline"].eq(0) & table["diff_ci95"].eq(0), "method"]
    name = baseline.iloc[0] if len(baseline) else "the baseline"
    others = view[view["method"] != name]
    if len(others):
        print(f"\npaired differences against {name} (points, 95% CI):")
        print(others.pivot_table(index=["domain", "shots"], columns="method", values="vs_baseline", aggfunc="first",
                                 sort=False).to_string())


if __name__ == "__main__":
    raise SystemExit(main())
