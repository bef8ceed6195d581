"""Fine-tune and evaluate a method over an episode file: ``python -m cdfsl_core.finetune``.

    python -m cdfsl_core.finetune --dataset eurosat --data-root /data --model ViT-B-16 \
        --pretrained openai --adaptation coop+lora --intervention tir --shots 1 --episodes 800 \
        --out runs/eurosat_tir_1shot

With no arguments but --out it runs the embedded default (the shipped CLIP on synthetic-crops).
Rerunning the same command resumes an interrupted run; everything is checked before the run
folder is written, and paths are stored absolute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cdfsl_core import protocol
from cdfsl_core.cli import (
    add_episode_arguments,
    command,
    episode_batch_arg,
    logit_scale,
    non_negative_int,
    parser,
    positive_int,
    pretrained_arg,
    pretrained_value,
)
from cdfsl_core.config import episode_config, episode_file_name, run_config
from cdfsl_core.episodes import EpisodeConfig
from cdfsl_core.models import PRECISIONS  # models.py imports torch and open_clip only where used
from cdfsl_core.names import ADAPTATIONS, INTERVENTIONS
from cdfsl_core.stats import format_mean_ci


def default_episode_file(dataset: str, episodes: EpisodeConfig) -> Path:
    """Shared between runs, so every method of a comparison sees the same episodes."""
    return Path("episodes") / episode_file_name(dataset, episodes)


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m cdfsl_core.finetune", __doc__)
    data = result.add_argument_group("data and episodes")
    data.add_argument("--dataset", default="synthetic-crops", help="registered dataset (python -m cdfsl_core.data list)")
    data.add_argument("--data-root", default=None, help="folder holding the datasets (None: $CDFSL_DATA_ROOT)")
    add_episode_arguments(data)
    data.add_argument("--episode-file", default=None,
                      help="episode file to use or create (None: episodes/<dataset>_<N>w<K>s<Q>q_<n>ep_seed<s>.json)")
    model = result.add_argument_group("model")
    model.add_argument("--model", default="cdfsl-synth-vit", help="open_clip architecture (python -m cdfsl_core.models list)")
    model.add_argument("--pretrained", type=pretrained_arg, default="synthetic",
                       help="tag or local weights file; 'none': random weights")
    model.add_argument("--tokenizer", default=None,
                       help="a folder with the model's Hugging Face tokenizer files (SigLIP/SigLIP2 need one offline); "
                            "'none': load the vision side alone (methods that need text then stop with a message)")
    model.add_argument("--device", default="auto", help="'auto' (a GPU when there is one), 'cpu' or 'cuda'")
    model.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="'auto': bf16 autocast on CUDA, fp32 on CPU; 'bf16' or 'fp32' on any device")
    method = result.add_argument_group("method and training")
    method.add_argument("--adaptation", choices=ADAPTATIONS, default="coop+lora", help="what trains")
    method.add_argument("--intervention", default="none",
                        help=f"token intervention: {', '.join(INTERVENTIONS)}, or another registered one")
    method.add_argument("--steps", type=non_negative_int, default=protocol.STEPS,
                        help="full-batch training steps per episode (0 only with --adaptation zeroshot)")
    method.add_argument("--lora-rank", type=positive_int, default=protocol.LORA_RANK, help="LoRA rank r")
    method.add_argument("--logit-scale", type=logit_scale, default="auto",
                        help="s in s * cos: a positive number, 'learned' (CLIP's), or 'auto' (2 for 1-shot, 4 otherwise)")
    method.add_argument("--augment", action="store_true", help="the authors' 5 views per support image")
    method.add_argument("--trajectory-steps", type=non_negative_int, nargs="+", default=(),
                        help="measure the queries at these training steps (0: before training; e.g. 0 10 25 50 100): "
                             "accuracy, the intervention's statistics and the token diagnostics, kept in each episode "
                             "line (python -m analysis.trajectory RUN draws them)")
    method.add_argument("--episode-batch", type=episode_batch_arg, default="auto",
                        help="episodes trained together in one forward (the same results for any value; a run may "
                             "resume with another): a number, or 'auto' (on a GPU as many as "
                             f"{protocol.CUDA_MEMORY_SHARE} of its free memory holds, at most "
                             f"{protocol.EPISODE_BATCH['cuda']}; on "
                             f"the CPU up to {protocol.EPISODE_BATCH['cpu']}, keeping a step at most "
                             f"{protocol.CPU_BATCH_IMAGES} support images: 8 for 5-way 1-shot, 1 for 5-shot)")
    runs = result.add_argument_group("run folder")
    runs.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    runs.add_argument("--save-states", action="store_true",
                      help="keep each episode's trained parameters in RUN/states/ (for run_diagnostics and --export-merged)")
    runs.add_argument("--export-merged", type=Path, default=None,
                      help="after the run, write the fine-tuned model of one episode (LoRA folded into the weights) "
                           "to this .safetensors file, for --pretrained and analysis.cka --compare-with")
    runs.add_argument("--export-merged-episode", type=non_negative_int, default=None,
                      help="the episode --export-merged writes (default 0; needs --export-merged)")
    runs.add_argument("--allow-mixed-precision", action="store_true",
                      help="resume a run on another device type or precision than its first episodes")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported


def config_from_args(args: argparse.Namespace):
    """The :class:`~cdfsl_core.config.RunConfig` of the command line (:func:`cdfsl_core.protocol.run_config`),
    with absolute paths."""
    episodes = episode_config(args.shots, args.episodes, args.seed, args.ways, args.queries,
                                       args.short_class_policy)
    config = run_config(
        args.dataset, args.shots, args.adaptation, args.intervention, episodes=episodes.n_episodes, steps=args.steps,
        seed=args.seed, model=args.model, pretrained=pretrained_value(args.pretrained),
        device=args.device, precision=args.precision, data_root=args.data_root, tokenizer=args.tokenizer,
        episode_file=args.episode_file or str(default_episode_file(args.dataset, episodes)),
        scale=None if args.logit_scale == "auto" else args.logit_scale, lora_rank=args.lora_rank,
        augment=args.augment, ways=args.ways, queries=args.queries, short_class_policy=args.short_class_policy,
        trajectory_steps=args.trajectory_steps)
    return config.with_absolute_paths()


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from cdfsl_core.runner import run

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.device == "auto" and not torch.cuda.is_available():
        print("device auto: no CUDA device is available, running on the CPU in fp32 (--device cpu says so explicitly).",
              file=sys.stderr)
    if (args.model, args.pretrained) == ("cdfsl-synth-vit", "synthetic"):
        print("model: cdfsl-synth-vit / synthetic, the embedded toy CLIP (the default); pass --model and --pretrained "
              "for another.", file=sys.stderr)
    from cdfsl_core.errors import ConfigError

    if args.export_merged_episode is not None and args.export_merged is None:
        raise ConfigError("--export-merged-episode needs --export-merged FILE.safetensors (the file to write it to).")
    if args.export_merged is not None:  # checked before the run, not after it
        from cdfsl_core.paths import check_writable_file

        args.export_merged_episode = args.export_merged_episode or 0
        n_episodes = config_from_args(args).episodes.n_episodes
        if args.export_merged_episode >= n_episodes:
            raise ConfigError(f"--export-merged-episode {args.export_merged_episode}: the run has episodes "
                              f"0..{n_episodes - 1}.")
        if args.export_merged.suffix != ".safetensors":
            raise ConfigError(f"--export-merged {args.export_merged}: expected a .safetensors file name.")
        check_writable_file(args.export_merged, "--export-merged")
    summary = run(config_from_args(args), args.out, allow_mixed_precision=args.allow_mixed_precision,
                  save_states=args.save_states or args.export_merged is not None, episode_batch=args.episode_batch)
    if args.export_merged is not None:
        from cdfsl_core.export import export_merged

        written = export_merged(args.out, args.export_merged_episode, args.export_merged)
        print(f"merged checkpoint of episode {args.export_merged_episode}: {written} (load it with "
              f"--pretrained {written}, e.g. analysis.cka --compare-with)", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    print(f"{format_mean_ci(summary['mean_accuracy'], summary['ci95'], digits=2)} % over {summary['episodes']} episodes; "
          f"run folder {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
