"""The `vgpt` command. Each subcommand lives in its own module and is imported
only when run, so `vgpt --help` stays fast and one broken extra (say, ray not
installed) does not break the others.

A subcommand module exposes `main(argv: list[str]) -> int`.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("orchestration.quickstart", "the whole system on one CPU box: videos -> latents -> 4 stages -> "
                                               "predictions and a report"),
    "predict": ("orchestration.predict_cli", "predict the next frames of videos with an export; PSNR/SSIM/FVD"),
    "train-debug": ("pretrain.debug_run", "train the model on synthetic moving-square latents (one process)"),
    "train": ("pretrain.train_cli", "train one stage or the four-stage curriculum (DeepSpeed)"),
    "precompute": ("orchestration.precompute_job", "encode videos into latent shards (a Ray job; local Ray if none)"),
    "launch": ("orchestration.launch", "write torchrun/DeepSpeed/Slurm/Kubernetes/Ray launch files for one stage"),
    "sweep": ("orchestration.sweep", "scaling-law sweep: `run` trials on Ray, `fit` L(N, D) and recommend N, D"),
    "ckpt": ("orchestration.ckpt_cli", "list, verify, inspect, export or prune a run's checkpoints"),
    "config": ("orchestration.show_config", "print the resolved config after presets and overrides"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: vgpt <command> [args...]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in sorted(SUBCOMMANDS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vgpt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
