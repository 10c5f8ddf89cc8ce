"""`vgpt ckpt`: look after a run's checkpoints without starting a job.

    vgpt ckpt list    RUN_OR_CKPT_ROOT          steps, stage, consumed samples, size, complete or not
    vgpt ckpt verify  RUN_OR_CKPT_ROOT [--step N]  re-hash every file against its manifest; exit 1 on a problem
    vgpt ckpt inspect RUN_OR_CKPT_ROOT [--step N]  config, parallel layout, parameter shapes
    vgpt ckpt export  RUN_OR_CKPT_ROOT --out F [--step N] [--dtype fp32|bf16]
                                                consolidated safetensors (ZeRO 0-3 shards merged), loadable
                                                by inference and by the next stage
    vgpt ckpt prune   RUN_OR_CKPT_ROOT --keep-last K [--keep-every M]

RUN_OR_CKPT_ROOT is a run's out_dir or its `checkpoints/` folder. `--step`
defaults to the newest complete checkpoint. Export reads the DeepSpeed shards
offline with DeepSpeed's own consolidation (no process group, no GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.checkpoint import MANIFEST, TRAINER_STATE, CheckpointManager, tag_for, verify


def _root(path: str) -> Path:
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _pick(manager: CheckpointManager, step: int | None) -> Path:
    if step is not None:
        ckpt = manager.root / tag_for(step)
        if not ckpt.is_dir():
            raise SystemExit(f"vgpt ckpt: no checkpoint for step {step} under {manager.root}")
        return ckpt
    ckpt = manager.newest_complete(full_verify=False)
    if ckpt is None:
        raise SystemExit(f"vgpt ckpt: no complete checkpoint under {manager.root}")
    return ckpt


def _state(ckpt: Path) -> dict:
    f = ckpt / TRAINER_STATE
    return json.loads(f.read_text()) if f.is_file() else {}


def cmd_list(manager: CheckpointManager, args) -> int:
    latest = (manager.root / "latest").read_text().strip() if (manager.root / "latest").is_file() else None
    print(f"{'tag':16s} {'stage':8s} {'step':>7s} {'samples':>9s} {'size MB':>9s}  state")
    for tag in manager.tags():
        ckpt = manager.root / tag
        st = _state(ckpt)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20
        complete = (ckpt / MANIFEST).is_file()
        mark = ("complete" if complete else "INCOMPLETE") + ("  <- latest" if tag == latest else "")
        print(f"{tag:16s} {st.get('stage', '?'):8s} {st.get('step', '?'):>7} {st.get('consumed_samples', '?'):>9} "
              f"{size:9.1f}  {mark}")
    return 0


def cmd_verify(manager: CheckpointManager, args) -> int:
    tags = [tag_for(args.step)] if args.step is not None else manager.tags()
    bad = 0
    for tag in tags:
        problems = verify(manager.root / tag, full=True)
        print(f"{tag}: " + ("ok" if not problems else "BROKEN"))
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_inspect(manager: CheckpointManager, args) -> int:
    ckpt = _pick(manager, args.step)
    st = _state(ckpt)
    cfg = st.get("config", {})
    print(f"checkpoint {ckpt}")
    print(f"stage {st.get('stage')}  step {st.get('step')}  consumed samples {st.get('consumed_samples')}  "
          f"world size {st.get('world_size')}")
    print("parallel: " + json.dumps(cfg.get("parallel", {})))
    print("model:    " + json.dumps(cfg.get("model", {})))
    sd = _consolidated(ckpt)
    for k, v in sd.items():
        print(f"  {k:60s} {str(tuple(v.shape)):>20s} {v.dtype}")
    print(f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M parameters")
    return 0


def _consolidated(ckpt: Path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def cmd_export(manager: CheckpointManager, args) -> int:
    import torch

    from orchestration.config import from_dict
    from pretrain.config import ModelConfig
    from pretrain.export import save_export

    ckpt = _pick(manager, args.step)
    problems = verify(ckpt, full=True)
    if problems:
        print(f"vgpt ckpt export: {ckpt} is broken:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    st = _state(ckpt)
    model_cfg = from_dict(ModelConfig, st["config"]["model"], "model")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out = save_export(_consolidated(ckpt), args.out, model_cfg, dtype=dtype,
                      extra={"stage": st.get("stage"), "step": st.get("step"), "source": str(ckpt)})
    print(f"exported {ckpt.name} ({args.dtype}) to {out}")
    return 0


def cmd_prune(manager: CheckpointManager, args) -> int:
    manager.keep_last, manager.keep_every = args.keep_last, args.keep_every
    removed = manager.prune()
    print(f"removed {len(removed)} checkpoint(s): {' '.join(removed) or '-'}")
    return 0


COMMANDS = {"list": cmd_list, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export, "prune": cmd_prune}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt ckpt", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("root", help="a run's out_dir or its checkpoints/ folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--out", default=None, help="export: the .safetensors file to write")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--keep-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "export" and not args.out:
        parser.error("export needs --out FILE")
    manager = CheckpointManager(_root(args.root))
    if not manager.root.is_dir():
        print(f"vgpt ckpt: {manager.root} does not exist", file=sys.stderr)
        return 2
    return COMMANDS[args.command](manager, args)
