"""bench/gpu.py runs end to end on CPU (--tiny) and writes its three sections with positive figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import background_result

REPO = Path(__file__).resolve().parents[1]


def bench_gpu_tiny(folder: Path, run=subprocess.run) -> tuple[Path, subprocess.CompletedProcess]:
    """`bench/gpu.py --tiny` in a fresh interpreter, writing its JSON under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "bench_gpu.json"
    return out, run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out", str(out)], cwd=folder,
                    env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # every GPU benchmark at tiny size; run in the background beside the quick tier (conftest)
def test_bench_gpu_tiny_writes_all_sections(tmp_path):
    (out, proc), _ = background_result("bench_gpu", lambda bg: bench_gpu_tiny(tmp_path, run=bg.run))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    attn = res["attention"]
    assert attn["tokens"] > 0 and attn["allowed_pairs"] > 0
    assert set(attn["backends"]) == {"flex", "blockwise", "dense"}
    for name, r in attn["backends"].items():
        assert r["seconds"] > 0 and r["useful_tflops"] > 0, (name, r)
    assert attn["backends"]["flex"]["passes"] == "fwd"  # no FlexAttention backward on CPU

    model = res["model"]
    assert set(model["stages"]) == {"stage2", "stage4"}
    for stage, r in model["stages"].items():
        for key in ("tokens", "step_s", "tokens_per_s", "tflops", "peak_gb"):
            assert r[key] > 0, (stage, key, r)
    assert model["stages"]["stage2"]["graphs_compiled"] > 0  # train.compile ran
    assert model["stages"]["stage4"]["tokens"] > model["stages"]["stage2"]["tokens"]

    vae = res["vae"]
    assert vae["frames_per_s"] > 0 and vae["batch"] > 0

    plan = res["plan"]  # (d): the fake-tensor plan against the tracked allocator on CPU
    assert set(plan["stages"]) == {"stage2", "stage4"}
    for stage, r in plan["stages"].items():
        assert 0.85 <= r["planned_over_measured"] <= 1.15, (stage, r)
    assert plan["checkpoint"]["stall_s"] > 0 and plan["checkpoint"]["bytes"] > 0
    assert "(a) clip attention" in proc.stdout and "(c) VAE" in proc.stdout
