"""Standard logging (issue 18, acceptance 3): one format, rank-aware; W&B scalars in an offline run.

The rank filter is checked in process (rank 0 speaks, other ranks only on
request or for errors, each line naming its rank). W&B: a real `vgpt train`
with `train.wandb` and WANDB_MODE=offline; the offline run file (W&B's
LevelDB-style record log of protobuf records) is read back and its history
must hold every step's loss as metrics.jsonl has it.
"""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from parallel import logs
from tests.runs import env

ROOT = Path(__file__).resolve().parents[1]


def test_rank_zero_speaks_other_ranks_on_request(capsys):
    log = logging.getLogger("pretrain.training.trainer")
    logs.setup(rank=1, all_ranks=False)
    try:
        log.info("hello from a worker")
        log.error("a worker failed")
        out, err = capsys.readouterr()
        assert "hello from a worker" not in out and "[rank 1] a worker failed" in err  # errors always pass
        logs.setup(rank=1, all_ranks=True)
        log.info("now every rank")
        out, _ = capsys.readouterr()
        line = out.strip().splitlines()[-1]
        assert line.endswith("INFO [rank 1] now every rank"), line  # date time LEVEL [rank r] message
        logs.setup(rank=0, all_ranks=False)
        log.warning("to stderr")
        out, err = capsys.readouterr()
        assert "WARNING [rank 0] to stderr" in err and "to stderr" not in out
    finally:
        logs.setup(rank=0, all_ranks=False)


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run: 32 KiB blocks of records (crc32, length, type; FULL/FIRST/
    MIDDLE/LAST) after a 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_scalars(tmp_path):
    import wandb  # noqa: F401 - a dev dependency: a broken install fails here instead of skipping
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "train", "--config", str(ROOT / "configs/debug.yaml"),
                          "--parallel.device=cpu", "--train.steps=4", "--train.tensorboard=false",
                          "--train.wandb=vgpt-test", f"--train.out_dir={out}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=env({"WANDB_MODE": "offline", "WANDB_SILENT": "true"}))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))
    logged = [row["debug/loss"] for row in wandb_history(runs[0]) if "debug/loss" in row]
    expected = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected, rel=1e-6) and len(logged) == 4
    assert "INFO [rank 0] [debug] step      4/4" in res.stdout
