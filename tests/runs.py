"""How the tests run `vgpt`, and the tiny training runs several test files share.

Training runs go through a subprocess (`vgpt(...)`): a run initialises a process
group and DeepSpeed, whose global state must not leak into the test process.
Every other verb runs in process (`cli(...)`), where starting an interpreter
and importing torch and DeepSpeed would cost more than the command itself.

The runs that several files need are trained once per session by the fixtures
in tests/conftest.py (`one_rank_run`, `two_rank_zero2`, `rendered_torchrun`): a
test that changes a run works on a copy (`copy_run`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.sockets import descendants, listening

REPO = Path(__file__).resolve().parents[1]
# the debug model (2 layers, width 64) on synthetic latents, fp32 so that runs of other layouts compare closely
TINY = ["--config", str(REPO / "configs/debug.yaml"), "--parallel.precision=fp32", "--train.tensorboard=false",
        "--synthetic.frames=6", "--model.attention=blockwise"]
FAULTS = ("VGPT_FAULT_KILL", "VGPT_FAULT_CKPT")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# stage 1 of the debug model on synthetic latents, 3 steps, for the launch files `vgpt launch` renders
LAUNCH_TINY = ["--model.preset=debug", "--model.attention=blockwise", "--train.data=synthetic", "--train.steps=3",
               "--train.log_every=1", "--parallel.precision=fp32", "--parallel.sequence_parallel=1",
               "--parallel.activation_checkpointing=false", "--train.tensorboard=false"]
# fake credentials in the environment of the shared one-rank run: nothing it writes may contain them
AWS = {"AWS_ACCESS_KEY_ID": "AKIAVGPTLEAKCHECK0001", "AWS_SECRET_ACCESS_KEY": "vgpt-leak-check/secret+0002xyz"}
# the shared one-rank run: 10 steps, checkpoints at 5 and 10 (tests/conftest.py `one_rank_run`)
ONE_RANK = ["--train.steps=10", "--train.checkpoint_every=5", "--train.log_every=4"]
# a memory plan that refuses the tiny run: planned for an Ascend 910B at 320 x 320 latents, where the block-wise
# backend's scores of one frame alone exceed the device (tests/test_plan.py); the shared one-rank run starts it
# anyway with --plan.ignore=true, the override's start
PLAN_REFUSED = ["--plan.device=910b", "--plan.latent_size=[320,320]"]
# the shared two-rank ZeRO-2 run: 20 steps of 2 ranks x 1 row, a checkpoint every 5 steps (`two_rank_zero2`)
TWO_RANK_STEPS = 20
TWO_RANK_ZERO2 = [f"--train.steps={TWO_RANK_STEPS}", "--train.log_every=10", "--nproc=2", "--train.batch_size=1",
                  "--parallel.zero_stage=2", "--train.checkpoint_every=5"]


def env(extra: dict | None = None, unset: tuple[str, ...] = ()) -> dict:
    """The environment of a `vgpt` subprocess: CPU DeepSpeed, one thread per math library, no fault injected
    unless asked; `unset`: variables of this process it must not inherit."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), **ONE_THREAD)
    for k in (*FAULTS, *unset):
        e.pop(k, None)
    e.update(extra or {})
    return e


def vgpt(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`vgpt ARGS` in its own interpreter (for training: a process group and DeepSpeed per run)."""
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env(env_extra),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@dataclass
class Result:
    """What `cli` returns: the fields of subprocess.CompletedProcess that the tests read."""
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> Result:
    """`vgpt ARGS` in this process (every verb but training), its output captured like a subprocess's."""
    from orchestration.cli import main

    out, err = io.StringIO(), io.StringIO()
    # as in a fresh process started by a user: not a torchrun worker, whatever ran in this one before
    launched = {k: os.environ.pop(k) for k in TORCHRUN_ENV if k in os.environ}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.update(launched)
    return Result(rc, out.getvalue(), err.getvalue())


def train(out: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """A tiny run into `out` that must succeed."""
    res = vgpt("train", *TINY, f"--train.out_dir={out}", *args, env_extra=env_extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a shared run (the shared one must stay as trained)."""
    shutil.copytree(run, dest)
    return dest


def rows_by_step(out: Path) -> dict[int, list[int]]:
    """The global sample rows each step of a run trained on (metrics.jsonl; the last record of a step wins)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        rows[m["step"]] = m["sample_rows"]
    return rows


class Background:
    """The session's long subprocess jobs (bench/gpu.py --tiny, the quickstart, the example sweep), started
    when collection ends and run one at a time in a thread beside the tests, which run the quick tier first
    (tests/conftest.py): on 2 cores the quick tier leaves one mostly idle. A fixture takes its job's
    result (`result(name)`, waiting for it to end). A job's `vgpt precompute` or sweep starts a local Ray
    of its own (orchestration/local_ray.py), which never joins the `ray start` cluster of the precompute
    tests: they run beside it.
    While a job's process runs, the TCP sockets its process tree listens on are polled (tests/sockets.py):
    `listened(name)`, for the tests that show a local Ray listens on loopback only."""

    def __init__(self):
        self._jobs: dict[str, tuple[threading.Event, dict]] = {}
        self._queue: list[tuple[str, Callable[[], object]]] = []
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._current = ""
        self._listened: dict[str, set[str]] = {}

    def add(self, name: str, job: Callable[[], object]) -> None:
        self._jobs[name] = (threading.Event(), {})
        self._queue.append((name, job))

    def start(self) -> None:
        if self._queue and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="background-runs", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for name, job in self._queue:
            done, out = self._jobs[name]
            self._current = name
            try:
                out["value"] = job()
            except BaseException as e:  # noqa: BLE001 - handed to the fixture that waits for it
                out["error"] = e
            done.set()

    def queued(self, name: str) -> bool:
        return name in self._jobs

    def finished(self, name: str) -> bool:
        """Whether job `name` has ended (result(name) will not wait)."""
        return name in self._jobs and self._jobs[name][0].is_set()

    def result(self, name: str):
        done, out = self._jobs[name]
        done.wait()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def listened(self, name: str) -> set[str]:
        """Every address the processes of job `name` were seen listening on (after `result(name)`)."""
        return self._listened.get(name, set())

    def run(self, cmd: list[str], capture_output: bool = True, text: bool = True, timeout: int = 1200,
            **kw) -> subprocess.CompletedProcess:
        """subprocess.run (output captured, as text) for a job, in its own session, so that `stop` ends it
        with all it started."""
        assert capture_output and text, "a background job's output is captured as text"
        # one thread per math library: beside the tests, an OpenMP pool of one thread per core spins on
        # a core the tests hold (measured: the quickstart took over 10 minutes instead of 2)
        env = {**(kw.pop("env", None) or os.environ), **ONE_THREAD}
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True, **kw) as proc:
            self._proc = proc
            seen = self._listened.setdefault(self._current, set())
            result: dict = {}
            reader = threading.Thread(target=lambda: result.update(zip(("out", "err"), proc.communicate())))
            reader.start()
            try:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:  # bounded; ends with the process
                    seen.update(listening(descendants(proc.pid)))
                    time.sleep(1.0)  # a Ray's servers listen for the whole job: once a second sees them
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                reader.join()
            finally:
                self._proc = None
        return subprocess.CompletedProcess(cmd, proc.returncode, result.get("out", ""), result.get("err", ""))

    def stop(self) -> None:
        """End the running job (its whole process group) when the session ends before it does."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


BACKGROUND = Background()


class EarlySetup:
    """Slow fixture set-ups that need no test before them (the precompute tests' Ray head and input videos),
    begun in a thread when collection ends, beside the quick tier; the fixture takes the result (`take`,
    or makes it then, when the session did not begin it), and `close` undoes what no fixture took."""

    def __init__(self):
        self._begun: dict[str, tuple[Future, Callable[[object], None]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def begin(self, name: str, make: Callable[[], object], undo: Callable[[object], None]) -> None:
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="early-setup")
        self._begun[name] = (self._pool.submit(make), undo)

    def take(self, name: str, make: Callable[[], object]):
        begun = self._begun.pop(name, None)
        return begun[0].result() if begun is not None else make()

    def close(self) -> None:
        for future, undo in self._begun.values():
            with contextlib.suppress(BaseException):  # a set-up that failed has nothing to undo
                undo(future.result())
        self._begun.clear()


EARLY = EarlySetup()


def background_result(name: str, job: Callable[[Background], object]) -> tuple[object, set[str]]:
    """(result, addresses listened on) of the session's background job `name`; run now, in a Background of
    its own, when the session did not queue it (a file run alone). `job(bg)` runs it through `bg.run`."""
    bg = BACKGROUND
    if not bg.queued(name):
        bg = Background()
        bg.add(name, lambda: job(bg))
        bg.start()
    return bg.result(name), bg.listened(name)
