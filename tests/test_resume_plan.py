"""The resume policy as a pure decision (pretrain/training/resume_plan.py): what `--resume MODE` does in
an out_dir, decided from the files alone, before any process group; and the one checkpoint-choice rule
(`CheckpointStore.choose`) it and `vgpt ckpt` follow. Checkpoints here are real committed directories
(files plus the manifest that commits them), with no model: the policy reads nothing else."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobconfig.errors import ConfigError
from orchestration.preflight import check_resume
from pretrain.checkpoint.integrity import CheckpointError, write_manifest
from pretrain.checkpoint.storage import CheckpointStore, tag_for
from pretrain.training.resume_plan import ResumeRefused, plan_resume, set_aside


def commit(root: Path, step: int, manifest: bool = True) -> Path:
    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "rank-00000.safetensors").write_bytes(bytes(range(256)) * (step + 1))
    (ckpt / "trainer_state.json").write_text(f'{{"step": {step}}}')
    if manifest:
        write_manifest(ckpt, step)
        (root / "latest").write_text(ckpt.name)
    return ckpt


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    for step in (5, 10):
        commit(out / "checkpoints", step)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def test_auto_resumes_the_newest_that_verifies_and_names_the_ones_skipped(run):
    assert plan_resume("auto", run).checkpoint == run / "checkpoints" / "step_00000010"
    victim = run / "checkpoints" / "step_00000010" / "rank-00000.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    plan = plan_resume("auto", run)
    assert plan.checkpoint == run / "checkpoints" / "step_00000005" and not plan.set_aside
    (skipped,) = plan.skipped
    assert skipped.tag == "step_00000010" and "bytes, manifest says" in str(skipped)
    (line,) = plan.warnings
    assert "step_00000010 is not usable, falling back to an older one" in line and victim.name in line


def test_auto_refuses_when_no_checkpoint_of_an_earlier_run_verifies(run):
    for manifest in run.glob("checkpoints/step_*/manifest.json"):
        manifest.unlink()
    with pytest.raises(ResumeRefused, match="none of the 2 checkpoint") as refused:
        plan_resume("auto", run)
    assert isinstance(refused.value, ConfigError) and "--resume fresh" in str(refused.value)
    assert "\n" not in str(refused.value)  # one line


def test_a_first_save_killed_before_its_commit_is_no_run_to_keep(tmp_path):
    commit(tmp_path / "checkpoints", 5, manifest=False)  # no `latest`, no manifest: nothing was committed
    plan = plan_resume("auto", tmp_path)
    assert plan.checkpoint is None and plan.leftover and "leftover of a save killed" in plan.warnings[0]
    assert plan_resume("none", tmp_path).checkpoint is None
    assert plan_resume("fresh", tmp_path).set_aside == ()


def test_none_refuses_an_earlier_run_and_fresh_sets_it_aside(run):
    with pytest.raises(ResumeRefused, match="already holds checkpoints .2 checkpoints, step_00000005..step_00000010"):
        plan_resume("none", run)
    plan = plan_resume("fresh", run)
    assert plan.checkpoint is None and plan.set_aside == ("step_00000005", "step_00000010")
    assert (run / "checkpoints").is_dir()  # a plan changes nothing
    aside = set_aside(run)
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert not (run / "checkpoints").exists() and plan_resume("none", run).checkpoint is None
    assert plan_resume("auto", run).checkpoint is None  # nothing left to resume


def test_an_explicit_checkpoint_must_be_a_complete_local_directory(run, tmp_path):
    ckpt = run / "checkpoints" / "step_00000005"
    assert plan_resume(str(ckpt), tmp_path / "elsewhere").checkpoint == ckpt
    (ckpt / "manifest.json").unlink()
    for mode, needle in [(str(ckpt), "is not a complete checkpoint"), (str(tmp_path / "nope"), "does not exist"),
                         (str(run / "metrics.jsonl"), "is a file"), ("s3://bucket/run/step_1", "object store")]:
        with pytest.raises(ResumeRefused, match=needle):
            plan_resume(mode, run)


def test_choose_is_one_rule_with_and_without_a_step(run):
    store = CheckpointStore(run / "checkpoints")
    assert store.choose().tag == "step_00000010"
    victim = run / "checkpoints" / "step_00000010" / "rank-00000.safetensors"
    data = bytearray(victim.read_bytes())
    data[7] ^= 1
    victim.write_bytes(bytes(data))
    assert store.choose(full=False).tag == "step_00000010"  # sizes only: a flipped bit needs the hashes
    choice = store.choose()
    assert choice.required() == "step_00000005" and [s.tag for s in choice.skipped] == ["step_00000010"]
    with pytest.raises(CheckpointError, match="step_00000010 is broken: .*checksum mismatch"):
        store.choose(10)
    with pytest.raises(ConfigError, match=r"no checkpoint for step 7 .*\(steps: 5, 10\)"):
        store.choose(7)
    assert store.choose(5).tag == "step_00000005"
    (run / "checkpoints" / "step_00000005" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies: .*step_00000010.* | .*step_00000005"):
        store.choose().required()
    with pytest.raises(ConfigError, match="no checkpoints"):
        CheckpointStore(run / "nothing").choose().required()


def test_list_sizes_come_from_one_listing(run, monkeypatch):
    store = CheckpointStore(run / "checkpoints")
    files = store.files("step_00000010")
    assert files["rank-00000.safetensors"] == 256 * 11 and "manifest.json" in files
    asked = []
    size = store.fs.size
    monkeypatch.setattr(store.fs, "size", lambda path: asked.append(path) or size(path))  # counted, still real
    assert store.verify("step_00000010", full=False, files=files) == [] and store.size("step_00000010", files) > 0
    assert store.verify("step_00000005", full=False) == [] and asked == []  # no request per file


def test_the_preflight_refuses_before_any_process_starts_checking_sizes_only(run):
    check_resume("auto", str(run))
    with pytest.raises(ResumeRefused, match="--resume none: .* already holds checkpoints"):
        check_resume("none", str(run))
    victim = run / "checkpoints" / "step_00000010" / "rank-00000.safetensors"
    data = bytearray(victim.read_bytes())
    data[7] ^= 1
    victim.write_bytes(bytes(data))
    check_resume(str(victim.parent), str(run))  # a flipped bit is the Trainer's to find: it re-hashes every file
    for manifest in run.glob("checkpoints/step_*/manifest.json"):
        manifest.unlink()
    with pytest.raises(ResumeRefused, match="none of the 2 checkpoint"):
        check_resume("auto", str(run))
    check_resume("fresh", str(run))


def test_a_checkpoint_on_an_object_store_is_refused_naming_the_command_that_brings_it_here(tmp_path):
    """Training reads only local checkpoints; the refusal says how to get one (`vgpt ckpt reshard`
    reads an object store by byte ranges, verified, into the layout given)."""
    with pytest.raises(ResumeRefused) as refused:
        plan_resume("s3://bucket/run/checkpoints/step_00000120", tmp_path / "run")
    assert "vgpt ckpt reshard s3://bucket/run/checkpoints --step 120 --dp <ranks> --out DIR" in str(refused.value)
    assert "--resume DIR/step_00000120" in str(refused.value)
    with pytest.raises(ResumeRefused, match="vgpt ckpt reshard s3://bucket/run --dp <ranks> --out DIR"):
        plan_resume("s3://bucket/run", tmp_path / "run")
