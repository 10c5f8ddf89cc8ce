"""`vgpt ckpt`: look after a run's checkpoints without starting a job.

    vgpt ckpt list    ROOT                        steps, stage, consumed samples, layout, size, complete or not
    vgpt ckpt verify  ROOT [--step N]             re-hash every file against its manifest; exit 1 on a problem
    vgpt ckpt inspect ROOT [--step N]             config, parallel layout, parameter shapes
    vgpt ckpt export  ROOT --out F [--step N] [--dtype fp32|bf16]
                                                consolidated safetensors (ZeRO 0-3 and TP shards merged),
                                                loadable by inference and by the next stage
    vgpt ckpt reshard ROOT --dp N [--tp M] [--sp K] --out DST [--step N]
                                                the checkpoint in portable form under DST (a new checkpoint
                                                root): a run of that layout (or any other) resumes from it
    vgpt ckpt prune   ROOT --keep-last K [--keep-every M]

ROOT is a run's out_dir or its `checkpoints/` folder; `list`, `verify` and
`export` also take an object-store URL (s3://bucket/run), with credentials
from the environment only and the endpoint from --endpoint-url or
AWS_ENDPOINT_URL_S3. `--step` defaults to the newest complete checkpoint.
Export and inspect read the DeepSpeed shards offline (no process group, no
GPU), after the manifest check, with pretrain/ckpt_consolidate.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from parallel.dims import ParallelDims
from pretrain.checkpoint.deepspeed_files import read_checkpoint
from pretrain.checkpoint.export import save_export
from pretrain.checkpoint.integrity import MANIFEST, verify
from pretrain.checkpoint.manager import (
    PORTABLE,
    TRAINER_STATE,
    CheckpointManager,
    describe,
    layout_of,
    make_portable,
    tag_for,
    write_latest,
)
from pretrain.checkpoint.portable import read_weights
from pretrain.checkpoint.storage import RemoteRoot, is_remote


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


def _short_layout(st: dict) -> str:
    if not st:
        return "?"
    lay = layout_of(st)
    if lay.get("format") == PORTABLE:
        return "portable"
    return f"dp{lay.get('dp')} tp{lay.get('tp')} sp{lay.get('sp')} z{lay.get('zero_stage')}"


def _row(tag: str, st: dict, size: int, complete: bool, latest: str | None) -> str:
    mark = ("complete" if complete else "INCOMPLETE") + ("  <- latest" if tag == latest else "")
    return (f"{tag:16s} {st.get('stage', '?'):8s} {st.get('step', '?'):>7} {st.get('consumed_samples', '?'):>9} "
            f"{_short_layout(st):16s} {size / 2**20:9.1f}  {mark}")


HEADER = f"{'tag':16s} {'stage':8s} {'step':>7s} {'samples':>9s} {'layout':16s} {'size MB':>9s}  state"


def cmd_list(manager: CheckpointManager, args) -> int:
    latest = (manager.root / "latest").read_text().strip() if (manager.root / "latest").is_file() else None
    print(HEADER)
    for tag in manager.tags():
        ckpt = manager.root / tag
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        print(_row(tag, _state(ckpt), size, (ckpt / MANIFEST).is_file(), latest))
    return 0


def _report(results: list[tuple[str, list[str]]]) -> int:
    for tag, problems in results:
        print(f"{tag}: " + ("ok" if not problems else "BROKEN"))
        for p in problems:
            print(f"  {p}")
    return 1 if any(problems for _, problems in results) else 0


def cmd_verify(manager: CheckpointManager, args) -> int:
    tags = [tag_for(args.step)] if args.step is not None else manager.tags()
    return _report([(tag, verify(manager.root / tag, full=True)) for tag in tags])


def consolidated_weights(ckpt: Path, verified: bool = False):
    """Full-size fp32 weights of any checkpoint: native (any ZeRO stage, TP, DP) or portable."""

    layout = layout_of(_state(ckpt))
    if layout.get("format") == PORTABLE:
        if not verified and (problems := verify(ckpt)):
            raise SystemExit(f"vgpt ckpt: {ckpt} is broken:\n  " + "\n  ".join(problems))
        return read_weights(ckpt)
    return read_checkpoint(ckpt, with_optimizer=False, tp_plan=layout.get("tp_plan"), verified=verified).weights


def cmd_inspect(manager: CheckpointManager, args) -> int:
    ckpt = _pick(manager, args.step)
    st = _state(ckpt)
    cfg = st.get("config", {})
    print(f"checkpoint {ckpt}")
    print(f"stage {st.get('stage')}  step {st.get('step')}  consumed samples {st.get('consumed_samples')}  "
          f"world size {st.get('world_size')}")
    print("layout:   " + describe(layout_of(st)) + f" ({layout_of(st).get('format')})")
    print("parallel: " + json.dumps(cfg.get("parallel", {})))
    print("model:    " + json.dumps(cfg.get("model", {})))
    sd = consolidated_weights(ckpt)
    for k, v in sd.items():
        print(f"  {k:60s} {str(tuple(v.shape)):>20s} {v.dtype}")
    print(f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M parameters")
    return 0


def _export(ckpt: Path, out: str, dtype_name: str, source: str, verified: bool) -> Path:
    import torch

    st = _state(ckpt)
    model_cfg = from_dict(ModelConfig, st["config"]["model"], "model")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    return save_export(consolidated_weights(ckpt, verified=verified), out, model_cfg, dtype=dtype,
                       extra={"stage": st.get("stage"), "step": st.get("step"), "source": source})


def cmd_export(manager: CheckpointManager, args) -> int:
    ckpt = _pick(manager, args.step)
    problems = verify(ckpt, full=True)
    if problems:
        print(f"vgpt ckpt export: {ckpt} is broken:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    out = _export(ckpt, args.out, args.dtype, str(ckpt), verified=True)
    print(f"exported {ckpt.name} ({args.dtype}) to {out}")
    return 0


def cmd_reshard(manager: CheckpointManager, args) -> int:

    src = _pick(manager, args.step)
    st = _state(src)
    dims = ParallelDims(args.dp * args.tp * args.sp, args.tp, args.sp)
    try:
        dims.check_model(from_dict(ModelConfig, st["config"]["model"], "model"))
    except ConfigError as e:
        print(f"vgpt ckpt reshard: {e}", file=sys.stderr)
        return 2
    dst_root = Path(args.out)
    if dst_root.resolve() == manager.root.resolve():
        print(f"vgpt ckpt reshard: --out {dst_root} is the source's own checkpoint root; give a new one",
              file=sys.stderr)
        return 2
    target = {"world_size": dims.world_size, "dp": dims.dp, "tp": dims.tp, "sp": dims.sp}
    dst = make_portable(src, dst_root / src.name, target)
    write_latest(dst_root, src.name)
    print(f"resharded {src} ({describe(layout_of(st))}) for {describe(target)} into {dst}")
    print(f"resume: vgpt train ... --resume {dst}   (or --train.out_dir={dst_root.parent} when "
          f"{dst_root.name} is that run's checkpoints/ folder)")
    return 0


def cmd_prune(manager: CheckpointManager, args) -> int:
    manager.keep_last, manager.keep_every = args.keep_last, args.keep_every
    removed = manager.prune()
    print(f"removed {len(removed)} checkpoint(s): {' '.join(removed) or '-'}")
    return 0


# ---------------------------------------------------------------- object storage
def remote_main(args) -> int:

    root = RemoteRoot(args.root, args.endpoint_url)
    if not root.exists():
        print(f"vgpt ckpt: {root.url()} does not exist", file=sys.stderr)
        return 2
    if args.command == "list":
        latest = root.latest()
        print(HEADER)
        for tag in root.tags():
            print(_row(tag, root.trainer_state(tag), root.size(tag), root.is_complete(tag), latest))
        return 0
    if args.command == "verify":
        tags = [tag_for(args.step)] if args.step is not None else root.tags()
        return _report([(tag, root.verify(tag)) for tag in tags])
    tag = tag_for(args.step) if args.step is not None else root.newest_complete()
    if tag is None:
        print(f"vgpt ckpt: no complete checkpoint under {root.url()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vgpt-ckpt-") as tmp:
        local = Path(tmp) / tag
        problems = root.fetch(tag, local)
        if problems:
            print(f"vgpt ckpt export: {root.url(tag)} is broken:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        out = _export(local, args.out, args.dtype, root.url(tag), verified=True)
    print(f"exported {root.url(tag)} ({args.dtype}) to {out}")
    return 0


COMMANDS = {"list": cmd_list, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export,
            "reshard": cmd_reshard, "prune": cmd_prune}


REMOTE_COMMANDS = ("list", "verify", "export")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgpt ckpt", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("root", help="a run's out_dir or its checkpoints/ folder (list/verify/export: or s3://...)")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--out", default=None, help="export: the .safetensors file; reshard: the new checkpoint root")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--keep-every", type=int, default=0)
    parser.add_argument("--dp", type=int, default=None, help="reshard: data-parallel size of the target layout")
    parser.add_argument("--tp", type=int, default=1, help="reshard: tensor-parallel size of the target layout")
    parser.add_argument("--sp", type=int, default=1, help="reshard: sequence-parallel size of the target layout")
    parser.add_argument("--endpoint-url", default=None,
                        help="object store endpoint (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    if args.command in ("export", "reshard") and not args.out:
        parser.error(f"{args.command} needs --out")
    if args.command == "reshard" and (args.dp is None or min(args.dp, args.tp, args.sp) < 1):
        parser.error("reshard needs --dp N (and optionally --tp M, --sp K), all positive")

    if is_remote(args.root):
        if args.command not in REMOTE_COMMANDS:
            print(f"vgpt ckpt {args.command}: works on local checkpoints only; on object storage use "
                  f"{', '.join(REMOTE_COMMANDS)}", file=sys.stderr)
            return 2
        return remote_main(args)
    manager = CheckpointManager(_root(args.root))
    if not manager.root.is_dir():
        print(f"vgpt ckpt: {manager.root} does not exist", file=sys.stderr)
        return 2
    return COMMANDS[args.command](manager, args)
