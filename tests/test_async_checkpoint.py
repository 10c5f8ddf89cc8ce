"""Checkpoints that do not stall training and hold no pickle (issue 17, acceptance 1-2).

- SIGKILL at 20 points of a background save (any write of any file, just
  before the commit, after it), each kill recorded by the child as it dies: a
  restart (`Trainer.resume("auto")`, the one checkpoint-choice rule) always
  finds the newest complete checkpoint, `latest` never names an incomplete
  one, and the loss of the step after resuming equals the uninterrupted run's.
- No code path that loads a checkpoint this version writes calls torch.load or
  pickle: checked in the source (only the legacy reader may, with
  weights_only) and at run time (torch.load and the unpickler made to fail
  while a run resumes, and `vgpt ckpt inspect/export` read, this format).
- Checkpoints of earlier versions (DeepSpeed's .pt files) still load, after
  verification, with weights_only; a .pt carrying a pickled payload, with a
  manifest recomputed to match it, is refused and its code never runs.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = env()  # CPU DeepSpeed, one thread per math library, no fault switch inherited


def test_sigkill_during_background_saves_always_resumes_the_newest_complete(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tests/async_kill_harness.py"), str(tmp_path), "20", "17"],
                         capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    (control,) = [r["control"] for r in rows if "control" in r]
    (mid_commit,) = [r["mid_commit"] for r in rows if "mid_commit" in r]
    head, trials = rows[0], [r for r in rows[1:] if "control" not in r and "mid_commit" not in r]
    assert len(trials) == 20 and head["writes_per_save"] > 20
    for t in trials:
        assert t["killed"], t
        # SIGKILLed, at the point asked for (not a save that ended, or died, some other way)
        assert t["ended"] == "signal 9" and t["killed_at"] == str(t["point"]), t
        committed = t["point"] == "committed"
        # killed before its manifest: the save is skipped, named, and the older one is used
        assert t["chosen"] == ("step_00000004" if committed else "step_00000002"), t
        assert t["latest"] == t["chosen"], t  # `latest` never points at an incomplete checkpoint
        assert bool(t["skipped"]) != committed and all("manifest.json: missing" in s for s in t["skipped"]), t
        # the restarted run says what it skipped and why (`Trainer.resume("auto")`, as a restart does)
        assert len(t["warned"]) == len(t["skipped"]) and all(
            "step_00000004 is not usable" in w and "manifest.json: missing" in w for w in t["warned"]), t
        assert t["loss"] == t["reference"], t  # bitwise: the resumed step is the uninterrupted step
    assert {t["chosen"] for t in trials} == {"step_00000002", "step_00000004"}
    # killed between the commit's two writes: the manifest commits the save, `latest` (not yet moved) still
    # names a complete checkpoint, and the restart takes the newest
    t = mid_commit
    assert t["killed"] and t["ended"] == "signal 9" and t["killed_at"] == "mid_commit", t
    assert t["latest_complete"] and t["chosen"] == "step_00000004" and not t["skipped"], t
    assert t["loss"] == t["reference"], t
    assert all(t["latest_complete"] for t in trials), trials
    # a kill point past the last write is never reached: the harness sees it, it does not count it as a kill
    assert not control["killed"] and control["ended"] == "exit 3" and control["killed_at"] is None, control
    assert control["chosen"] == control["latest"] == "step_00000004" and not control["skipped"], control
    assert control["loss"] == control["reference"], control


# ---------------------------------------------------------------- no pickle
READERS = ["pretrain/checkpoint/sharded.py", "pretrain/checkpoint/manager.py", "pretrain/checkpoint/storage.py",
           "pretrain/checkpoint/portable.py", "pretrain/checkpoint/integrity.py", "pretrain/checkpoint/export.py",
           "pretrain/checkpoint/safetensors_stream.py", "pretrain/checkpoint/formats.py",
           "pretrain/checkpoint/full_state.py", "pretrain/checkpoint/optimizer_fragments.py",
           "pretrain/checkpoint/fragment_reader.py", "pretrain/checkpoint/resharded_load.py",
           "pretrain/checkpoint/reshard.py",
           "orchestration/cli/ckpt.py", "pretrain/training/trainer.py",
           "pretrain/training/resume_plan.py"]


def _calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler") and \
                isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle", "cPickle", "dill"):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"{path.name}:{node.lineno} import {n}" for n in names if n.split(".")[0] in ("pickle", "dill")]
    return found


def test_no_reader_of_the_current_format_can_unpickle():
    for rel in READERS:
        assert _calls(ROOT / rel) == [], rel
    # the one place that reads .pt files of earlier versions does it with weights_only=True only
    legacy = (ROOT / "pretrain/checkpoint/deepspeed_files.py").read_text()
    loads = [n for n in ast.walk(ast.parse(legacy)) if isinstance(n, ast.Call) and
             isinstance(n.func, ast.Attribute) and n.func.attr == "load" and getattr(n.func.value, "id", "") == "torch"]
    assert loads and all(any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                             for k in n.keywords) for n in loads)


NO_UNPICKLING = """
import pickle, sys, torch
def refuse(*a, **k):
    raise AssertionError("unpickling while reading a current-format checkpoint")
class Refusing(pickle.Unpickler):
    def load(self):
        refuse()
torch.load = refuse
pickle.load = pickle.loads = refuse
pickle.Unpickler = Refusing
sys.argv = ["vgpt"] + sys.argv[1:]
from orchestration.cli import main
sys.exit(main())
"""


def train(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs/debug.yaml"), "--parallel.device=cpu", f"--train.steps={steps}",
            "--train.checkpoint_every=2", "--train.tensorboard=false", "--train.async_checkpoint=true",
            f"--train.out_dir={out}", *extra]


def vgpt(*args: str, unpickling: bool = True) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "orchestration.cli"] if unpickling else [sys.executable, "-c", NO_UNPICKLING]
    return subprocess.run([*head, *args], capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)


def ckpt(capsys, *argv: str) -> tuple[int, str]:
    from orchestration.cli.ckpt import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out + err


def test_resume_inspect_and_export_never_unpickle(tmp_path, capsys, monkeypatch):
    import pickle

    import torch

    run = tmp_path / "run"
    assert vgpt(*train(run, 4)).returncode == 0
    resumed = vgpt(*train(run, 6), unpickling=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004 at step 4" in resumed.stdout
    ckpt_dir = run / "checkpoints" / "step_00000006"
    assert {p.name for p in ckpt_dir.iterdir()} >= {"rank-00000.safetensors", "model-tp00.safetensors", "engine.json"}
    assert not list(ckpt_dir.glob("*.pt"))

    def refuse(*a, **k):
        raise AssertionError("unpickling while reading a current-format checkpoint")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert ckpt(capsys, "inspect", str(run))[0] == 0
    rc, out = ckpt(capsys, "export", str(run), "--out", str(tmp_path / "x.safetensors"))
    assert rc == 0 and (tmp_path / "x.safetensors").is_file(), out


# ---------------------------------------------------------------- checkpoints of earlier versions
LEGACY = """
import os, sys, torch
from pathlib import Path
from jobconfig.loader import load_config
from pretrain.checkpoint.formats import Format
from pretrain.checkpoint.integrity import CheckpointError, write_manifest
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.training.trainer import Trainer
out, marker = Path(sys.argv[1]), sys.argv[2]
def config(steps):
    return load_config(Path("configs/debug.yaml"), ["--parallel.device=cpu", "--train.tensorboard=false",
                                                    f"--train.out_dir={out}", f"--train.steps={steps}"])
with Trainer(config(4)) as t:  # an earlier version's run: DeepSpeed's .pt files
    for _ in range(2):
        t.train_step()
    CheckpointManager(out / "checkpoints", write_format=Format.LEGACY_PT).save(t.engine, t.step, t.trainer_state())
with Trainer(config(3)) as t:  # this version resumes it (same layout: DeepSpeed's loader, weights_only)
    t.run()
# plant a payload in the biggest .pt and recompute the manifest, as someone with write access could
ckpt = out / "checkpoints" / "step_00000002"
victim = max(ckpt.glob("*.pt"), key=lambda p: p.stat().st_size)
state = torch.load(victim, weights_only=False)
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))
state["payload"] = Payload()
torch.save(state, victim)
write_manifest(ckpt, 2)
with Trainer(config(3)) as t:
    try:
        t.resume(str(ckpt))
        print("RESUMED FROM THE PLANTED CHECKPOINT")
    except CheckpointError as e:
        print(f"resume: {e}")
"""


def test_earlier_pt_checkpoints_load_and_a_planted_payload_is_refused(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    made = subprocess.run([sys.executable, "-c", LEGACY, str(run), str(marker)], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=ROOT)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "step_00000002 at step 2" in made.stdout  # the earlier version's checkpoint resumed
    ckpt_dir = run / "checkpoints" / "step_00000002"
    assert json.loads((ckpt_dir / "trainer_state.json").read_text())["layout"]["format"] == "deepspeed"
    assert (run / "checkpoints" / "step_00000003" / "engine.json").is_file()  # new saves: the new format
    # the payload with a recomputed manifest: the checksums match, every reader refuses it, nothing runs
    assert "resume: " in made.stdout and "refused" in made.stdout.split("resume: ")[1], made.stdout[-2000:]
    assert not marker.exists(), "the planted code ran during a resume"
    assert ckpt(capsys, "verify", str(run), "--step", "2")[0] == 0
    for args in (("inspect", str(run), "--step", "2"),
                 ("export", str(run), "--step", "2", "--out", str(tmp_path / "y.safetensors"))):
        try:
            rc, out = ckpt(capsys, *args)
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            rc, out = 1, str(e)
        assert rc != 0 and "refused" in out, out
        assert not marker.exists(), f"the planted code ran during ckpt {args[0]}"
