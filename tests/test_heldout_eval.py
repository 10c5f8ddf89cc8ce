"""Held-out evaluation (issue 27): the key-hash split of a latent dataset, the evaluator, and the
trainer's evaluation steps.

The split: membership is a function of the key alone (stable as the dataset grows), the training
loader never serves a held-out sample and reports each as a known skip of its own reason, and with
the split off the loader is what it was. The evaluator: a function of the weights alone, leaving
torch's RNG and the model's mode as it found them. The trainer (slow: real DeepSpeed runs of the
debug model on a small latent dataset of moving squares): a run with evaluation on trains bitwise like
one with it off (losses, rows, export), its evaluation at step k equals the one-process evaluation of
its export, a run resumed from checkpoint k evaluates as the uninterrupted one, and a 2-rank run
(ZeRO-2, gloo) evaluates its weights bitwise as one process does.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data.buckets import SKIP_HELDOUT, build_buckets
from data.dataset_index import DatasetMeta, write_index
from data.heldout_split import hash_keys, heldout_mask, heldout_samples, key_hash
from data.loader import LatentLoader
from data.shard_format import build_tar, commit_shard, encode_sample, get_fs, shard_stem
from data.synthetic.latents import moving_square_latents
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig, SyntheticDataConfig
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from jobconfig.train import TrainConfig
from pretrain.checkpoint.export import export_path, load_export, read_export_tensors, weights_fingerprint
from pretrain.evaluation.heldout import eval_batch, synthetic_eval_seed
from pretrain.evaluation.latent_eval import make_evaluator
from pretrain.model.videogpt import build_model
from pretrain.training.metric_sinks import MetricSinks
from pretrain.training.metrics_window import skipped_window_error
from tests.runs import TINY, vgpt

FRACTION = 0.25


def meta_of(root) -> DatasetMeta:
    return DatasetMeta.load(*get_fs(str(root)))


def latent_args(root) -> list[str]:
    return ["--train.data=latents", f"--data.root={root}", "--data.stage.frames=4", "--data.stage.interval_value=1",
            "--data.stage.clips=random", "--data.batch_size=2", "--data.shuffle_buffer=8"]


def write_squares(root: Path, shard_sizes: list[int], frames: int = 8) -> None:
    """A latent dataset in the real format whose latents are moving squares (values of order 1, unlike
    write_toy_dataset's v * 1000 + frame, which drown the noise a loss at t sees)."""
    syn = dataclasses.replace(SyntheticDataConfig(), num_videos=sum(shard_sizes), frames=frames,
                              latent_height=4, latent_width=4)
    videos = moving_square_latents(syn, 4, seed=7)
    fs, path = get_fs(str(root))
    manifests, v = {}, 0
    for s, size in enumerate(shard_sizes):
        keys = [f"sq{i:05d}" for i in range(v, v + size)]
        tar = build_tar((k, encode_sample(videos[i].contiguous(), {"frames": frames}))
                        for i, k in zip(range(v, v + size), keys))
        manifests[shard_stem("train", s)] = commit_shard(fs, path, shard_stem("train", s), tar, keys, frames * size,
                                                         [list(videos[i].shape) for i in range(v, v + size)])
        v += size
    write_index(fs, path, manifests, latent_shape=[4, 4, 4], dtype="float32")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heldout_toy")
    write_squares(root, [12, 12])
    return root


# ------------------------------------------------------------------ the split
def test_split_is_a_function_of_the_key_and_stable_as_the_dataset_grows(tmp_path):
    write_toy_dataset(str(tmp_path), [40, 40], frames=2, shape=(4, 2, 2))
    small = meta_of(tmp_path)
    held = {small.key(i) for i in np.flatnonzero(heldout_mask(small, FRACTION))}
    assert 0 < len(held) < 80
    # the vectorised hash of the index column is the hash of each key alone
    keys = [small.key(i) for i in range(small.num_samples)]
    assert [int(h) for h in hash_keys(small.key_blob, small.key_offsets)] == [key_hash(k) for k in keys]
    write_toy_dataset(str(tmp_path), [40, 40, 40], frames=2, shape=(4, 2, 2))  # the dataset grows by a shard
    grown = meta_of(tmp_path)
    held_grown = {grown.key(i) for i in np.flatnonzero(heldout_mask(grown, FRACTION))}
    assert {k for k in held_grown if video_of(k) < 80} == held  # old samples keep their membership
    assert held_grown - held  # and the new shard brings its own
    assert abs(len(held_grown) / 120 - FRACTION) < 0.12
    # the evaluated subset: lowest hashes first, deterministic
    chosen = heldout_samples(grown, FRACTION, 5)
    assert [grown.key(i) for i in chosen] == sorted(held_grown, key=key_hash)[:5]


def test_loader_never_serves_the_heldout_split_and_reports_it(toy):
    cfg = DataConfig(root=str(toy), batch_size=2, epochs=2, shuffle_buffer=8,
                     stage=StageSamplingConfig(frames=4, interval_value=1, clips="random"))
    meta = meta_of(toy)
    held = {meta.key(i) for i in np.flatnonzero(heldout_mask(meta, FRACTION))}
    assert held
    served, skipped = [], []
    for b in LatentLoader(cfg, 0, 1, heldout=FRACTION):
        served += [k for row in b.keys for k in row]
        skipped += [reason for _, _, reason in b.skipped]
    assert not held & set(served)
    assert sorted(served) == sorted([meta.key(i) for i in range(meta.num_samples) if meta.key(i) not in held] * 2)
    assert skipped == [SKIP_HELDOUT] * (2 * len(held))
    # a checkpoint of one split does not resume another (the samples served would differ)
    state = LatentLoader(cfg, 0, 1, heldout=FRACTION).state_dict()
    with pytest.raises(ConfigError, match="eval.heldout_fraction"):
        LatentLoader(cfg, 0, 1).load_state_dict(state)
    # split off: the buckets (hence the order) are exactly today's
    assert build_buckets(meta, cfg, heldout=0.0).fingerprint == build_buckets(meta, cfg).fingerprint
    assert build_buckets(meta, cfg, heldout=FRACTION).fingerprint != build_buckets(meta, cfg).fingerprint


def test_heldout_skips_never_stop_a_run():
    records = [{"step": 1, "samples": 2}]
    assert skipped_window_error(records, [SKIP_HELDOUT] * 8, 1, 0.5) is None
    assert "too_short: 8" in skipped_window_error(records, ["too_short"] * 8, 1, 0.5)


def test_eval_config_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="eval.every: .* no held-out samples; set eval.heldout_fraction"):
        load_config(None, ["--eval.every=5"])
    with pytest.raises(ConfigError, match="eval.t_values"):
        load_config(None, ["--eval.t_values=[0.5, 1.0]"])
    with pytest.raises(ConfigError, match="eval.heldout_fraction: .* one source"):
        load_config(None, ["--eval.heldout_fraction=0.1", "--eval.root=/d/x"])
    load_config(None, ["--eval.every=5", "--train.data=synthetic"])  # the synthetic held-out set
    split = ["--eval.every=5", "--eval.heldout_fraction=0.1", "--eval.predict_every=5"]
    with pytest.raises(ConfigError, match="eval.predict_every: .* ZeRO-3.* needs every weight on one rank"):
        load_config(None, [*split, "--parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="eval.predict_every: .* train.data='synthetic'"):
        load_config(None, [*split, "--train.data=synthetic"])
    load_config(None, split)


# ------------------------------------------------------------------ the evaluator
def _job(toy, *extra):
    return load_config(str(Path(__file__).resolve().parents[1] / "configs/debug.yaml"),
                       ["--parallel.precision=fp32", "--model.attention=blockwise", *latent_args(toy),
                        f"--eval.heldout_fraction={FRACTION}", "--eval.t_values=[0.2, 0.5, 0.8]", *extra])


def jitter(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def test_evaluator_rng_and_mode(toy):
    job = _job(toy)
    model = build_model(job.model, device="cpu", seed=0)
    jitter(model)  # the output layer starts at zero: a model that predicts something
    ev = make_evaluator(job, torch.device("cpu"), 0, 1)
    assert ev.set.count == len(heldout_samples(meta_of(toy), FRACTION, 64))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = ev.evaluate(model)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert set(res) == {"heldout_loss", "heldout_loss_t0.2", "heldout_loss_t0.5", "heldout_loss_t0.8"}
    assert res == ev.evaluate(model)  # fixed noise and clips: the same weights give the same numbers
    # each t is its own input
    assert len({res[f"heldout_loss_t{t}"] for t in (0.2, 0.5, 0.8)}) == 3
    jitter(model, seed=1)
    assert ev.evaluate(model)["heldout_loss"] != res["heldout_loss"]  # a function of the weights


def test_synthetic_training_evaluates_the_synthetic_heldout_set():
    job = load_config(str(Path(__file__).resolve().parents[1] / "configs/debug.yaml"),
                      ["--eval.every=5", "--eval.heldout_max=3", "--eval.t_values=[0.5]"])
    ev = make_evaluator(job, torch.device("cpu"), 0, 1)
    batch, _ = eval_batch(job, {"num_videos": 3, "seed": synthetic_eval_seed(0)})
    assert ev.set.count == 3 and torch.equal(ev.set.mine[2][1].latents, batch.latents[2])
    assert set(ev.evaluate(build_model(job.model, device="cpu", seed=0))) == {"heldout_loss", "heldout_loss_t0.5"}


# ------------------------------------------------------------------ the trainer
def _train(out: Path, toy: Path, *extra: str):
    res = vgpt("train", *TINY, *latent_args(toy), f"--train.out_dir={out}", "--train.log_every=1", *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def evaluate_export(toy: Path, export: Path) -> dict[str, float]:
    """One process's evaluation of an export, with one thread as the runs' ranks (tests/runs.py)."""
    job = _job(toy)
    model = build_model(job.model, device="cpu", seed=0)
    load_export(model, export)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_evaluator(job, torch.device("cpu"), 0, 1).evaluate(model)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_evaluation_never_changes_training_and_resumes_exactly(toy, tmp_path):
    split = [f"--eval.heldout_fraction={FRACTION}", "--eval.t_values=[0.2, 0.5, 0.8]"]
    common = ["--train.steps=4", "--train.checkpoint_every=2", *split]
    on = _train(tmp_path / "on", toy, *common, "--eval.every=2")
    off = _train(tmp_path / "off", toy, *common)
    assert [m["loss"] for m in on] == [m["loss"] for m in off]
    assert [m["sample_rows"] for m in on] == [m["sample_rows"] for m in off]
    assert weights_fingerprint(read_export_tensors(export_path(tmp_path / "on"))) == \
        weights_fingerprint(read_export_tensors(export_path(tmp_path / "off")))
    evals = {m["step"]: m for m in on if "heldout_loss" in m}
    assert sorted(evals) == [2, 4] and not any("heldout_loss" in m for m in off)
    assert 0 < evals[4]["eval_time_share"] < 1
    # the evaluation at step 4 is the evaluation of the step-4 weights, by themselves
    assert evaluate_export(toy, export_path(tmp_path / "on")) == \
        {k: v for k, v in evals[4].items() if k.startswith("heldout_loss")}
    # resumed from its checkpoint 2: steps 3-4 trained again evaluate as the uninterrupted run did
    shutil.copytree(tmp_path / "on", tmp_path / "resumed")
    resumed = _train(tmp_path / "resumed", toy, *common, "--eval.every=2",
                     f"--resume={tmp_path / 'resumed' / 'checkpoints' / 'step_00000002'}")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in on]
    assert {m["step"]: m["heldout_loss"] for m in resumed if "heldout_loss" in m} == \
        {k: m["heldout_loss"] for k, m in evals.items()}


def test_heldout_losses_reach_tensorboard(tmp_path):
    """An evaluation step's record goes to metrics.jsonl and TensorBoard like the training scalars."""
    sinks = MetricSinks(tmp_path, "stage1", TrainConfig(tensorboard=True), {})
    sinks.write([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, "heldout_loss": 0.8, "heldout_loss_t0.5": 0.7,
                                             "eval_time_share": 0.01}])
    sinks.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"stage1/heldout_loss", "stage1/heldout_loss_t0.5", "stage1/eval_time_share"} <= tags
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("stage1/heldout_loss_t0.5")] == [(2, 0.7)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["heldout_loss"] == 0.8 and "heldout_loss" not in lines[0]


@pytest.mark.slow
def test_a_two_rank_run_evaluates_its_weights_as_one_process_does(toy, tmp_path):
    """Through the trainer on 2 data-parallel ranks (ZeRO-2, gloo): the evaluation at the last step equals
    the one-process evaluation of the export, bitwise."""
    lines = _train(tmp_path / "two", toy, "--nproc=2", "--parallel.zero_stage=2", "--train.steps=2",
                   "--data.batch_size=1", "--eval.every=2", f"--eval.heldout_fraction={FRACTION}",
                   "--eval.t_values=[0.2, 0.5, 0.8]")
    evals = [m for m in lines if "heldout_loss" in m]
    assert [m["step"] for m in evals] == [2]
    assert evaluate_export(toy, export_path(tmp_path / "two")) == \
        {k: v for k, v in evals[0].items() if k.startswith("heldout_loss")}


def test_a_posterior_dataset_is_evaluated_on_its_mean(tmp_path):
    """Issue 29: held-out samples of a `posterior`-form dataset are its posterior means, no draw: the same
    latents, and the same losses, as a one-draw dataset that stored those means."""
    from pretrain.evaluation.latent_eval import latent_set

    sets, losses = [], []
    model = build_model(_job(tmp_path).model, device="cpu", seed=0)
    jitter(model)
    for form in ("posterior", None):
        root = tmp_path / str(form)
        write_toy_dataset(str(root), [12, 12], frames=8, shape=(4, 4, 4), latent_form=form, std=0.5)
        job = _job(root)
        sets.append(latent_set(job, 0, 1))
        losses.append(make_evaluator(job, torch.device("cpu"), 0, 1).evaluate(model))
    assert sets[0].count == sets[1].count > 0
    for (_, a), (_, b) in zip(sets[0].mine, sets[1].mine):
        assert a.key == b.key and a.latents.shape[1] == 4 and torch.equal(a.latents, b.latents)
    assert losses[0] == losses[1]


def test_a_long_video_is_one_heldout_sample_its_window_cut_across_its_segments(tmp_path):
    """A video stored as several segments is one held-out sample, as it is one training sample
    (data/videos.py), not one per segment: the held-out set of a segmented dataset has the videos,
    keys and windows of the same dataset stored unsegmented, tensor for tensor (eval.root: every
    video a candidate, so the long one is in it)."""
    from pretrain.evaluation.latent_eval import latent_set

    sets = []
    for segments in ((6, 1), None):  # video 0 of 20 frames: 4 segments of at most 6 frames, 1 shared
        root = tmp_path / str(segments)
        write_toy_dataset(str(root), [3, 3], frames=[20, 8, 8, 8, 8, 8], shape=(4, 4, 4), segments=segments)
        job = load_config(None, [*latent_args(root), f"--eval.root={root}", "--eval.heldout_max=64",
                                 "--data.stage.frames=5", "--data.stage.interval_value=4"])
        sets.append(latent_set(job, 0, 1))
    assert meta_of(tmp_path / str((6, 1))).num_samples == 4 + 5 * 2  # the 8-frame videos: 2 segments each
    seg, whole = sets
    assert [s.key for _, s in seg.mine] == [s.key for _, s in whole.mine] == ["v000000"]  # 5 frames at 4: 17+
    (_, a), (_, b) = seg.mine[0], whole.mine[0]
    assert torch.equal(a.latents, b.latents) and a.clips == b.clips and a.seed == b.seed
    assert torch.equal(a.latents[:, 0, 0, 0], torch.tensor([float(f) for f in range(0, 17, 4)]))  # frames 0..16
