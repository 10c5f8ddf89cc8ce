"""`vgpt sweep`: bad grids and datasets fail before any trial; the example sweep (configs/sweep/example.yaml)
runs end to end on a local Ray on a small latent dataset made from real mp4 files (tests/sweep_latents.py),
is identifiable and reports its extrapolation error (issue 20, acceptance 5); its trials train on the
dataset less its held-out split, never on a held-out key, and are judged on that split by the training
evaluator (issue 27, acceptance 3); a killed sweep resumes without re-running its finished trials and
ends with the results of an uninterrupted one; old budgets-grid sweep dirs still fit; a size of several
GPUs splits its batch over one torchrun per trial."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.cli.sweep import main as sweep_main
from tests.runs import background_result
from tests.sockets import is_loopback

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/sweep/tiny.yaml")
EXAMPLE = str(REPO / "configs/sweep/example.yaml")
CLUSTER = str(REPO / "configs/sweep/cluster.yaml")
LATENT_VIDEOS = 256  # the example sweep's dataset: as many samples as its synthetic data has videos


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


def test_a_dataset_that_cannot_be_trained_on_fails_before_any_trial(tmp_path, capsys):
    """One line naming the key, before Ray: the GPU example's unset placeholder, a bucket name S3 would
    refuse, a root that does not exist or is no dataset, a base that trains on latents with no dataset."""
    import ray

    (tmp_path / "empty").mkdir()
    base = tmp_path / "latents.yaml"
    base.write_text("model: {preset: debug}\ntrain: {data: latents}\n")
    for args, message in [
        (["--config", CLUSTER], "dataset: 's3://<your-bucket>/latents' is a placeholder"),
        (["--config", TINY, "--dataset=s3://My_Bucket/latents"], "dataset: 's3://My_Bucket/latents' has no valid S3 "
                                                                 "bucket name"),
        (["--config", TINY, f"--dataset={tmp_path / 'nope'}"], f"dataset: {tmp_path / 'nope'} does not exist"),
        (["--config", TINY, f"--dataset={tmp_path / 'empty'}"], f"dataset: {tmp_path / 'empty'}/index.json: no "
                                                                "index.json"),
        (["--config", TINY, f"--base={base}"], f"dataset: empty, but {base} trains on train.data=latents"),
    ]:
        for action in ("plan", "run"):
            assert sweep_main([action, *args, f"--out_dir={tmp_path / 'sweep'}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"vgpt sweep: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "sweep").exists() and not ray.is_initialized()


def test_a_size_of_several_gpus_splits_its_batch_over_one_torchrun(tmp_path):
    """grid.sizes[].gpus > 1: the trial asks Ray for that many GPUs and runs one process per GPU
    (trial.launch_trial: one torchrun), each rank a share of the batch; the step count is the
    one-process plan's (the same rows per step). A batch that does not split is refused, naming the key.
    (A 2-rank trial on CPU was checked to give the 1-process trial's FLOPs and held-out loss.)"""
    from jobconfig.errors import ConfigError
    from jobconfig.loader import load_config
    from orchestration.sweep.config import SweepConfig
    from orchestration.sweep.trial import plan

    sizes = "--grid.sizes=[{name: xs, preset: debug, model: {hidden_size: 16, num_layers: 1, num_heads: 2, " \
            "mlp_size: 32}}, {name: s, preset: debug, model: {hidden_size: 32, num_layers: 1, num_heads: 2, " \
            "mlp_size: 64}, gpus: 2}]"
    one, two = (plan(load_config(TINY, [sizes.replace(", gpus: 2", g)], cls=SweepConfig)) for g in ("", ", gpus: 2"))
    assert [t["job"]["train"]["steps"] for t in one] == [t["job"]["train"]["steps"] for t in two]
    for a, b in zip(one, two):
        assert "nproc" not in a and b.get("nproc", 1) == (2 if b["size"] == "s" else 1)
        assert b["job"]["train"]["batch_size"] * b.get("nproc", 1) == a["job"]["train"]["batch_size"] == 4
    assert {t["gpus"] for t in two if t["size"] == "s"} == {2}
    with pytest.raises(ConfigError, match=r"batch_sizes: 4 samples per step do not split over the 3 GPUs of size s"):
        plan(load_config(TINY, [sizes.replace("gpus: 2", "gpus: 3")], cls=SweepConfig))


# The example sweep (configs/sweep/example.yaml) as the one end-to-end Ray sweep: its IsoFLOP grid at
# one point of its lr x batch sub-grid (the sub-grid multiplies the trials; its laws are tested on
# synthetic losses in test_sweep_lr_batch.py). Same trial keys as the full example's.
E2E = ["--grid.lrs=[2.0e-2]", "--grid.batch_sizes=[4]"]


def _sweep(action: str, out: Path, env: dict | None = None, run=subprocess.run) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestration.cli", "sweep", action, "--config", EXAMPLE, f"--out_dir={out}",
           "--fit.bootstrap=40", *E2E, f"--dataset={_dataset(out)}"]
    return run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _dataset(out: Path) -> Path:
    """The latent dataset the example sweep in `out` trains on (written beside it)."""
    return out.parent / "latents"


def _results(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _plan(out: Path, *extra: str) -> dict[str, dict]:
    from jobconfig.loader import load_config
    from orchestration.sweep.config import SweepConfig
    from orchestration.sweep.trial import plan

    cfg = load_config(EXAMPLE, [*E2E, f"--dataset={_dataset(out)}", *extra], cls=SweepConfig)
    return {t["key"]: t for t in plan(cfg)}


def _mtimes(out: Path, keys) -> dict[str, int]:
    return {k: (out / "trials" / k / "export" / "config.json").stat().st_mtime_ns for k in keys}


def killed_and_resumed_sweep(out: Path, run=subprocess.run) -> tuple:
    """The example sweep on LATENT_VIDEOS real mp4s encoded in this process (tests/sweep_latents.py: no
    precompute Ray job), killed after its first two trials (the driver exits 3), then run again to the
    end: (out, first run, its results, their exports' mtimes, second run)."""
    from tests.sweep_latents import write_video_latents

    write_video_latents(_dataset(out), out.parent / "videos", LATENT_VIDEOS)
    killed = _sweep("run", out, {"VGPT_SWEEP_FAULT_EXIT_AFTER": "2"}, run=run)
    first = _results(out) if (out / "results.jsonl").exists() else {}
    stamps = _mtimes(out, first)
    return out, killed, first, stamps, _sweep("run", out, run=run)


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    """The example sweep on a latent dataset, killed after its first two trials and resumed to the end
    (one Ray sweep serves acceptance 5 of issue 20, acceptance 3 of issue 27 and the resume test); started
    in the background when collection ended (tests/conftest.py)."""
    (out, killed, first, stamps, resumed), listened = background_result(
        "sweep", lambda bg: killed_and_resumed_sweep(tmp_path_factory.mktemp("sweep") / "full", run=bg.run))
    assert killed.returncode == 3, killed.stdout + killed.stderr
    assert len(first) == 2
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # its local Ray (`vgpt sweep run` without resources.address) listened on loopback only
    assert len(listened) >= 4 and all(is_loopback(a) for a in listened), sorted(listened)
    return out, resumed.stdout, stamps


@pytest.mark.slow
def test_example_sweep_runs_is_identifiable_and_checks_extrapolation(full_sweep):
    out, log, _ = full_sweep
    results, planned = _results(out), _plan(out)
    assert set(results) == set(planned) and f"{len(planned)}/{len(planned)} trials done" in log
    for k, r in results.items():
        t = planned[k]
        assert r["N"] == t["N"] and r["level"] == t["level"] and r["eval_loss"] > 0
        assert r["flops"] == pytest.approx(t["planned_flops"], rel=1e-9)  # on its IsoFLOP line, as planned
        assert r["flops"] > r["flops_6nd"] > 0 and len(r["curve"]) == r["steps"] == t["job"]["train"]["steps"]
    assert sweep_main(["fit", "--config", EXAMPLE, f"--out_dir={out}", "--fit.bootstrap=40", *E2E,
                       f"--dataset={_dataset(out)}"]) == 0
    for name in ("loss_vs_compute.png", "isoflop.png", "frontier.png"):
        assert (out / "fit" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "fit" / "report.md").read_text()
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert set(fit["params"]) == {"E", "A", "B", "alpha", "beta"} and fit["points"] == len(planned)
    assert fit["identifiable"], fit["not_identifiable_because"]
    assert "**Identifiable**" in report and "| alpha |" in report and "N_opt" in report
    ex = fit["extrapolation"]
    assert ex["held_out_level"] == max(r["level"] for r in results.values())
    assert ex["held_out"] and all(r["predicted"] > 0 and r["measured"] > 0 for r in ex["held_out"])
    assert f"mean |error| {ex['mean_abs_rel_err']:.2%}" in report
    assert fit["compute_optimal"] and len(fit["isoflop"]["levels"]) == 3
    # its one-point sub-grid (E2E) determines no lr or batch law, and the report says why (issue 27)
    for name in ("lr", "batch"):
        assert fit["lr_batch"]["laws"][name]["determined"] is False and "exp_N" not in fit["lr_batch"]["laws"][name]
        assert (f"- optimal {name}: **NOT DETERMINED**: the sub-grid has 1 {name} value per point (at least 3 are "
                "needed for an interior optimum)") in report
    assert not (out / "fit" / "lr_batch.png").exists()


RERUN = """
import json, sys
from orchestration.sweep.trial import run_trial
print(json.dumps(run_trial(json.loads(sys.argv[1]), sys.argv[2])))
"""


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(full_sweep, tmp_path, capsys):
    out, log, stamps = full_sweep
    planned = _plan(out)
    n = len(planned)
    assert f"2 finished earlier, {n - 2} to run" in log
    assert _mtimes(out, stamps) == stamps
    assert len((out / "results.jsonl").read_text().splitlines()) == n  # each trial recorded once
    # a trial run after the kill equals an uninterrupted run of it: rerun the cheapest one from scratch
    results = _results(out)
    key = min((k for k in results if k not in stamps), key=lambda k: results[k]["flops"])
    p = subprocess.run([sys.executable, "-c", RERUN, json.dumps(planned[key]), str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    again, mine = json.loads(p.stdout.strip().splitlines()[-1]), results[key]
    for field in ("size", "level", "lr", "batch_size", "steps", "N", "D", "flops"):
        assert again[field] == mine[field], field
    assert again["eval_loss"] == pytest.approx(mine["eval_loss"], rel=1e-6, abs=1e-7)
    assert [c["loss"] for c in again["curve"]] == pytest.approx([c["loss"] for c in mine["curve"]], rel=1e-6)
    import ray

    # everything finished: nothing runs, Ray is not even started
    assert sweep_main(["run", "--config", EXAMPLE, f"--out_dir={out}", "--fit.bootstrap=40", *E2E,
                       f"--dataset={_dataset(out)}"]) == 0
    assert "0 to run" in capsys.readouterr().out and not ray.is_initialized()
    assert len((out / "results.jsonl").read_text().splitlines()) == n


@pytest.mark.slow
def test_trials_never_train_on_the_heldout_split_and_are_judged_on_it(full_sweep):
    """From what each trial's Trainer was served (the keys its data source handed over, recorded in the
    trial dir): no held-out key, every step a full batch of the dataset's other keys; the trials that ran
    a few epochs were served every one of them, so the split, not a short run, kept the held-out keys out.
    Judged on the split: a trial's held-out loss (its Trainer's evaluation after its last step, on its
    device) is the evaluator's loss of its export on the held-out samples, recomputed here."""
    from data.dataset_index import DatasetMeta
    from data.heldout_split import heldout_mask
    from data.shard_format import get_fs
    from jobconfig.job import JobConfig
    from jobconfig.loader import from_dict
    from orchestration.sweep.dataset import trained_keys
    from pretrain.checkpoint.export import load_export
    from pretrain.evaluation.latent_eval import make_evaluator
    from pretrain.model.videogpt import build_model

    out, _, _ = full_sweep
    results, planned = _results(out), _plan(out)
    meta = DatasetMeta.load(*get_fs(str(_dataset(out))))
    keys = {meta.key(i) for i in range(meta.num_samples)}
    fraction = next(iter(planned.values()))["eval"]["heldout_fraction"]
    held = {meta.key(int(i)) for i in np.flatnonzero(heldout_mask(meta, fraction))}
    assert len(keys) == LATENT_VIDEOS and 10 <= len(held) <= 45  # about 10% of 256
    for k, r in results.items():
        served = trained_keys(out / "trials" / k)
        assert sum(served.values()) == r["trained_samples"] == r["steps"] * r["batch_size"], k
        assert not set(served) & held and set(served) <= keys, k
        assert r["eval_loss"] == r["heldout"]["heldout_loss"] and planned[k]["job"]["train"]["data"] == "latents"
    full = [k for k, r in results.items() if r["trained_samples"] >= 3 * len(keys)]
    assert full and all(set(trained_keys(out / "trials" / k)) == keys - held for k in full)
    k = min(results, key=lambda k: results[k]["flops"])
    job = from_dict(JobConfig, planned[k]["job"])
    evaluator = make_evaluator(job, torch.device("cpu"), 0, 1)
    assert {s.key for _, s in evaluator.set.mine} == held  # every held-out sample (at most eval.num_videos)
    model = build_model(job.model, device="cpu", seed=job.train.seed)
    load_export(model, out / "trials" / k / "export")
    assert evaluator.evaluate(model)["heldout_loss"] == pytest.approx(results[k]["eval_loss"], rel=1e-5)


def test_fit_reads_an_old_budgets_sweep(tmp_path):
    """A sweep dir written before compute levels (no `level` in its records) still fits, and the
    under-determined tiny grid (3 sizes x 2 budgets) is reported as not identifiable."""
    from orchestration.sweep.fit import LawFit

    law = LawFit(E=0.2, A=2.0, B=20.0, alpha=0.3, beta=0.4)
    (tmp_path / "s").mkdir()
    with open(tmp_path / "s" / "results.jsonl", "w") as f:
        for i, (size, n) in enumerate((("xs", 2e4), ("s", 6e4), ("debug", 1.5e5))):
            for budget, d in ((20, 1500.0), (40, 3000.0)):
                curve = [{"step": s + 1, "loss": float(law.predict(n, d * (s + 1) / 5)), "tokens": d * (s + 1) / 5,
                          "flops": 6 * n * d * (s + 1) / 5} for s in range(5)]
                f.write(json.dumps({"key": f"k{i}{budget}", "size": size, "budget": budget, "lr": 2e-3,
                                    "batch_size": 4, "steps": 5, "N": n, "D": d, "flops": 6 * n * d,
                                    "flops_6nd": 6 * n * d, "eval_loss": float(law.predict(n, d)),
                                    "final_train_loss": curve[-1]["loss"], "curve": curve, "seconds": 1.0}) + "\n")
    assert sweep_main(["fit", "--config", TINY, f"--out_dir={tmp_path / 's'}", "--fit.bootstrap=10"]) == 0
    fit = json.loads((tmp_path / "s" / "fit" / "fit.json").read_text())
    assert fit["points"] == 6 and fit["identifiable"] is False and fit["compute_optimal"] == []
    assert "NOT IDENTIFIABLE" in (tmp_path / "s" / "fit" / "report.md").read_text()


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
