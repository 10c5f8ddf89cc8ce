"""Acceptance ("fail loudly, lose nothing"): seeded mutations of the shipped configs (wrong types,
sections that are not mappings, unknown keys at every depth, bad paths, broken YAML) and bad flags,
fed to `vgpt train`, `vgpt precompute`, `vgpt predict` and `vgpt ckpt` in-process. Every one exits 2,
prints no traceback and creates no file."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from orchestration.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED = 20240531
SKIP = ("storage_options",)  # free-form mappings: any key is allowed there


def nodes(tree: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every mapping node (path, node), the root included, not descending into free-form mappings."""
    out = [(path, tree)]
    for k, v in tree.items():
        if isinstance(v, dict) and k not in SKIP:
            out += nodes(v, path + (k,))
    return out


def leaves(tree: dict, path: tuple = ()) -> list[tuple[tuple, object]]:
    out = []
    for k, v in tree.items():
        if k in SKIP:
            continue
        if isinstance(v, dict):
            out += leaves(v, path + (k,))
        else:
            out.append((path + (k,), v))
    return out


def get(tree: dict, path: tuple) -> dict:
    for k in path:
        tree = tree[k]
    return tree


def mutate(base: dict, rng: random.Random, i: int) -> tuple[str, dict]:
    """One invalid config: which kind of mutation, and the tree."""
    tree = copy.deepcopy(base)
    kind = rng.choice(["unknown_key", "wrong_type", "wrong_type", "section_not_mapping", "bad_number"])
    if kind == "unknown_key":
        path, node = rng.choice(nodes(tree))
        node[f"bogus_key_{i}"] = rng.choice([1, "x", {"a": 1}, [1, 2]])
        return f"unknown key under {'.'.join(path) or '<root>'}", tree
    if kind == "section_not_mapping":
        sections = [(p, n) for p, n in nodes(tree) if p]
        path, _ = rng.choice(sections)
        get(tree, path[:-1])[path[-1]] = rng.choice([17, "oops", [1, 2], True])
        return f"section {'.'.join(path)} not a mapping", tree
    if kind == "bad_number":
        numeric = [(p, v) for p, v in leaves(tree) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric:
            path, _ = rng.choice(numeric)
            get(tree, path[:-1])[path[-1]] = rng.choice(["many", "1.5.2", "ten"])
            return f"non-number {'.'.join(path)}", tree
    path, _ = rng.choice(leaves(tree))
    get(tree, path[:-1])[path[-1]] = {"nested": [1, {"deeper": None}]}  # a mapping where a value belongs
    return f"wrong type {'.'.join(path)}", tree


@pytest.fixture
def sandbox(no_s3_credentials):
    """The no-credentials tmp dir (conftest) with a stray file, a directory and a video folder."""
    tmp_path = no_s3_credentials
    (tmp_path / "a_file").write_text("not a config, not a checkpoint\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "videos").mkdir()
    return tmp_path


def run_case(capsys, tmp: Path, argv: list[str], label: str) -> None:
    before = set(tmp.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 2, f"{label}: {argv}: exit {rc}\n{text}"
    assert "Traceback" not in text, f"{label}: {argv}\n{text}"
    assert text.strip(), f"{label}: no message"
    created = set(tmp.rglob("*")) - before
    assert not created, f"{label}: {argv} created {created}"


def write(tmp: Path, name: str, tree: dict) -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def train_base(tmp: Path) -> dict:
    base = yaml.safe_load((REPO / "configs/debug.yaml").read_text())
    base["train"]["out_dir"] = str(tmp / "run")
    base["train"]["steps"] = 1
    base["data"] = {"root": str(tmp / "latents"), "stage": {"frames": 4, "interval": "fixed"}}
    base["parallel"] = {"precision": "fp32"}
    return base


def precompute_base(tmp: Path) -> dict:
    base = yaml.safe_load((REPO / "configs/precompute/tiny.yaml").read_text())
    base["precompute"]["inputs"]["dir"] = str(tmp / "videos")
    base["precompute"]["output"]["root"] = str(tmp / "latents")
    return base


def test_mutated_configs_and_bad_flags_exit_2_without_traceback_or_files(sandbox, capsys):
    tmp, rng = sandbox, random.Random(SEED)
    cases: list[tuple[str, list[str]]] = []
    tb, pb = train_base(tmp), precompute_base(tmp)
    for i in range(14):
        label, tree = mutate(tb, rng, i)
        assert str(get(tree, ("train",)).get("out_dir", tmp) if isinstance(tree.get("train"), dict)
                   else tmp).startswith(str(tmp))
        cases.append((f"train: {label}", ["train", "--config", write(tmp, f"train{i}.yaml", tree)]))
    for i in range(8):
        label, tree = mutate(pb, rng, i)
        cases.append((f"precompute: {label}", ["precompute", "--config", write(tmp, f"pre{i}.yaml", tree)]))
    for i in range(5):
        label, tree = mutate(tb, rng, 100 + i)
        cases.append((f"predict: {label}", ["predict", "--checkpoint", str(tmp / "none.safetensors"), "--video",
                                            str(tmp / "v.mp4"), "--out", str(tmp / "pred"), "--config",
                                            write(tmp, f"predict{i}.yaml", tree)]))
    good_train = write(tmp, "good_train.yaml", tb)
    good_pre = write(tmp, "good_pre.yaml", pb)
    (tmp / "broken.yaml").write_text("train:\n  steps: 3\n   lr: 1\n")
    (tmp / "empty.yaml").write_text("")
    train = ["train", "--config", good_train]
    cases += [
        ("train: broken YAML", ["train", "--config", str(tmp / "broken.yaml")]),
        ("train: empty YAML", ["train", "--config", str(tmp / "empty.yaml")]),
        ("train: config is a dir", ["train", "--config", str(tmp / "a_dir")]),
        ("train: config missing", ["train", "--config", str(tmp / "missing.yaml")]),
        ("train: latents root missing", train + ["--train.data=latents"]),
        ("train: latents root is a file", train + ["--train.data=latents", f"--data.root={tmp / 'a_file'}"]),
        ("train: root without index", train + ["--train.data=latents", f"--data.root={tmp / 'a_dir'}"]),
        ("train: s3 root, no credentials", train + ["--train.data=latents", "--data.root=s3://b/latents"]),
        ("train: out_dir is a file", train + [f"--train.out_dir={tmp / 'a_file'}"]),
        ("train: init_from missing", train + [f"--train.init_from={tmp / 'x.safetensors'}"]),
        ("train: init_from not an export", train + [f"--train.init_from={tmp / 'a_file'}"]),
        ("train: resume missing", train + ["--resume", str(tmp / "nock")]),
        ("train: resume not a checkpoint", train + ["--resume", str(tmp / "a_dir")]),
        ("train: nproc 0", train + ["--nproc=0"]),
        ("train: bad override value", train + ["--train.steps=abc"]),
        ("train: unknown override", train + ["--train.nosuch=1"]),
        ("train: broken override YAML", train + ["--train.lr=[1,"]),
        ("train: stage out of range", train + ["--stage=3"]),
        ("precompute: inputs missing", ["precompute", "--config", good_pre,
                                        f"--precompute.inputs.dir={tmp / 'novideos'}"]),
        ("precompute: list_file missing", ["precompute", "--config", good_pre, "--precompute.inputs.dir=null",
                                           f"--precompute.inputs.list_file={tmp / 'list.txt'}"]),
        ("precompute: output root a file", ["precompute", "--config", good_pre,
                                            f"--precompute.output.root={tmp / 'a_file'}"]),
        ("precompute: s3 output, no credentials", ["precompute", "--config", good_pre,
                                                   "--precompute.output.root=s3://b/out"]),
        ("precompute: vae dir missing", ["precompute", "--config", good_pre,
                                         f"--precompute.vae.path={tmp / 'novae'}"]),
        ("predict: checkpoint is a dir", ["predict", "--checkpoint", str(tmp / "a_dir"), "--video", "v.mp4"]),
        ("predict: checkpoint not an export", ["predict", "--checkpoint", str(tmp / "a_file"), "--video", "v.mp4"]),
        ("predict: context 0", ["predict", "--checkpoint", str(tmp / "a_file"), "--video", "v.mp4",
                                "--context", "0"]),
        ("predict: no --video", ["predict", "--checkpoint", str(tmp / "a_file")]),
        ("predict: bad override", ["predict", "--checkpoint", str(tmp / "a_file"), "--video", "v.mp4",
                                   "--predict.steps=many"]),
        ("ckpt: list missing root", ["ckpt", "list", str(tmp / "norun")]),
        ("ckpt: verify a file", ["ckpt", "verify", str(tmp / "a_file")]),
        ("ckpt: export missing root", ["ckpt", "export", str(tmp / "norun"), "--out", str(tmp / "e.safetensors")]),
        ("ckpt: export without --out", ["ckpt", "export", str(tmp / "a_dir")]),
        ("ckpt: inspect empty dir", ["ckpt", "inspect", str(tmp / "a_dir")]),
        ("ckpt: unknown verb", ["ckpt", "explode", str(tmp / "a_dir")]),
        ("ckpt: bad --step", ["ckpt", "inspect", str(tmp / "a_dir"), "--step", "x"]),
    ]
    assert len(cases) >= 30
    for label, argv in cases:
        run_case(capsys, tmp, argv, label)
