"""`vgpt sweep`: bad grids fail before any trial (acceptance 4); a real tiny sweep on a local
Ray runs end to end and fits (acceptance 2); a killed sweep resumes without re-running its
finished trials and ends with the results of an uninterrupted one (acceptance 3)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.cli.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/sweep/tiny.yaml")


@pytest.mark.parametrize("override, message", [
    ("--grid.sizes=[{name: debug}, {name: s9}]", "unknown model size 's9'"),
    ("--grid.sizes=[{name: big, preset: nope}]", "unknown model size 'nope'"),
    ("--grid.budgets=[20, 3]", "budget 3 samples is smaller than one batch"),
])
def test_bad_grid_fails_before_any_trial(override, message, tmp_path, capsys):
    import ray

    out = tmp_path / "sweep"
    rc = sweep_main(["run", "--config", TINY, f"--out_dir={out}", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not ray.is_initialized()


def test_bad_model_override_names_the_key(tmp_path, capsys):
    rc = sweep_main(["run", "--config", TINY, f"--out_dir={tmp_path / 's'}",
                     "--grid.sizes=[{name: debug, model: {num_heads: 3}}]"])
    assert rc == 2 and "num_heads" in capsys.readouterr().err


def _sweep(action: str, out: Path, env: dict | None = None, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestration.cli", "sweep", action, "--config", TINY, f"--out_dir={out}",
           "--fit.bootstrap=20", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _results(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full"
    p = _sweep("run", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


@pytest.mark.slow
def test_tiny_sweep_runs_fits_and_plots(full_sweep):
    out, log = full_sweep
    results = _results(out)
    assert len(results) == 6 and "6/6 trials done" in log
    assert {(r["size"], r["budget"]) for r in results.values()} == \
        {(s, b) for s in ("xs", "s", "debug") for b in (20, 40)}
    for r in results.values():
        assert r["N"] > 0 and r["D"] > 0 and r["flops"] > r["flops_6nd"] > 0 and r["eval_loss"] > 0
        assert len(r["curve"]) == r["budget"] // r["batch_size"] == r["steps"]
    by = {(r["size"], r["budget"]): r for r in results.values()}
    assert by[("xs", 20)]["N"] < by[("s", 20)]["N"] < by[("debug", 20)]["N"]
    p = _sweep("fit", out)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("loss_vs_compute.png", "isoflop.png", "frontier.png"):
        assert (out / "fit" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "fit" / "report.md").read_text()
    assert "| alpha |" in report and "N_opt" in report
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert set(fit["params"]) == {"E", "A", "B", "alpha", "beta"} and fit["points"] == 6


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(full_sweep, tmp_path):
    full, _ = full_sweep
    out = tmp_path / "killed"
    p = _sweep("run", out, {"VGPT_SWEEP_FAULT_EXIT_AFTER": "2"})
    assert p.returncode == 3, p.stdout + p.stderr
    first = _results(out)
    assert len(first) == 2
    exports = {k: out / "trials" / k / "export" / "model.safetensors" for k in first}
    stamps = {k: e.stat().st_mtime_ns for k, e in exports.items()}

    p = _sweep("run", out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 finished earlier, 4 to run" in p.stdout
    assert {k: e.stat().st_mtime_ns for k, e in exports.items()} == stamps  # not re-run
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    resumed, reference = _results(out), _results(full)
    assert set(resumed) == set(reference)
    for k, r in reference.items():
        mine = resumed[k]
        for field in ("size", "budget", "lr", "batch_size", "steps", "N", "D", "flops"):
            assert mine[field] == r[field], (k, field)
        assert mine["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-6, abs=1e-7)
        assert [c["loss"] for c in mine["curve"]] == pytest.approx([c["loss"] for c in r["curve"]], rel=1e-6)

    p = _sweep("run", out)  # everything finished: nothing runs, Ray is not even started
    assert p.returncode == 0 and "0 to run" in p.stdout and len((out / "results.jsonl").read_text().splitlines()) == 6


def test_results_store_keeps_whole_lines_only(tmp_path):
    from orchestration.sweep.runner import ResultsStore

    store = ResultsStore(str(tmp_path / "sw"))
    store.append({"key": "a", "eval_loss": 1.0})
    with open(tmp_path / "sw" / "results.jsonl", "a") as f:
        f.write('{"key": "b", "eval_lo')  # a driver killed mid-write
    assert [r["key"] for r in store.read()] == ["a"]
    store.append({"key": "c", "eval_loss": 0.5})
    assert [r["key"] for r in store.read()] == ["a", "c"]


def test_results_store_on_s3(s3_bucket):
    from orchestration.sweep.runner import ResultsStore

    fs, opts, bucket = s3_bucket
    import fsspec
    fsspec.config.conf["s3"] = opts
    try:
        store = ResultsStore(f"s3://{bucket}/sweeps/tiny")
        store.append({"key": "a"})
        store.append({"key": "b"})
        assert [r["key"] for r in ResultsStore(f"s3://{bucket}/sweeps/tiny").read()] == ["a", "b"]
    finally:
        fsspec.config.conf.pop("s3", None)
