"""Run code in a forked child that is meant to die of SIGKILL, and say how it ended.

The kill harnesses (tests/async_kill_harness.py: a background checkpoint save; tests/reshard_kill_harness.py:
a resharded resume) fork a child at a point of a real trainer's life, let it SIGKILL itself at
the chosen write or read, and then restart in the parent as a run would. A child whose code raises
exits FAILED (its traceback printed), one whose code returns without being killed NOT_REACHED.
"""
from __future__ import annotations

import os
import signal
import traceback
from pathlib import Path
from typing import Callable

NOT_REACHED, FAILED = 3, 4  # the child's exit status: its code returned without being killed, or raised


def kill_self(marker: Path, point) -> None:
    """Record `point` in `marker`, then SIGKILL this process (in the child: the fault being tested)."""
    marker.write_text(str(point))
    os.kill(os.getpid(), signal.SIGKILL)


def run_until_killed(fn: Callable[[], None]) -> tuple[bool, str]:
    """Run `fn` in a forked child; (whether SIGKILL ended it, "signal N" or "exit N")."""
    pid = os.fork()
    if pid == 0:  # the child never returns
        try:
            fn()
            os._exit(NOT_REACHED)
        finally:
            traceback.print_exc()
            os._exit(FAILED)
    _, status = os.waitpid(pid, 0)
    signalled = os.WIFSIGNALED(status)
    ended = f"signal {os.WTERMSIG(status)}" if signalled else f"exit {os.WEXITSTATUS(status)}"
    return signalled and os.WTERMSIG(status) == signal.SIGKILL, ended
