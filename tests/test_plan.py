"""`vgpt plan` and the memory preflight: fake-tensor plans of the debug model, refusals before any process group.

Every plan here traces the debug model under FakeTensorMode (milliseconds per op, nothing allocated);
the CPU accuracy of the plans against measured runs is bench/plan.py's, not the suite's. The start of a
refused layout with `--plan.ignore=true` is the shared one-rank run (tests/conftest.py `one_rank_run`,
tests/runs.py PLAN_REFUSED), so no process group is added here.
"""
from __future__ import annotations

import json

import torch.distributed as dist

from jobconfig.curriculum import plan_stages
from jobconfig.loader import load_config
from jobconfig.plan import DEVICES, GIB
from orchestration.launch.plan import plan_launch
from pretrain.training import metrics
from pretrain.training.memory_plan import Layout, plan_layout, plan_stage
from tests.runs import ONE_RANK, PLAN_REFUSED, REPO, TINY, cli

DEBUG = str(REPO / "configs/debug.yaml")
SMALL = ["--synthetic.frames=4", "--train.batch_size=1"]


def debug_cfg(*overrides: str):
    return plan_stages(DEBUG, [*SMALL, *overrides], None)[0][1]


def test_one_device_table_feeds_mfu_and_plans():
    assert metrics.PEAK_FLOPS == {d.match: d.peak_flops for d in DEVICES.values()}
    assert {"h100-80gb", "h200", "910b"} <= set(DEVICES)


def test_plan_verb_prints_every_part_and_a_verdict():
    r = cli("plan", "--config", DEBUG, *SMALL, "--device", "h100-80gb", "--world-size", "2")
    assert r.returncode == 0, r.stderr
    for part in ("parameters and buffers", "gradients", "optimizer", "activations", "attention workspace",
                 "communication buckets", "async checkpoint buffers", "tokens/s", "fits with"):
        assert part in r.stdout, part
    js = cli("plan", "--config", DEBUG, *SMALL, "--json")  # the host: no device, no verdict to fit
    assert js.returncode == 0 and json.loads(js.stdout)[0]["fits"] is None
    bad = cli("plan", "--config", DEBUG, "--device", "tpu-v9")
    assert bad.returncode == 2 and "--device" in bad.stderr and "h100-80gb" in bad.stderr


def test_zero_partitions_optimizer_and_gradients_over_dp_times_sp():
    cfg = debug_cfg("--parallel.precision=bf16")
    dev = DEVICES["h100-80gb"]
    z1, z2, z3 = (plan_layout(cfg, Layout(4, 1, 1, z, "bf16", False), dev, (8, 8)).breakdown for z in (1, 2, 3))
    one = plan_layout(cfg, Layout(1, 1, 1, 2, "bf16", False), dev, (8, 8)).breakdown
    opt = "optimizer (fp32 masters + AdamW)"
    assert abs(z2[opt] * 4 - one[opt]) <= 64 and z1[opt] == z2[opt]
    assert z3["parameters and buffers"] < z2["parameters and buffers"]          # only ZeRO-3 partitions the weights
    sp2 = plan_layout(cfg, Layout(4, 1, 2, 2, "bf16", False), dev, (8, 8)).breakdown
    assert sp2[opt] == z2[opt]                          # dp 2 x sp 2 = the same 4-way partition
    assert sp2["activations"] < z2["activations"]       # half the tokens per rank outside attention


def test_checkpointing_and_tensor_parallel_shrink_the_traced_activations():
    cfg = debug_cfg("--model.preset=s1")
    dev = DEVICES["h100-80gb"]
    base = plan_layout(cfg, Layout(2, 1, 1, 2, "bf16", False), dev, (16, 16))
    ac = plan_layout(cfg, Layout(2, 1, 1, 2, "bf16", True), dev, (16, 16))
    tp = plan_layout(cfg, Layout(2, 2, 1, 2, "bf16", False), dev, (16, 16))
    assert ac.breakdown["activations"] < base.breakdown["activations"]
    assert tp.breakdown["activations"] < base.breakdown["activations"]
    assert tp.breakdown["parameters and buffers"] < base.breakdown["parameters and buffers"]


def test_a_layout_that_does_not_fit_names_the_cheapest_fix():
    cfg = plan_stages(DEBUG, [*SMALL, "--model.preset=phi3-mini", "--model.num_layers=48",
                              "--parallel.precision=fp32", "--parallel.zero_stage=0"], None)[0][1]
    p = plan_stage(cfg, 2, DEVICES["h100-80gb"])
    assert p.fits is False and p.peak > p.capacity
    assert p.fix == "--parallel.tensor_parallel=2" and p.fix_peak <= p.capacity  # SP alone does not free weights


def test_train_refuses_before_any_process_group(tmp_path):
    argv = ["train", *TINY, f"--train.out_dir={tmp_path / 'run'}", *ONE_RANK, *PLAN_REFUSED]
    r = cli(*argv)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "does not fit Ascend 910B" in line and "GB short" in line and "--plan.ignore=true" in line
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_launch_refuses_and_writes_the_plan(tmp_path):
    cluster = str(REPO / "configs/cluster/h100-slurm.yaml")
    tiny = ["--model.preset=debug", "--model.attention=blockwise"]
    r = cli("launch", "--stage", "1", "--cluster", cluster, "--target", "torchrun", "--out", str(tmp_path / "a"),
            "--model.preset=phi3-mini", "--model.num_layers=48", "--parallel.precision=fp32",
            "--parallel.zero_stage=0")
    assert r.returncode == 2 and not (tmp_path / "a").exists()
    assert "GB short" in r.stderr and "smallest fix: --parallel.tensor_parallel=2" in r.stderr
    ok = cli("launch", "--stage", "1", "--cluster", cluster, "--target", "torchrun", "--out", str(tmp_path / "b"),
             *tiny)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan[0]["device"] == "h100-80gb" and plan[0]["fits"] and "plan.txt" in ok.stdout
    spec = plan_launch(1, cluster, overrides=tiny)
    assert spec.memory_plans[0].peak < DEVICES["h100-80gb"].memory_gib * GIB


def test_cpu_runs_plan_against_no_device():
    from orchestration.planning import train_device
    assert train_device(load_config(DEBUG, ["--parallel.device=cpu"])) is None


def test_latent_data_is_planned_for_its_datasets_heaviest_shape_and_that_shapes_batch(tmp_path):
    """The loader batches by latent shape (data/buckets.py), each shape with its own per-rank batch: the
    plan is for the shape whose steps carry the most tokens, with its batch (not train.batch_size, the
    synthetic source's), read from the index as the training preflight reads it; a dataset that cannot
    be read is planned for plan.latent_size's default, said on stderr."""
    import torch

    from data.synthetic.shards import write_toy_dataset
    root = tmp_path / "latents"
    write_toy_dataset(str(root), [4, 4], frames=8, shape=[(4, 8, 16)] * 4 + [(4, 16, 16)] * 4, dtype=torch.bfloat16)
    latents = ["--train.data=latents", "--data.stage.frames=4", "--data.stage.interval_value=1",
               "--plan.device=h100-80gb", "--json"]

    def planned(*overrides):
        r = cli("plan", "--config", DEBUG, *SMALL, *latents, *overrides)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)[0], r.stderr

    # 16x16 latents: 64 patches a frame, batch 1; 8x16: 32 patches, batch 3 carries more tokens a step
    bigger, _ = planned(f"--data.root={root}", "--data.batch_size=1")
    assert bigger["rows"] == 1 and bigger["tokens"] == 4 * (64 + 2) + 3 * (64 + 2)
    heavier, _ = planned(f"--data.root={root}", "--data.batch_size=1", '--data.bucket_batch_size={"8x16": 3}')
    assert heavier["rows"] == 3 and heavier["tokens"] == 4 * (32 + 2) + 3 * (32 + 2)  # tokens of a row
    assert heavier["breakdown_bytes"]["activations"] > bigger["breakdown_bytes"]["activations"]
    assert bigger["latent_hw"] == [16, 16] and heavier["latent_hw"] == [8, 16]
    # the training preflight plans the same shape
    cfg = plan_stages(DEBUG, [*SMALL, *latents[:-1], f"--data.root={root}", '--data.bucket_batch_size={"8x16": 3}'],
                      None)[0]
    from orchestration.preflight import check_stage_data
    assert check_stage_data(*cfg) == (8, 16)
    # away from the data: 40 x 40, batch data.batch_size, and a line saying so
    away, err = planned(f"--data.root={tmp_path / 'elsewhere'}", "--data.batch_size=2")
    assert away["rows"] == 2 and "planned for latents of 40x40" in err and "does not exist" in err
