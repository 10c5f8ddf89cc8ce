"""The `vgpt` command: every verb's command-line code lives in this package, one module each.

A verb module exposes `main(argv: list[str]) -> int` and is imported only when
run, so `vgpt --help` stays fast and one broken extra (say, ray not installed)
does not break the others. Errors of bad input (`ConfigError`: a wrong key,
value, file or argument) are reported by one handler for every verb,
`reports_bad_input`, which wraps each verb's `main`: one line `vgpt <verb>:
<what is wrong>` on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

from jobconfig.errors import ConfigError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("orchestration.cli.quickstart", "the whole system on one CPU box: videos -> latents -> 4 stages "
                                                   "-> predictions and a report"),
    "predict": ("orchestration.cli.predict", "predict the next frames of videos with an export; PSNR/SSIM/FVD"),
    "train": ("orchestration.cli.train", "train one stage or the four-stage curriculum (DeepSpeed)"),
    "train-debug": ("orchestration.cli.train_debug", "deprecated: `vgpt train --config configs/debug.yaml` "
                                                     "(synthetic moving-square latents, one process)"),
    "precompute": ("orchestration.cli.precompute", "encode videos into latent shards (a Ray job; local Ray if none)"),
    "launch": ("orchestration.cli.launch", "write torchrun/DeepSpeed/Slurm/Kubernetes/Ray launch files for one stage"),
    "sweep": ("orchestration.cli.sweep", "scaling-law sweep: `run` trials on Ray, `fit` L(N, D) and recommend N, D"),
    "ckpt": ("orchestration.cli.ckpt", "list, verify, inspect, export, reshard or prune a run's checkpoints"),
    "config": ("orchestration.cli.config", "print the resolved config after presets and overrides"),
    "convert": ("orchestration.cli.convert", "the authors' released checkpoint <-> an export: from-reference, "
                                             "to-reference"),
}
BAD_INPUT = 2  # exit status of every verb for a ConfigError


def reports_bad_input(verb: str) -> Callable:
    """Decorator of every verb's `main`: the one place a ConfigError becomes a message and exit status 2."""
    def wrap(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def run(argv: list[str]) -> int:
            try:
                return int(main(argv) or 0)
            except ConfigError as e:
                print(f"vgpt {verb}: {e}", file=sys.stderr, flush=True)
                return BAD_INPUT
        run.reports_bad_input = True
        return run
    return wrap


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
        return BAD_INPUT
    return importlib.import_module(SUBCOMMANDS[name][0]).main(rest)
