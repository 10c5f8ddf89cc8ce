"""Crafted checkpoint and export files get one line, never a traceback (pretrain/checkpoint/schema.py,
structure.py).

Whoever can write a checkpoint folder can recompute its manifest, so the checksums pass. Each tampering
here is written into a copy of the shared one-rank run (tests/conftest.py) with its manifest recomputed
(integrity.write_manifest), or into an export of it, and then every `vgpt ckpt` verb (in process), the
export loaders and a resume (one Trainer in one subprocess for every tampering: this file run as a
script, `resume_all`) are run on it: each refuses with exit 1 or 2 and one line naming the file, never
a traceback, and a pickled payload never runs. Random mutations (seeded: bytes, or one value replaced
by one of another kind) of every small JSON file we write may leave a file that is still valid: those
may succeed, but never end in a traceback.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from pretrain.checkpoint.integrity import write_manifest
from tests.runs import ONE_RANK, REPO, TINY, cli, copy_run, env, vgpt

pytestmark = pytest.mark.slow  # reads the shared DeepSpeed run; the resume builds a DeepSpeed engine

STEP = "step_00000010"
MUTATIONS = 6  # random mutations per JSON file and kind (bytes, values)
MARKER = "payload-ran"  # created by the pickled payload, if it ever runs


# ---------------------------------------------------------------- writing tamperings
def edit_header(path: Path, edit) -> None:
    """`edit` the JSON header of a safetensors file in place; its data stays as it was."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def header_length_2_60(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 ** 60) + raw[8:])


def offsets_out_of_range(header: dict) -> None:
    last = header[tensors_by_offset(header)[-1]]
    last["data_offsets"] = [o + 4096 for o in last["data_offsets"]]


def offsets_overlapping(header: dict) -> None:
    names = tensors_by_offset(header)
    sizes: dict[int, str] = {}
    for name in names:  # two tensors of one byte size: the second points at the first one's bytes
        b, e = header[name]["data_offsets"]
        if e - b in sizes:
            header[name]["data_offsets"] = list(header[sizes[e - b]]["data_offsets"])
            return
        sizes[e - b] = name
    raise AssertionError("no two tensors of one size")


def transposed(header: dict) -> None:
    name = next(k for k in tensors_by_offset(header) if len(header[k]["shape"]) == 2
                and header[k]["shape"][0] != header[k]["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]


def numbers_as_strings(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return [numbers_as_strings(x) for x in v]
    if isinstance(v, dict):
        return {k: numbers_as_strings(x) for k, x in v.items()}
    return v


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


DEEP = "[" * 100_000 + "]" * 100_000


class Payload:
    """A pickle that, if unpickled, creates MARKER beside it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def legacy_payload(ckpt: Path) -> None:
    """A DeepSpeed .pt file (the format of earlier versions) that runs code when unpickled."""
    import torch

    for p in [*ckpt.glob("rank-*"), *ckpt.glob("model-tp*"), ckpt / "engine.json"]:
        p.unlink()
    torch.save({"module": Payload(ckpt.parent / MARKER)}, ckpt / "mp_rank_00_model_states.pt")


def rank_fragment_numel(header: dict) -> None:
    meta = json.loads(header["__metadata__"]["vgpt"])
    name = next(iter(meta["fragments"]))
    meta["fragments"][name][1] += 1
    header["__metadata__"]["vgpt"] = json.dumps(meta)


def transposed_everywhere(ckpt: Path) -> None:
    """A 2-D weight transposed in the rank file's fragments and in the module file alike: the files agree
    with each other, not with the model."""
    def fragments(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["vgpt"])
        frag = meta["fragments"]["time_token.mlp.0.weight"]
        frag[2] = frag[2][::-1]
        header["__metadata__"]["vgpt"] = json.dumps(meta)

    def module(header: dict) -> None:
        header["time_token.mlp.0.weight"]["shape"] = header["time_token.mlp.0.weight"]["shape"][::-1]
    edit_header(ckpt / "rank-00000.safetensors", fragments)
    edit_header(ckpt / "model-tp00.safetensors", module)


def rng_shape(header: dict) -> None:
    header["cpu"]["shape"] = [header["cpu"]["shape"][0] // 2, 2]


# name -> (the file it names, how to change the checkpoint directory)
CHECKPOINT_TAMPERINGS = {
    "header_2^60": ("rank-00000.safetensors", lambda c: header_length_2_60(c / "rank-00000.safetensors")),
    "offsets_out_of_range": ("rank-00000.safetensors",
                             lambda c: edit_header(c / "rank-00000.safetensors", offsets_out_of_range)),
    "offsets_overlapping": ("model-tp00.safetensors",
                            lambda c: edit_header(c / "model-tp00.safetensors", offsets_overlapping)),
    "transposed_module_weight": ("model-tp00.safetensors",
                                 lambda c: edit_header(c / "model-tp00.safetensors", transposed)),
    "fragment_numel": ("rank-00000.safetensors",
                       lambda c: edit_header(c / "rank-00000.safetensors", rank_fragment_numel)),
    "engine_list": ("engine.json", lambda c: (c / "engine.json").write_text("[1,2,3]")),
    "engine_deep": ("engine.json", lambda c: (c / "engine.json").write_text(DEEP)),
    "engine_numbers_as_strings": ("engine.json", lambda c: edit_json(c / "engine.json", numbers_as_strings)),
    "trainer_state_layout_x": ("trainer_state.json",
                               lambda c: edit_json(c / "trainer_state.json", lambda s: {**s, "layout": "x"})),
    "trainer_state_deep": ("trainer_state.json", lambda c: (c / "trainer_state.json").write_text(DEEP)),
    "rng_shape": ("rng.safetensors", lambda c: edit_header(c / "rng.safetensors", rng_shape)),
    "legacy_pickle_payload": ("mp_rank_00_model_states.pt", legacy_payload),
    "transposed_everywhere": ("rank-00000.safetensors", transposed_everywhere),
}
# the same, in the portable form (`vgpt ckpt reshard`): what a resume on another layout loads
PORTABLE_TAMPERINGS = {
    "portable_header_2^60": ("weights.safetensors", lambda c: header_length_2_60(c / "weights.safetensors")),
    "portable_moment_transposed": ("exp_avg.safetensors", lambda c: edit_header(c / "exp_avg.safetensors", transposed)),
    "portable_optimizer_strings": ("optimizer.json", lambda c: edit_json(c / "optimizer.json", numbers_as_strings)),
    "portable_weights_transposed": ("weights.safetensors", lambda c: [
        edit_header(c / f"{k}.safetensors", transposed) for k in ("weights", "exp_avg", "exp_avg_sq")]),
}
VERIFIES = ("legacy_pickle_payload", "transposed_everywhere", "portable_weights_transposed")  # see check_verbs


def mutate_bytes(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        data[at] = rng.choice(b'{}[],:"0123456789-.eE ntf') if rng.random() < 0.7 else rng.randrange(256)
    path.write_bytes(bytes(data))


ODD_VALUES = ("x", "10", -1, 2 ** 70, 0.5, None, True, [], {}, [1, "a"], {"a": 1})


def mutate_value(path: Path, rng: random.Random) -> None:
    """One value anywhere in a JSON file replaced by one of another kind (a manifest's own digest then
    recomputed, as whoever edits it would)."""
    from pretrain.checkpoint.integrity import manifest_digest

    doc = json.loads(path.read_text())
    slots, todo = [], [doc]
    while todo:  # every (container, key) of the document
        node = todo.pop()
        for k in (node if isinstance(node, dict) else range(len(node))):
            slots.append((node, k))
            if isinstance(node[k], (dict, list)):
                todo.append(node[k])
    node, key = rng.choice(slots)  # the walk's order is the file's: the same choice for the same seed
    node[key] = rng.choice(ODD_VALUES)
    if path.name == "manifest.json" and isinstance(doc, dict):
        doc["manifest_sha256"] = manifest_digest(doc)
    path.write_text(json.dumps(doc))


def tampered(root: Path, dest: Path, tamper, recommit: bool = True) -> Path:
    """A copy `dest` of checkpoint root `root` with checkpoint STEP changed by `tamper` and (unless not
    `recommit`) its manifest recomputed, as an attacker with write access would."""
    copy_run(root, dest)
    tamper(dest / STEP)
    if recommit:
        write_manifest(dest / STEP, 10)
    return dest


# ---------------------------------------------------------------- what every command must do
def refused(res, file: str, rc=(1, 2)) -> str:
    """Exit status 1 or 2, no traceback, one line on stderr, naming `file`; returns that line."""
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text[-3000:]
    assert res.returncode in rc, text[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and file in lines[0], res.stderr[-3000:]
    return lines[0]


def ckpt_verbs(out: Path, tmp: Path, step: str = STEP) -> dict[str, object]:
    """Every `vgpt ckpt` verb on checkpoint `step` of checkpoint root `out` (prune last: it may delete)."""
    step = ["--step", str(int(step.split("_")[1]))]
    res = {"verify": cli("ckpt", "verify", str(out), *step),
           "list": cli("ckpt", "list", str(out), "--verify"),
           "inspect": cli("ckpt", "inspect", str(out), *step),
           "export": cli("ckpt", "export", str(out), *step, "--out", str(tmp / "export")),
           "reshard": cli("ckpt", "reshard", str(out), *step, "--dp", "1", "--out", str(tmp / "resharded"))}
    res["prune"] = cli("ckpt", "prune", str(out), "--keep-last", "1")
    return res


def check_verbs(res: dict, root: Path, file: str, verifies: bool = False, step: str = STEP) -> None:
    """The verbs of checkpoint `step` of `root`, tampered: refused, one line each, naming `file`; listed as
    BROKEN; prune leaves it (a broken checkpoint is neither counted nor removed).
    `verifies`: files only their reader refuses (a DeepSpeed .pt: a pickle, not unpickled to verify; tensors
    that agree with each other but not with the model, which only the readers build)."""
    for verb in ("inspect", "export", "reshard"):
        refused(res[verb], file, rc=(1,))
    if verifies:
        assert all(res[v].returncode == 0 and "Traceback" not in res[v].stdout + res[v].stderr
                   for v in ("verify", "list", "prune")), {v: res[v].stdout + res[v].stderr for v in res}
        return
    verify = res["verify"]
    assert verify.returncode == 1 and "Traceback" not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    assert f"{step}: BROKEN" in verify.stdout and file in verify.stdout, verify.stdout
    listing = res["list"]
    assert listing.returncode == 1 and "Traceback" not in listing.stdout + listing.stderr, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(step))
    assert "BROKEN" in row and file in row, row
    prune = res["prune"]
    assert prune.returncode == 1 and "Traceback" not in prune.stdout + prune.stderr, prune.stdout + prune.stderr
    assert (root / step).is_dir() and step not in prune.stdout, prune.stdout  # left in place, and named:
    assert [line for line in prune.stderr.splitlines() if line.startswith(f"vgpt ckpt prune: {step} is broken")
            and file in line], prune.stderr


def no_traceback(res) -> None:
    text = res.stdout + res.stderr
    assert "Traceback" not in text and res.returncode in (0, 1, 2), text[-3000:]
    if res.returncode:
        assert len(res.stderr.strip().splitlines()) <= 1 or res.stdout.count("BROKEN"), res.stderr[-3000:]


# ---------------------------------------------------------------- resume: one Trainer, many tamperings
def resume_all(work: Path, ckpts: list[str]) -> list[dict]:
    """`Trainer.resume(path)` (what `vgpt train --resume PATH` does) on each checkpoint, in one process,
    one engine: each outcome, with the traceback of anything that is not a refusal."""
    from jobconfig.errors import ConfigError
    from jobconfig.loader import load_config
    from pretrain.checkpoint.integrity import CheckpointError
    from pretrain.training.trainer import Trainer

    overrides = [a for a in TINY if a.startswith("--") and a != "--config"] + ONE_RANK
    cfg = load_config(REPO / "configs/debug.yaml", [*overrides, "--parallel.device=cpu",
                                                    f"--train.out_dir={work}"])
    trainer = Trainer(cfg)
    out = []
    for path in ckpts:
        try:
            trainer.resume(path)
            out.append({"path": path, "ok": True, "step": trainer.step})
        except (CheckpointError, ConfigError) as e:
            out.append({"path": path, "ok": False, "type": type(e).__name__, "message": str(e),
                        "config_error": isinstance(e, ConfigError)})
        except Exception as e:  # noqa: BLE001 - what the test reports as a failure
            out.append({"path": path, "ok": False, "type": type(e).__name__, "message": str(e),
                        "traceback": traceback.format_exc()})
    return out


def run_resumes(work: Path, ckpts: list[Path]) -> list[dict]:
    res = subprocess.run([sys.executable, str(Path(__file__)), str(work), *map(str, ckpts)], env=env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def portable_root(one_rank_run, tmp_path_factory) -> Path:
    """Checkpoint STEP of the shared run in the portable form (`vgpt ckpt reshard`), as a checkpoint root."""
    root = tmp_path_factory.mktemp("portable") / "checkpoints"
    res = cli("ckpt", "reshard", str(one_rank_run), "--dp", "1", "--out", str(root))
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture(scope="module")
def tampered_roots(one_rank_run, portable_root, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint root, the file its refusal names): every tampering of CHECKPOINT_TAMPERINGS
    on a copy of the shared run's checkpoints, and of PORTABLE_TAMPERINGS on a copy of its portable form."""
    base = tmp_path_factory.mktemp("hostile")
    return {name: (tampered(root, base / name, fn), file)
            for root, tamperings in ((one_rank_run / "checkpoints", CHECKPOINT_TAMPERINGS),
                                     (portable_root, PORTABLE_TAMPERINGS))
            for name, (file, fn) in tamperings.items()}


def test_every_ckpt_verb_refuses_each_tampering_in_one_line(one_rank_run, portable_root, tampered_roots, tmp_path):
    for control in (one_rank_run / "checkpoints", portable_root):  # the verbs work on the untouched ones
        res = ckpt_verbs(copy_run(control, tmp_path / f"control-{control.parent.name}"), tmp_path / "control-out")
        assert all(r.returncode == 0 for r in res.values()), {k: r.stderr for k, r in res.items()}
    for name, (root, file) in tampered_roots.items():
        check_verbs(ckpt_verbs(root, tmp_path / name), root, file, verifies=name in VERIFIES)
    assert not any((root / MARKER).exists() for root, _ in tampered_roots.values())


def test_resume_refuses_each_tampering_in_one_line(one_rank_run, portable_root, tampered_roots, mutated_runs,
                                                   tmp_path):
    """Every tampering refused (a ConfigError: one line and exit 2 under `vgpt train`, no restart under
    torchrun), naming the file; every mutation refused so or resumed, never anything else."""
    controls = [one_rank_run / "checkpoints" / STEP, portable_root / STEP]
    ckpts = controls + [root / STEP for root, _ in tampered_roots.values()] + [root / STEP for _, root in mutated_runs]
    results = run_resumes(tmp_path / "resume", ckpts)
    for r in results[:len(controls)]:  # the harness can resume: a refusal is one
        assert r["ok"] and r["step"] == 10, r
    results = results[len(controls):]
    for (name, (_, file)), r in zip(tampered_roots.items(), results):
        assert not r["ok"] and "traceback" not in r, (name, r)
        assert r["config_error"] and "\n" not in r["message"] and file in r["message"], (name, r)
    for (name, _), r in zip(mutated_runs, results[len(tampered_roots):]):
        assert r["ok"] or (r.get("config_error") and "\n" not in r["message"]), (name, r)
    assert not any((root / MARKER).exists() for root, _ in tampered_roots.values())
    # and through the command line, once: exit 2, one line
    root, file = tampered_roots["engine_numbers_as_strings"]
    res = vgpt("train", *TINY, *ONE_RANK, f"--train.out_dir={tmp_path / 'cli'}", "--resume", str(root / STEP))
    assert "engine.json" in refused(res, file, rc=(2,))


def fragment_overlap(ckpt: Path) -> None:
    """Rank 1's piece of the parameter the two ZeRO-2 partitions split starts 4 elements early."""
    def shift(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["vgpt"])
        frag = next(f for f in meta["fragments"].values() if f[0] > 0)
        frag[0] -= 4
        header["__metadata__"]["vgpt"] = json.dumps(meta)
    edit_header(ckpt / "rank-00001.safetensors", shift)


TWO_RANK_TAMPERINGS = {  # what only a checkpoint of several ranks can hold
    "fragment_overlap": ("rank-00001.safetensors", fragment_overlap),
    "rank_file_missing": ("engine.json", lambda c: (c / "rank-00001.safetensors").unlink()),
}


def test_every_ckpt_verb_refuses_tampered_zero2_partitions(two_rank_zero2, tmp_path):
    """The shared two-rank ZeRO-2 run (tests/conftest.py): partitions that overlap, or a rank's missing."""
    newest = sorted((two_rank_zero2 / "checkpoints").glob("step_*"))[-1]
    for name, (file, fn) in TWO_RANK_TAMPERINGS.items():
        root = tmp_path / name
        copy_run(two_rank_zero2 / "checkpoints", root)
        fn(root / newest.name)
        write_manifest(root / newest.name, int(newest.name.split("_")[1]))
        check_verbs(ckpt_verbs(root, tmp_path / f"{name}-out", newest.name), root, file, step=newest.name)


@pytest.fixture(scope="module")
def export(one_rank_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    res = cli("ckpt", "export", str(one_rank_run), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def export_loaders(path: Path) -> dict[str, str | None]:
    """Each export loader on `path`: None when it loaded, else the refusal's message; anything but a
    refusal (ConfigError) is raised."""
    from jobconfig.errors import ConfigError
    from pretrain.checkpoint.export import load_exported_model, read_export_metadata, read_export_tensors

    out = {}
    for name, fn in (("metadata", read_export_metadata), ("tensors", read_export_tensors),
                     ("model", load_exported_model)):
        try:
            fn(path)
            out[name] = None
        except ConfigError as e:
            out[name] = str(e)
    return out


WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORT_TAMPERINGS = {
    "header_2^60": (WEIGHTS, lambda e: header_length_2_60(e / WEIGHTS), ("tensors", "model")),
    "offsets_out_of_range": (WEIGHTS, lambda e: edit_header(e / WEIGHTS, offsets_out_of_range), ("tensors", "model")),
    "offsets_overlapping": (WEIGHTS, lambda e: edit_header(e / WEIGHTS, offsets_overlapping), ("tensors", "model")),
    "transposed": (WEIGHTS, lambda e: edit_header(e / WEIGHTS, transposed), ("model",)),
    "config_list": ("config.json", lambda e: (e / "config.json").write_text("[1,2,3]"), ("metadata", "model")),
    "config_deep": ("config.json", lambda e: (e / "config.json").write_text(DEEP), ("metadata", "model")),
    "config_shape_list": ("config.json", lambda e: edit_json(e / "config.json", lambda c: {**c, "hidden_size": [64]}),
                          ("metadata", "model")),
}


def test_export_loaders_refuse_each_tampering_in_one_line(export, tmp_path):
    assert export_loaders(export) == {"metadata": None, "tensors": None, "model": None}
    for name, (file, tamper, loaders) in EXPORT_TAMPERINGS.items():
        victim = shutil.copytree(export, tmp_path / name)
        tamper(victim)
        got = export_loaders(victim)
        for loader in loaders:
            assert got[loader] and "\n" not in got[loader] and str(victim / file) in got[loader], (name, loader, got)


@pytest.fixture(scope="module")
def mutated_runs(one_rank_run, tmp_path_factory) -> list[tuple[str, Path]]:
    """(name, run copy): MUTATIONS byte mutations and as many value mutations (seeded) of each JSON file
    of checkpoint STEP, its manifest recomputed (a mutated manifest: as it is, or its digest recomputed)."""
    rng, base, out = random.Random(28), tmp_path_factory.mktemp("mutated"), []
    for file in ("engine.json", "trainer_state.json", "manifest.json"):
        for kind, mutate in (("bytes", mutate_bytes), ("value", mutate_value)):
            for i in range(MUTATIONS):
                name = f"{file}-{kind}-{i}"
                out.append((name, tampered(one_rank_run / "checkpoints", base / name, lambda c: mutate(c / file, rng),
                                           recommit=file != "manifest.json")))
    return out


def test_random_mutations_of_every_json_file_never_end_in_a_traceback(mutated_runs, portable_root, export, tmp_path):
    rng = random.Random(28)
    for name, out in mutated_runs:
        for res in ckpt_verbs(out, tmp_path / name).values():
            no_traceback(res)
    for kind, mutate in (("bytes", mutate_bytes), ("value", mutate_value)):
        for i in range(MUTATIONS):  # optimizer.json: the portable form's
            root = shutil.copytree(portable_root, tmp_path / f"portable-{kind}-{i}")
            mutate(root / STEP / "optimizer.json", rng)
            write_manifest(root / STEP, 10)
            for res in (cli("ckpt", "verify", str(root)), cli("ckpt", "inspect", str(root), "--step", "10"),
                        cli("ckpt", "export", str(root), "--step", "10", "--out", str(tmp_path / f"pe-{kind}-{i}"))):
                no_traceback(res)
            victim = shutil.copytree(export, tmp_path / f"export-{kind}-{i}")
            mutate(victim / "config.json", rng)
            export_loaders(victim)  # a refusal or a load, nothing else


if __name__ == "__main__":  # run_resumes: WORK CKPT... -> one JSON list on the last line
    print(json.dumps(resume_all(Path(sys.argv[1]), sys.argv[2:])))
