"""The `vgpt` command: every verb's command-line code lives in this package, one module each.

A verb module exposes `main(argv: list[str]) -> int` and is imported only when
run, so `vgpt --help` stays fast and one broken extra (say, ray not installed)
does not break the others. Errors of bad input (`ConfigError`: a wrong key,
value, file or argument) are reported by one handler for every verb,
`reports_bad_input`, which wraps each verb's `main`: one line `vgpt <verb>:
<what is wrong>` on stderr and exit status 2, never a traceback.

Every verb documents itself: `verb_parser` builds its argparse parser with the
module docstring as description and, for verbs that read a config,
every key of the typed config tree (type, default, one-line description, from
the dataclasses and their comments: jobconfig/help.py) in `--help`. `vgpt`
without a command prints the commands and exits 2, as argparse does.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from typing import Callable

from jobconfig.errors import AGENT_REPORTS_BAD_INPUT, BAD_INPUT, ConfigError
from jobconfig.help import OVERRIDE_FORM, format_keys
from parallel import logs

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
    "plan": ("orchestration.cli.plan", "will each stage fit: per-device peak memory by part, verdict, smallest "
                                       "fix, step time and tokens/s"),
    "config": ("orchestration.cli.config", "print the resolved config after presets and overrides"),
    "convert": ("orchestration.cli.convert", "the authors' released checkpoint <-> an export: from-reference, "
                                             "to-reference"),
}
# Called with each ConfigError before it becomes exit status BAD_INPUT. Under torchrun, __main__.py adds
# torch elastic's error handler, so the rank's error file names bad input as it names exceptions; under
# our own agent (AGENT_REPORTS_BAD_INPUT) that file is the only report, and the agent prints it once.
BAD_INPUT_HOOKS: list[Callable[[ConfigError], None]] = []


def reports_bad_input(verb: str) -> Callable:
    """Decorator of every verb's `main`: the one place a ConfigError becomes a message and exit status 2."""
    def wrap(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def run(argv: list[str]) -> int:
            try:
                return int(main(argv) or 0)
            except ConfigError as e:
                if not (BAD_INPUT_HOOKS and os.environ.get(AGENT_REPORTS_BAD_INPUT)):
                    print(f"vgpt {verb}: {e}", file=sys.stderr, flush=True)
                for hook in BAD_INPUT_HOOKS:
                    hook(e)
                return BAD_INPUT
        run.reports_bad_input = True
        return run
    return wrap


CONFIG_HELP = ("a job YAML (e.g. configs/debug.yaml, configs/stages/stage1.yaml) or a curriculum with "
               f"`stages:` (configs/pretrain.yaml); {OVERRIDE_FORM} arguments override its keys (listed below)")


class VerbParser(argparse.ArgumentParser):
    """argparse for one verb; `config_keys` (a callable giving help text) is appended to `--help`
    only when help is shown, so a run does not pay for reading the config classes' sources."""

    def __init__(self, *args, config_keys: Callable[[], str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._config_keys = config_keys

    def _usage_with_overrides(self, text: str) -> str:
        if not self._config_keys:
            return text
        usage, sep, rest = text.partition("\n\n")
        return f"{usage.rstrip()} [{OVERRIDE_FORM} ...]\n" + (sep[1:] + rest if sep else "")

    def format_usage(self) -> str:
        return self._usage_with_overrides(super().format_usage())

    def format_help(self) -> str:
        text = self._usage_with_overrides(super().format_help())
        return text + "\n" + self._config_keys() + "\n" if self._config_keys else text


def verb_parser(verb: str, doc: str, config: type | None = None, flag_prefix: str = "",
                only: tuple[str, ...] = (), more: tuple[tuple[type, str], ...] = ()) -> VerbParser:
    """The parser of `vgpt <verb>`: `doc` (the module docstring) as description; with `config` (a
    dataclass tree), every key it takes as `--{flag_prefix}section.key=value` listed in `--help`
    (`only`: these top-level sections); `more`: further (tree, flag prefix) pairs listed after it."""
    def keys() -> str:
        parts = [format_keys(config, flag_prefix, only)]
        for tree, prefix in more:
            parts.append(format_keys(tree, prefix, title=f"keys of the {prefix.rstrip('.')} description, set with "
                                                         f"--{prefix}key=value:"))
        return "\n\n".join(parts)
    return VerbParser(prog=f"vgpt {verb}", description=doc, config_keys=keys if config is not None else None)


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: vgpt <command> [args...]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in sorted(SUBCOMMANDS.items())]
    lines += ["", "`vgpt <command> --help` lists a command's options and every config key it takes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"{_usage()}\n\nvgpt: error: a command is required", file=sys.stderr)
        return BAD_INPUT
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vgpt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return BAD_INPUT
    logs.setup()  # one format for every command's log lines (rank from the launcher's RANK)
    return importlib.import_module(SUBCOMMANDS[name][0]).main(rest)
