"""Fine-tune and evaluate a method over an episode file: ``python -m cdfsl_core.finetune``.

    python -m cdfsl_core.finetune --dataset eurosat --data-root /data --model ViT-B-16 \\
        --pretrained openai --adaptation coop+lora --intervention tir --shots 1 --episodes 800 \\
        --out runs/eurosat_tir_1shot

With no arguments it runs the embedded default (the shipped CLIP on ``synthetic-crops``).
Rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from cdfsl_core.episodes import SHORT_CLASS_POLICIES, EpisodeConfig
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import ADAPTATIONS, INTERVENTIONS, MethodConfig
from cdfsl_core.models import PRECISIONS
from cdfsl_core.runner import DataConfig, ModelConfig, RunConfig, TrainConfig, run


def default_episode_file(dataset: str, episodes: EpisodeConfig) -> Path:
    """Shared between runs, so every method of a comparison sees the same episodes."""
    e = episodes
    return Path("episodes") / f"{dataset}_{e.n_way}w{e.k_shot}s{e.n_query}q_{e.n_episodes}ep_seed{e.seed}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cdfsl_core.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic-crops")
    parser.add_argument("--data-root", default=None, help="data root (default: $CDFSL_DATA_ROOT)")
    parser.add_argument("--model", default="cdfsl-synth-vit")
    parser.add_argument("--pretrained", default="synthetic", help="tag or weights file ('none': random weights)")
    parser.add_argument("--adaptation", choices=ADAPTATIONS, default="coop+lora")
    parser.add_argument("--intervention", choices=INTERVENTIONS, default="none")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-class-policy", choices=SHORT_CLASS_POLICIES, default="error")
    parser.add_argument("--episode-file", default=None, help="default: episodes/<dataset>_<N>w<K>s<Q>q_<n>ep_seed<s>.json")
    parser.add_argument("--steps", type=int, default=100, help="training steps per episode")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--logit-scale", default="auto", help="number, 'learned', or 'auto' (2 for 1-shot, 4 otherwise)")
    parser.add_argument("--augment", action="store_true", help="the authors' 5 views per support image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="'auto': bf16 autocast on CUDA, fp32 on CPU; 'bf16' or 'fp32' on any device")
    parser.add_argument("--allow-mixed-precision", action="store_true",
                        help="resume a run on another device type or precision than its first episodes")
    parser.add_argument("--out", required=True, help="run folder")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    episodes = EpisodeConfig(args.ways, args.shots, args.queries, args.episodes, args.seed, args.short_class_policy)
    if args.logit_scale == "auto":
        scale: float | str = 2.0 if args.shots == 1 else 4.0
    elif args.logit_scale == "learned":
        scale = "learned"
    else:
        scale = float(args.logit_scale)
    episode_file = args.episode_file or str(default_episode_file(args.dataset, episodes))
    return RunConfig(
        model=ModelConfig(args.model, None if args.pretrained == "none" else args.pretrained, args.device, args.precision),
        data=DataConfig(args.dataset, args.data_root, {}, episode_file),
        episodes=episodes,
        method=MethodConfig(args.adaptation, args.intervention, logit_scale=scale,
                            lora=LoRAConfig(rank=args.lora_rank)),
        train=TrainConfig(steps=args.steps, augment=args.augment),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    summary = run(config_from_args(args), args.out, allow_mixed_precision=args.allow_mixed_precision)
    print(json.dumps(summary, indent=2))
    print(f"{100 * summary['mean_accuracy']:.2f} +- {100 * summary['ci95']:.2f} % over {summary['episodes']} episodes; run folder {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
