"""`vgpt sweep run|fit`: scaling-law sweeps of real training runs on Ray, and their fit.

run: plan every trial of the grid (orchestration/sweep/trial.py; a bad grid fails
here, before Ray starts), skip trials whose result line is already in
`<sweep_dir>/results.jsonl`, schedule the rest as Ray tasks (each with the
sweep's resource request, or the GPUs of a size that asks for several, run
under one torchrun per trial: trial.launch_trial; `max_calls=1` so every
Trainer gets a fresh process, `max_retries` for crashed workers and raised
errors), and append one
complete JSON line per finished trial. Only this driver writes the results
file, so an interrupted sweep leaves whole lines only and a re-run resumes;
failed trials are listed in failures.jsonl and retried by the next run.
With no `resources.address`, a local Ray is started on loopback and shut
down at the end.

fit: read the results and analyse them (orchestration/sweep/analysis.py: L(N, D)
with bootstrap intervals, identifiability, IsoFLOP minima and power laws,
the extrapolation check, optimal lr and batch laws, and compute-optimal N, D
only when the law is identifiable); writes `<sweep_dir>/fit/` (report.md,
fit.json, PNG plots).

Sweep dirs may be local or s3:// (fsspec); trial scratch dirs are local.
Fault injection for tests: orchestration/faults.py (`exit_after_records`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fsspec

from orchestration.faults import exit_after_records
from orchestration.local_ray import LOOPBACK_ENV, start_local_ray
from orchestration.sweep.analysis import analyse
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.fit import BOOTSTRAP_CHUNK
from orchestration.sweep.report import write_outputs
from orchestration.sweep.trial import launch_trial, plan

RAY_ENV = {**LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled"}


class ResultsStore:
    """`<sweep_dir>/results.jsonl` (and failures.jsonl), local or remote; complete lines only."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.local:
            self.root = str(Path(self.root).resolve())
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str = "results.jsonl") -> list[dict]:
        path = self._path(name)
        if not self.fs.exists(path):
            return []
        text = self.fs.cat_file(path).decode()
        lines = text.split("\n")[:-1]  # a trailing piece without newline is a torn write: ignored
        return [json.loads(x) for x in lines if x.strip()]

    def append(self, record: dict, name: str = "results.jsonl") -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        path = self._path(name)
        if self.local:
            with open(path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():  # drop a torn last line left by a crash mid-write
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = Path(path).read_bytes()
                        f.truncate(data.rfind(b"\n") + 1)
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
        else:  # object stores have no append: rewrite the whole object (one writer: the driver)
            old = self.fs.cat_file(path) if self.fs.exists(path) else b""
            old = old[: old.rfind(b"\n") + 1]
            with self.fs.open(path, "wb") as f:
                f.write(old + line.encode())


def _trials_root(cfg: SweepConfig, store: ResultsStore) -> Path:
    if store.local:
        return Path(store.root) / "trials"
    return Path(cfg.scratch_dir or tempfile.mkdtemp(prefix="vgpt-sweep-")) / "trials"


def _start_ray(cfg: SweepConfig):
    """Connect to `resources.address`, or start a local Ray on loopback in its own temp dir;
    returns (ray, that temp dir or None)."""
    os.environ.update(RAY_ENV)
    if cfg.resources.address:
        import ray
        ray.init(address=cfg.resources.address, log_to_driver=False)
        return ray, None
    temp = tempfile.mkdtemp(prefix="vgsr", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = start_local_ray(num_cpus=cfg.resources.local_num_cpus, _temp_dir=temp, log_to_driver=False,
                          object_store_memory=100 * 1024 * 1024)
    return ray, temp


def run_sweep(cfg: SweepConfig) -> int:
    trials = plan(cfg)  # strict: a bad grid fails here, before Ray starts
    store = ResultsStore(cfg.out_dir)
    done = {r["key"] for r in store.read()}
    todo = [t for t in trials if t["key"] not in done]
    print(f"[sweep {cfg.name}] {len(trials)} trials: {len(trials) - len(todo)} finished earlier, "
          f"{len(todo)} to run; results in {store.url}/results.jsonl", flush=True)
    if not todo:
        return 0
    root = _trials_root(cfg, store)
    after_record = exit_after_records()
    ray, ray_temp = _start_ray(cfg)
    failed = 0
    try:
        rc = cfg.resources
        task = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_retries=rc.max_retries,
                          retry_exceptions=True, max_calls=1)(launch_trial)
        # a size of several GPUs (grid.sizes[].gpus): its trials ask Ray for them, on one node
        pending = {task.options(num_gpus=t.get("gpus", rc.num_gpus)).remote(t, str(root / t["key"])): t
                   for t in todo}
        t0, recorded = time.time(), 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            t = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - any trial error is recorded and the sweep goes on
                failed += 1
                store.append({"key": t["key"], "size": t["size"], "budget": t["budget"],
                              "error": f"{type(e).__name__}: {str(e)[-2000:]}", "time": time.time()},
                             "failures.jsonl")
                print(f"[sweep {cfg.name}] trial {t['key']} ({t['size']}, {t['budget']} samples) FAILED: "
                      f"{type(e).__name__}", flush=True)
                continue
            store.append(result)
            recorded += 1
            finished = recorded + failed
            eta = (time.time() - t0) / finished * len(pending)
            print(f"[sweep {cfg.name}] {len(trials) - len(todo) + recorded}/{len(trials)} trials done "
                  f"({t['size']}, {t['budget']} samples: held-out loss {result['eval_loss']:.4f}, "
                  f"{result['seconds']:.0f}s)  ETA {eta:.0f}s", flush=True)
            if after_record:
                after_record(recorded)
    finally:
        ray.shutdown()
        if ray_temp:
            shutil.rmtree(ray_temp, ignore_errors=True)
    if failed:
        print(f"[sweep {cfg.name}] {failed} trial(s) failed (see failures.jsonl); re-run to retry them",
              file=sys.stderr)
    return 1 if failed else 0


def fit_sweep(cfg: SweepConfig) -> int:
    store = ResultsStore(cfg.out_dir)
    results = store.read()
    if not results:
        print(f"vgpt sweep fit: no results in {store.url}/results.jsonl; run `vgpt sweep run` first",
              file=sys.stderr)
        return 2

    def progress(i, n):  # called every BOOTSTRAP_CHUNK resamples: print about every fifth of them
        if i % max(1, n // 5) < BOOTSTRAP_CHUNK or i == n:
            print(f"[sweep fit] bootstrap {i}/{n}", flush=True)

    a = analyse(results, cfg.fit, progress=progress)
    out = Path(store.root) / "fit" if store.local else Path(tempfile.mkdtemp(prefix="vgpt-fit-"))
    report = write_outputs(out, a)
    if not store.local:
        store.fs.put(str(out), f"{store.root}/fit", recursive=True)
    p = a["params"]
    print(f"[sweep fit] E={p['E']:.4g} A={p['A']:.4g} B={p['B']:.4g} alpha={p['alpha']:.3g} beta={p['beta']:.3g}; "
          f"report: {store.url}/fit/{report.name}", flush=True)
    if not a["identifiable"]:
        print("[sweep fit] NOT IDENTIFIABLE, no compute-optimal recommendation: "
              + "; ".join(a["not_identifiable_because"]), flush=True)
    for o in a["compute_optimal"]:
        print(f"[sweep fit] C={o['C']:.3g}: N_opt={o['N_opt']:.3g} D_opt={o['D_opt']:.3g}", flush=True)
    ex = a["extrapolation"]
    if not ex.get("skipped"):
        print(f"[sweep fit] extrapolation to C={ex['held_out_level']:.3g}: mean |error| {ex['mean_abs_rel_err']:.2%}",
              flush=True)
    for d in a["agreement"]["disagreements"]:
        print(f"[sweep fit] parametric vs IsoFLOP: {d}", flush=True)
    return 0
