"""One logging format for every process of a run, rank-aware.

Every module logs through `logging.getLogger(__name__)` (or the "vgpt" tree);
`setup` gives the "vgpt" logger and the modules of our packages one format,

    2026-11-30 09:12:03 INFO [rank 0] [stage1] step 10/200  loss 0.41 ...

with INFO to stdout and WARNING and above to stderr, as a cluster's log
collector expects. By default only rank 0 speaks, so a 512-rank job logs
one line per event, not 512; `VGPT_LOG_RANKS=all` (or `setup(all_ranks=True)`)
lets every rank log, each line tagged with its rank. Ranks come from the
launcher's RANK variable (torchrun, DeepSpeed, Slurm via our launch files)
unless given. Calling `setup` again only updates the rank: a curriculum
builds one Trainer per stage in one process.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
ALL_RANKS_ENV = "VGPT_LOG_RANKS"
PACKAGES = ("vgpt", "jobconfig", "data", "parallel", "pretrain", "orchestration")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.ERROR


class _Std(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a record is emitted (not when set up:
    pytest, notebooks and redirections swap them)."""

    def __init__(self, name: str):
        super().__init__(getattr(sys, name))
        self.name_ = name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.name_)
        super().emit(record)


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


_handlers: list[logging.Handler] = []
_filter = _RankFilter(0, False)


def setup(rank: int | None = None, all_ranks: bool | None = None, level: int = logging.INFO) -> None:
    """Configure our loggers (idempotent; a later call updates rank and all_ranks)."""
    _filter.rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    _filter.all_ranks = (os.environ.get(ALL_RANKS_ENV, "").lower() == "all") if all_ranks is None else all_ranks
    if _handlers:
        return
    out = _Std("stdout")
    out.addFilter(_Below(logging.WARNING))
    err = _Std("stderr")
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        h.addFilter(_filter)
        _handlers.append(h)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for h in _handlers:
            logger.addHandler(h)
        # records still reach the root logger's handlers (none in `vgpt`; a test's or notebook's capture)


def flush() -> None:
    for h in _handlers:
        h.flush()
