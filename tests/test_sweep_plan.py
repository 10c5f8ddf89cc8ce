"""IsoFLOP grids (issue 20, acceptance 3): the planner's trials lie on their compute levels within
one step, counted as the runner counts FLOPs, with at least three sizes per level; on synthetic rows
(replayed here) and on a latent dataset (the GPU example; the example sweep's end-to-end run on
latents checks the runner's FLOPs against the plan, tests/test_sweep.py)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data.batch import patches_per_frame, sequence_length
from data.sources import SyntheticSource
from data.synthetic.shards import write_synthetic_index, write_toy_dataset
from jobconfig.job import JobConfig
from jobconfig.loader import from_dict, load_config
from orchestration.cli.sweep import main as sweep_main
from orchestration.sweep.config import SweepConfig
from orchestration.sweep.dataset import write_trained_keys
from orchestration.sweep.plan import count_params
from orchestration.sweep.trial import plan
from pretrain.training.metrics import allowed_attention_pairs, train_flops

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "configs/sweep/example.yaml")
CLUSTER = str(REPO / "configs/sweep/cluster.yaml")


def runner_flops(job: JobConfig, n_params: int) -> float:
    """FLOPs of the job's steps as trial.run_trial sums them (the trainer's metrics, train_flops)."""
    src = SyntheticSource(job, 0, 1)
    patches = patches_per_frame((job.synthetic.latent_height, job.synthetic.latent_width), job.model.patch_size)
    total = 0.0
    for _ in range(job.train.steps * job.train.grad_accum_steps):  # the trainer's micro batches, in order
        batch, _ = src.next_batch()
        tokens = sum(sequence_length(row, patches) for row in batch.clips)
        pairs = sum(allowed_attention_pairs(row, patches) for row in batch.clips)
        total += train_flops(job.model, n_params, tokens, pairs)
    return total


def test_planned_trials_lie_on_their_levels_with_three_sizes_each():
    cfg = load_config(EXAMPLE, [], cls=SweepConfig)
    trials = plan(cfg)
    levels = cfg.grid.compute_levels
    assert {t["level"] for t in trials} == set(levels)
    for c in levels:
        here = [t for t in trials if t["level"] == c]
        assert len({t["size"] for t in here}) >= 3
        assert len(here) <= len({t["size"] for t in here}) * len(cfg.grid.lrs) * len(cfg.grid.batch_sizes)
    for t in trials:
        assert abs(t["planned_flops"] - t["level"]) <= 0.5 * t["step_flops"] + 1e-6 * t["level"], t
        assert t["job"]["train"]["steps"] >= cfg.grid.min_steps
        assert t["budget"] == t["job"]["train"]["steps"] * t["batch_size"]
    # the planner counts as the runner does: replay the trainer's batches for a few trials
    for t in (trials[0], trials[len(trials) // 2], trials[-1]):
        job = from_dict(JobConfig, t["job"])
        assert runner_flops(job, count_params(job.model)) == pytest.approx(t["planned_flops"], rel=1e-9)


def test_cluster_example_plans_three_sizes_per_level(tmp_path):
    """The GPU example on a dataset's index (a large synthetic one: shapes and keys only, no shard is
    read; its own `dataset:` is a placeholder the loader refuses): 93 trials, each training on the
    dataset less its held-out split, judged on the split after its last step, on its GPU."""
    root = tmp_path / "latents"
    write_synthetic_index(str(root), 5000, shard_size=500)
    cfg = load_config(CLUSTER, [f"--dataset={root}"], cls=SweepConfig)
    trials = plan(cfg)
    assert len(trials) == 93 and {t["size"] for t in trials} == {"s1", "s2", "s3", "s4"}
    for c in cfg.grid.compute_levels:
        here = [t for t in trials if t["level"] == c]
        assert len({t["size"] for t in here}) >= 3
        for t in here:
            assert abs(t["planned_flops"] - c) <= t["step_flops"] + 1e-3 * c
    for t in trials:
        job = t["job"]
        assert job["train"]["data"] == "latents" and job["data"]["root"] == str(root) and not job["data"]["sources"]
        assert job["data"]["batch_size"] == t["batch_size"] and job["parallel"]["device"] == "cuda"
        assert job["eval"]["every"] == job["train"]["steps"] >= 50 and job["eval"]["heldout_fraction"] == 0.01
        assert job["data"]["stage"]["frames"] == 16 and job["data"]["stage"]["clips"] == "single_frame"


def test_a_level_too_small_for_three_sizes_fails_before_any_trial(tmp_path, capsys):
    rc = sweep_main(["run", "--config", EXAMPLE, f"--out_dir={tmp_path / 's'}", "--grid.compute_levels=[2.0e7]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "an IsoFLOP line needs at least 3" in err and "min_steps" in err, err
    assert not (tmp_path / "s").exists()


def test_budgets_and_levels_are_exclusive(tmp_path, capsys):
    rc = sweep_main(["plan", "--config", EXAMPLE, "--grid.budgets=[20, 40]"])
    assert rc == 2 and "give exactly one" in capsys.readouterr().err


def test_plan_prints_the_grid(capsys):
    assert sweep_main(["plan", "--config", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "3 compute levels" in out and "5 sizes (h4, h8, h16, h32, h64)" in out and "step)" in out


def test_the_leak_check_knows_a_long_video_by_its_video_key(tmp_path):
    """The loader serves a video stored as segments under its input's key (data/videos.py); the sweep's
    check that no trial trained on a held-out key must compare those, not the segments' keys."""
    root = tmp_path / "latents"
    write_toy_dataset(str(root), [4], frames=[20, 8, 8, 8], shape=(4, 4, 4), dtype=torch.bfloat16, segments=(6, 1))
    job = load_config(None, ["--train.data=latents", f"--data.root={root}", "--eval.heldout_fraction=0.999"])
    with pytest.raises(RuntimeError, match="trained on 1 sample.*v000000"):  # every video is held out
        write_trained_keys(job, Counter({"v000000": 1}), tmp_path, 0)
