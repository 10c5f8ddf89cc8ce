"""The command line documents itself: every verb's `--help` lists every config key it takes (type,
default, the field's comment), `vgpt ckpt <verb> --help` only that verb's options, `vgpt` without a
command exits 2, and a bad value is reported with where it came from (file or command line)."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from jobconfig.job import JobConfig
from orchestration.cli import SUBCOMMANDS, main
from orchestration.launch.cluster import ClusterConfig
from orchestration.sweep.config import SweepConfig


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree, walked here independently of jobconfig/help.py."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def listed(text: str) -> list[str]:
    """The keys a help text lists, one `  --key=TYPE` line each."""
    return re.findall(r"^  --([\w.]+)=\S", text, flags=re.M)


def test_train_help_lists_every_key_of_the_config_tree_with_type_default_and_comment(capsys):
    text = help_of(capsys, "train")
    assert listed(text) == leaf_keys(JobConfig) and len(listed(text)) > 100
    assert text.split("\n\n")[0].endswith("[--section.key=value ...]")  # the usage names the overrides
    assert re.search(r"--config CONFIG\s+a job YAML", text)               # --config has help text
    lines = {k: line for k, line in zip(listed(text), re.findall(r"^  --[\w.]+=.*$", text, flags=re.M))}
    assert re.search(r"--train\.steps=int\s+\[200\]", lines["train.steps"])
    assert "--model.attention={auto,flex,blockwise,dense}" in lines["model.attention"]
    # the description is the field's comment: the lines above it, or the one trailing it
    assert re.search(r"--parallel\.deepspeed=mapping\s+\[\{\}\] deep-merged over the generated DeepSpeed config", text)
    assert re.search(r"--model\.pos_embed_max_size=int\s+\[192\] side of the 2D sin-cos table", text)
    # defaults come from the tree as built, a section's default factory included
    default_dir = JobConfig().precompute.inputs.dir
    assert re.search(rf"--precompute\.inputs\.dir=str\|null\s+\[{re.escape(str(default_dir))}\]", text)
    assert "--train.betas=[float, float]" in text and "--predict.i3d_path=str|null" in text


def test_every_verb_has_help_and_the_config_verbs_list_their_keys(capsys):
    for verb in SUBCOMMANDS:
        assert help_of(capsys, verb).startswith(f"usage: vgpt {verb}")
    assert listed(help_of(capsys, "sweep")) == leaf_keys(SweepConfig)
    assert listed(help_of(capsys, "config")) == leaf_keys(JobConfig)
    assert listed(help_of(capsys, "precompute")) == leaf_keys(_section("precompute"), "precompute.")
    launch = listed(help_of(capsys, "launch"))
    assert launch == leaf_keys(JobConfig) + leaf_keys(ClusterConfig, "cluster.")
    assert "cluster.kubernetes.runtime" in launch
    predict = listed(help_of(capsys, "predict"))
    assert predict == [k for k in leaf_keys(JobConfig) if k.split(".")[0] in ("model", "predict")]


def _section(name: str) -> type:
    return typing.get_type_hints(JobConfig)[name]


def test_ckpt_verbs_have_their_own_parsers(capsys):
    def options(text: str) -> set[str]:
        return set(re.findall(r"(--[\w-]+)", text)) - {"--help"}

    assert options(help_of(capsys, "ckpt", "verify")) == {"--step", "--endpoint-url"}
    assert options(help_of(capsys, "ckpt", "list")) == {"--verify", "--endpoint-url"}
    assert options(help_of(capsys, "ckpt", "inspect")) == {"--step"}
    assert options(help_of(capsys, "ckpt", "export")) == {"--step", "--endpoint-url", "--out", "--dtype",
                                                          "--max-shard-size"}
    assert options(help_of(capsys, "ckpt", "reshard")) == {"--step", "--endpoint-url", "--dp", "--tp", "--sp", "--out"}
    assert options(help_of(capsys, "ckpt", "prune")) == {"--keep-last", "--keep-every"}
    with pytest.raises(SystemExit) as done:  # an option of another verb is refused
        main(["ckpt", "verify", "some/run", "--out", "x"])
    assert done.value.code == 2 and "unrecognized arguments: --out x" in capsys.readouterr().err


def test_vgpt_without_a_command_exits_2_and_help_exits_0(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: vgpt <command>" in err and "a command is required" in err
    assert main(["--help"]) == 0 and "commands:" in capsys.readouterr().out


def test_a_bad_value_names_where_it_came_from(capsys, tmp_path):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err.strip()

    assert error("config", "--config", "configs/debug.yaml", "--train.steps=many") == \
        "vgpt config: train.steps: got 'many', expected an integer (from the command line: --train.steps)"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: debug}\ntrain: {steps: many}\n")
    assert error("config", "--config", str(bad), "--train.lr=0.5") == \
        f"vgpt config: train.steps: got 'many', expected an integer (in {bad})"
    # each valid alone, wrong together: both named
    assert error("config", "--config", "configs/debug.yaml", "--model.hidden_size=60").endswith(
        "(in configs/debug.yaml with the command line's --model.hidden_size)")
    # a curriculum: the override is not blamed on the stage's file
    assert error("train", "--config", "configs/pretrain.yaml", "--train.stepz=1").endswith(
        "(from the command line: --train.stepz)")
    # `vgpt launch`: a cluster override is named as it was typed
    assert error("launch", "--stage", "1", "--cluster", "configs/cluster/local-cpu.yaml", "--target", "k8s", "--out",
                 str(tmp_path / "launch"), "--cluster.elastic.max_restarts=-1").endswith(
        "(from the command line: --cluster.elastic.max_restarts)")
    assert not (tmp_path / "launch").exists()
