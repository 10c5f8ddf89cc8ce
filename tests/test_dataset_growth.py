"""Datasets that grow (issue 26, acceptance 2, 4 and 5): append-only precompute generations, a new
index version per publish, and training resumed across the growth.

The quick tests build datasets through the precompute job's own planning and publishing code
(`plan_job`, `record_generation`, `publish`) with toy latents committed in place of the encoder's
(data/synthetic/shards.py), so the plan, the shards and the index are the real ones without Ray:

2. 40 inputs, then the same 40 plus 12: the second job plans (and, in the slow test on real mp4s,
   encodes) only the 12, the first 40's shards stay byte-identical, the index lists 52 in a new
   version; a rerun plans nothing and publishes nothing; changed settings are refused; a loader resumed mid-epoch on the grown
   dataset finishes the epoch over the old shards and takes the 52 from the next epoch (continue
   path), and one whose old shard was rewritten is refused naming it (refuse path);
4. the job killed while publishing (between the columns file and index.json) leaves the old index
   readable, and its resubmission publishes what an uninterrupted job does;
5. `vgpt precompute --plan-only` over a list of 20k URIs: the plan's size, nothing written.
The Ray end-to-end test (marked slow) encodes 4 videos, then 4 + 2, with the real job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from precompute_harness import TINY

from data.dataset_index import DatasetMeta, map_columns, read_index
from data.loader import LatentLoader
from data.precompute_plan import PlanError, record_generation
from data.shard_format import build_tar, commit_shard, encode_sample
from data.synthetic.shards import video_latents
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError
from jobconfig.loader import load_config
from orchestration.precompute.generation import plan_job, publish
from orchestration.precompute.job import run
from tests.runs import REPO, background_result, cli, env, vgpt

VAE = {"name": "toy", "sha256": "0" * 64, "latent_channels": 4, "downsample": 8}  # what `vae_info` gives, toy


def uris(n: int, start: int = 0) -> list[str]:
    return [f"/videos/clip_{i:05d}.mp4" for i in range(start, start + n)]


def job_cfg(tmp: Path, listed: list[str], root: Path, *extra: str):
    lst = tmp / f"inputs-{len(listed)}-{hashlib.sha1(''.join(listed).encode()).hexdigest()[:6]}.txt"
    lst.write_text("".join(u + "\n" for u in listed))
    return load_config(TINY, ["--precompute.inputs.dir=null", f"--precompute.inputs.list_file={lst}",
                              f"--precompute.output.root={root}",
                              "--precompute.output.videos_per_shard=4", *extra]).precompute


def grow(cfg, rewrite: str | None = None) -> dict:
    """One precompute job whose encoder is replaced by toy latents (frame t of input i holds i*1000+t):
    plan, pin the generation, commit what is to do, publish. Returns the job's numbers."""
    fs, root, plan, todo, _ = plan_job(cfg)
    record_generation(fs, root, plan)
    for s in todo:
        samples = [(k, encode_sample(video_latents(int(u[-9:-4]), 6, (4, 4, 4)), {"source": u})) for k, u in s.items]
        commit_shard(fs, root, s.stem, build_tar(samples), [k for k, _ in samples], 6 * len(samples),
                     [[6, 4, 4, 4]] * len(samples))
    index, _ = publish(cfg, fs, root, plan, VAE)
    return {"plan": plan, "todo": todo, "index": index}


def tars(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A root of 40 inputs (index version 1), a copy of it, and the root after 12 more (version 2)."""
    tmp = tmp_path_factory.mktemp("growth")
    root = tmp / "latents"
    first = grow(job_cfg(tmp, uris(40), root))
    old = tmp / "latents-v1"
    shutil.copytree(root, old)
    before = tars(root)
    second = grow(job_cfg(tmp, uris(40) + uris(12, start=40), root))
    return {"tmp": tmp, "root": root, "v1": old, "first": first, "second": second, "tars_v1": before}


def test_second_job_plans_only_the_new_inputs_and_publishes_a_new_version(grown, capsys):
    first, second, root = grown["first"], grown["second"], grown["root"]
    assert sum(len(s.items) for s in first["todo"]) == 40 and first["index"]["version"] == 1
    # only the 12 new inputs, in shards numbered after the 10 old ones
    assert sum(len(s.items) for s in second["todo"]) == 12
    assert [s.stem for s in second["todo"]] == ["train-000010", "train-000011", "train-000012"]
    assert {u for s in second["todo"] for _, u in s.items} == set(uris(12, start=40))
    after = tars(root)
    assert {k: after[k] for k in grown["tars_v1"]} == grown["tars_v1"] and len(after) == 13
    index = read_index(fsspec.filesystem("file"), str(root))
    assert index["version"] == 2 and index["num_samples"] == 52 and index["generations"] == 2
    meta = DatasetMeta.load(fsspec.filesystem("file"), str(root))
    assert meta.names == tuple(f"train-{i:06d}" for i in range(13)) and meta.num_samples == 52
    plan = json.loads((root / "plan.json").read_text())
    assert [(g["num_inputs"], g["first_shard"], g["num_shards"]) for g in plan["generations"]] == \
        [(40, 0, 10), (12, 10, 3)]
    # the job's log names the new generation (the first line of the second job was printed above)
    capsys.readouterr()
    again = grow(job_cfg(grown["tmp"], uris(40) + uris(12, start=40), root))
    out = capsys.readouterr().out
    assert again["todo"] == [] and "no new inputs" in out and "not republished" in out, out
    assert again["index"]["version"] == 2 and tars(root) == after


def test_the_log_says_how_many_inputs_are_new(grown, capsys):
    tmp = grown["tmp"]
    root = tmp / "log-check"
    shutil.copytree(grown["v1"], root)
    plan_job(job_cfg(tmp, uris(40) + uris(12, start=40), root))
    out = capsys.readouterr().out
    assert "generation 2: 12 new inputs -> shards train-000010..train-000012" in out, out
    assert "10 already committed, 3 to do" in out, out
    assert not (root / "plan" / "generation-000002.tsv").exists(), "planning alone writes nothing"


def test_a_generation_interrupted_after_one_shard_is_finished_without_redoing_it(grown):
    tmp = grown["tmp"]
    root = tmp / "interrupted"
    shutil.copytree(grown["v1"], root)
    cfg = job_cfg(tmp, uris(40) + uris(12, start=40), root)
    fs, _, plan, todo, _ = plan_job(cfg)
    record_generation(fs, str(root), plan)  # the job pins generation 2, commits one shard, dies
    s = todo[0]
    samples = [(k, encode_sample(video_latents(int(u[-9:-4]), 6, (4, 4, 4)), {})) for k, u in s.items]
    commit_shard(fs, str(root), s.stem, build_tar(samples), [k for k, _ in s.items], 6 * len(samples),
                 [[6, 4, 4, 4]] * len(samples))
    _, _, again, rest, committed = plan_job(cfg)  # the resubmission: nothing new, two shards left
    assert not again.new and again.plan_hash == plan.plan_hash and len(committed) == 11
    assert rest == todo[1:]  # the same shards, rebuilt from plan/generation-000002.tsv


def test_disappeared_inputs_keep_their_shards_and_changed_settings_are_refused(grown, capsys):
    tmp = grown["tmp"]
    root = tmp / "gone"
    shutil.copytree(grown["v1"], root)
    res = grow(job_cfg(tmp, uris(37) + uris(2, start=40), root))  # 3 of the 40 gone, 2 new
    out = capsys.readouterr().out
    assert "3 input(s) planned by an earlier generation are no longer listed: their shards are kept" in out, out
    assert [len(s.items) for s in res["todo"]] == [2] and res["index"]["num_samples"] == 42
    with pytest.raises(PlanError, match="the inputs or the dataset settings changed; write to a new "
                                        "precompute.output.root"):
        plan_job(job_cfg(tmp, uris(40), root, "--precompute.video.max_image_size=96"))
    with pytest.raises(PlanError, match="settings changed"):
        plan_job(job_cfg(tmp, uris(40), root, "--precompute.output.videos_per_shard=5"))


# ---------------------------------------------------------------- training resumed across the growth
def data_cfg(root: Path, epochs: int = 3) -> DataConfig:
    stage = StageSamplingConfig(frames=4, interval="fixed", interval_value=1, clips="random",
                                patch_size=2)
    return DataConfig(root=str(root), seed=7, shuffle_buffer=3, batch_size=2, epochs=epochs, stage=stage)


def served(loader, steps=None) -> list[list[tuple]]:
    out = []
    for i, batch in enumerate(loader):
        out.append([(s[1], s[2]) for s in batch.samples()])  # (key, frames taken)
        if steps is not None and i + 1 == steps:
            break
    return out


def test_resume_on_a_grown_dataset_finishes_the_epoch_then_takes_the_new_samples(grown, caplog):
    v1, root = grown["v1"], grown["root"]
    before = LatentLoader(data_cfg(v1))
    head = served(before, 7)  # 14 of the 40 samples of epoch 0
    state = before.state_dict()
    assert state["index_version"] == 1 and state["num_shards"] == 10 and state["epoch"] == 0
    rest_v1 = served(before, 13)  # what the old dataset serves to the end of epoch 0
    assert len({k for step in head + rest_v1 for k, _ in step}) == 40

    after = LatentLoader(data_cfg(root))
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        after.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert caplog.text.count("dataset grew from 40 to 52 samples (index version 1 -> 2): new samples join at "
                             "epoch 1") == 1, caplog.text
    assert after.num_steps() == 13 + 2 * 26
    it = iter(after)
    first = [next(it) for _ in range(13)]
    assert [[(s[1], s[2]) for s in b.samples()] for b in first] == rest_v1  # the epoch finishes as it started
    mid = after.state_dict()
    assert mid["index_version"] == 1 and mid["num_shards"] == 10
    epoch1 = [[(s[1], s[2]) for s in next(it).samples()] for _ in range(26)]
    assert len({k for step in epoch1 for k, _ in step}) == 52  # every sample of the grown dataset, once
    state1 = after.state_dict()
    assert state1["index_version"] == 2 and state1["num_shards"] == 13 and state1["epoch"] == 1
    # epoch 1 is the grown dataset's own epoch 1: a pure function of (seed, epoch, position, version)
    fresh = LatentLoader(data_cfg(root))
    assert served(fresh, 52)[26:] == epoch1
    # resuming the resumed run (still in the old epoch) gives the same continuation
    again = LatentLoader(data_cfg(root))
    again.load_state_dict(json.loads(json.dumps(state)))
    assert served(again, 20)[13:] == epoch1[:7]


def test_a_checkpoint_at_an_epoch_end_or_before_any_step_takes_the_new_samples_at_once(grown):
    v1, root = grown["v1"], grown["root"]
    fresh = served(LatentLoader(data_cfg(root)), 30)
    untouched = LatentLoader(data_cfg(v1)).state_dict()  # before any step: epoch 0 is the grown one's
    start = LatentLoader(data_cfg(root))
    start.load_state_dict(untouched)
    assert start.num_steps() == 3 * 26 and served(start, 4) == fresh[:4]
    ended = LatentLoader(data_cfg(v1))
    served(ended, 20)  # the whole of epoch 0 (40 samples, 2 a step)
    at_end = LatentLoader(data_cfg(root))
    at_end.load_state_dict(ended.state_dict())
    assert at_end.num_steps() == 2 * 26 and served(at_end, 4) == fresh[26:30]


def test_resume_where_an_old_shard_changed_is_refused_naming_it(grown):
    tmp, v1 = grown["tmp"], grown["v1"]
    before = LatentLoader(data_cfg(v1))
    served(before, 3)
    state = before.state_dict()
    bad = tmp / "rewritten"
    shutil.copytree(grown["root"], bad)
    fs = fsspec.filesystem("file")
    m = json.loads((bad / "shards" / "train-000003.json").read_text())
    samples = [(k, encode_sample(video_latents(900 + i, 6, (4, 4, 4)), {})) for i, k in enumerate(m["keys"])]
    commit_shard(fs, str(bad), "train-000003", build_tar(samples), m["keys"], 6 * len(samples),
                 [[6, 4, 4, 4]] * len(samples))
    cfg = job_cfg(tmp, uris(40) + uris(12, start=40), bad)
    fsb, rootb, plan, _, _ = plan_job(cfg)
    (bad / "index.json").unlink()  # force a republish of the same plan with the rewritten shard
    publish(cfg, fsb, rootb, plan, VAE)
    loader = LatentLoader(data_cfg(bad))
    with pytest.raises(ConfigError, match=r"shard train-000003 was rewritten .*not an unchanged prefix|"
                                          r"not an unchanged prefix.*shard train-000003 was rewritten"):
        loader.load_state_dict(state)


# ---------------------------------------------------------------- acceptance 4: killed while publishing
def test_kill_while_publishing_keeps_the_old_index_and_the_resubmission_matches(grown):
    tmp = grown["tmp"]
    killed, clean = tmp / "killed", tmp / "clean"
    shutil.copytree(grown["v1"], killed)
    listed = uris(40) + uris(12, start=40)
    cfg = job_cfg(tmp, listed, killed)
    fs, root, plan, todo, _ = plan_job(cfg)  # the new generation's shards, committed as its job would
    record_generation(fs, root, plan)
    for s in todo:
        samples = [(k, encode_sample(video_latents(int(u[-9:-4]), 6, (4, 4, 4)), {"source": u})) for k, u in s.items]
        commit_shard(fs, root, s.stem, build_tar(samples), [k for k, _ in samples], 6 * len(samples),
                     [[6, 4, 4, 4]] * len(samples))
    shutil.copytree(killed, clean)
    args = ["precompute", "--config", TINY, "--precompute.inputs.dir=null",
            f"--precompute.inputs.list_file={cfg.inputs.list_file}",
            "--precompute.output.videos_per_shard=4"]
    res = vgpt(*args, f"--precompute.output.root={killed}", env_extra={"VGPT_FAULT_KILL_PUBLISHING": "1"})
    assert res.returncode == 14 and "FAULT INJECTION: exiting while publishing" in res.stdout, res.stdout + res.stderr
    assert len(list((killed / "index").glob("v000002-*.npz"))) == 1  # the columns file was written ...
    old = DatasetMeta.load(fsspec.filesystem("file"), str(killed))  # ... and the old index still reads
    assert old.version == 1 and old.num_samples == 40
    for root_ in (killed, clean):  # the resubmission, and an uninterrupted job
        out = cli(*args, f"--precompute.output.root={root_}")
        assert out.returncode == 0 and "published index version 2: 52 samples in 13 shards" in out.stdout, out
    a, b = (json.loads((r / "index.json").read_text()) for r in (killed, clean))
    assert a == b and a["version"] == 2
    assert (killed / a["columns"]["path"]).read_bytes() == (clean / b["columns"]["path"]).read_bytes()
    assert DatasetMeta.load(fsspec.filesystem("file"), str(killed)).num_samples == 52


# ---------------------------------------------------------------- acceptance 5: plan only, at scale
def test_plan_only_over_20k_uris_plans_and_writes_nothing(tmp_path):
    root = tmp_path / "big"
    cfg = job_cfg(tmp_path, [f"s3://bucket/raw/{i % 97:02d}/v{i:06d}.mp4" for i in range(20_000)], root,
                  "--precompute.output.videos_per_shard=64")
    out = cli("precompute", "--config", TINY, "--plan-only", "--precompute.inputs.dir=null",
              f"--precompute.inputs.list_file={cfg.inputs.list_file}",
              f"--precompute.output.root={root}", "--precompute.output.videos_per_shard=64")
    assert out.returncode == 0, out
    assert "plan only: 20000 inputs listed, 20000 new in 313 new shards" in out.stdout, out.stdout
    assert "driver peak memory" in out.stdout and not (root / "plan.json").exists()
    # the first generation pinned (no shard committed), then 500 more listed: only those are new
    fs, root_, plan, _, _ = plan_job(cfg)
    record_generation(fs, root_, plan)
    more = job_cfg(tmp_path, [f"s3://bucket/raw/{i % 97:02d}/v{i:06d}.mp4" for i in range(20_500)], root,
                   "--precompute.output.videos_per_shard=64")
    summary = run(more, plan_only=True)
    assert (summary["num_listed"], summary["new_inputs"], summary["new_shards"], summary["num_shards"]) == \
        (20_500, 500, 8, 321)
    assert summary["todo"] == 321 and summary["committed"] == 0  # generation 1 is pinned, not committed


# ---------------------------------------------------------------- the real job, on a local Ray
GROW_TWICE = """
import json, sys
from jobconfig.loader import load_config
from orchestration.precompute.job import run
out = []
for listed in sys.argv[2:]:
    cfg = load_config("configs/precompute/tiny.yaml", ["--precompute.inputs.dir=null",
        f"--precompute.inputs.list_file={listed}", f"--precompute.output.root={sys.argv[1]}",
        "--precompute.output.videos_per_shard=4", "--precompute.progress_every_s=60"]).precompute
    out.append(run(cfg))  # the second job reuses the first one's local Ray
print("SUMMARIES " + json.dumps([{k: s[k] for k in ("encoded_videos", "num_samples", "index_version")} for s in out]))
"""


def grow_real_job(folder: Path, run=subprocess.run) -> tuple[Path, subprocess.CompletedProcess]:
    """40 real mp4s, then the same 40 plus 12, through the job's Ray pipeline (one local Ray for both jobs):
    (the dataset root, the process). Run in the background lane when the session holds this file (conftest)."""
    from data.synthetic.videos import pattern_frames, write_video

    folder.mkdir(parents=True, exist_ok=True)
    videos = [write_video(folder / f"v{i}.mp4", pattern_frames(128, 128, 4, seed=i), 24) for i in range(52)]
    first, both = folder / "first.txt", folder / "both.txt"
    first.write_text("".join(f"{p}\n" for p in videos[:40]))
    both.write_text("".join(f"{p}\n" for p in videos))
    root = folder / "latents"
    return root, run([sys.executable, "-c", GROW_TWICE, str(root), str(first), str(both)], cwd=REPO, env=env(),
                     capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_real_job_over_more_videos_encodes_only_the_new_ones(tmp_path):
    """Acceptance 2 on real videos: the second job encodes only the 12 new ones."""
    (root, res), _ = background_result("growth_real_job", lambda bg: grow_real_job(tmp_path, run=bg.run))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summaries = json.loads(res.stdout.split("SUMMARIES ", 1)[1])
    assert summaries == [{"encoded_videos": 40, "num_samples": 40, "index_version": 1},
                         {"encoded_videos": 12, "num_samples": 52, "index_version": 2}], res.stdout
    assert "generation 2: 12 new inputs -> shards train-000010..train-000012" in res.stdout, res.stdout
    plan = json.loads((root / "plan.json").read_text())
    assert [g["num_inputs"] for g in plan["generations"]] == [40, 12]
    now = DatasetMeta.load(fsspec.filesystem("file"), str(root))
    assert now.names == tuple(f"train-{i:06d}" for i in range(13)) and now.version == 2
    # the first job's shards, as its index version (whose columns file stays) recorded them: unchanged
    v1 = map_columns(next((root / "index").glob("v000001-*.npz")))
    assert [s.decode() for s in v1["shard_sha256"].astype(bytes).tolist()] == list(now.sha256[:10])
    assert all(hashlib.sha256((root / "shards" / f"{n}.tar").read_bytes()).hexdigest() == h
               for n, h in zip(now.names, now.sha256))
