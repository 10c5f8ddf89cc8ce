"""`vgpt ckpt`: look after a run's checkpoints without starting a job.

    vgpt ckpt list    ROOT [--verify]             steps, stage, consumed samples, layout, size, complete or not
                                                (sizes against the manifest; --verify: hashes too)
    vgpt ckpt verify  ROOT [--step N]             re-hash every file against its manifest; exit 1 on a problem,
                                                2 when ROOT holds no checkpoints
    vgpt ckpt inspect ROOT [--step N]             config, parallel layout, parameter shapes
    vgpt ckpt export  ROOT --out DIR [--step N] [--dtype fp32|bf16] [--max-shard-size 5GB]
                                                consolidated weights (ZeRO 0-3 and TP shards merged) as a
                                                from_pretrained directory (config.json, sharded safetensors),
                                                loadable by inference, the next stage and diffusers
                                                (--out F.safetensors: the older single file)
    vgpt ckpt reshard ROOT --dp N [--tp M] [--sp K] --out DST [--step N]
                                                the checkpoint in portable form under DST (a new checkpoint
                                                root): a run of that layout (or any other) resumes from it;
                                                read one parameter at a time, by byte ranges (also from s3://)
    vgpt ckpt prune   ROOT --keep-last K [--keep-every M]

ROOT is a run's out_dir or its `checkpoints/` folder; `list`, `verify`,
`export` and `reshard` also take an object-store URL (s3://bucket/run), with credentials
from the environment only and the endpoint from --endpoint-url or
AWS_ENDPOINT_URL_S3. One rule picks the checkpoint of inspect, export and
reshard (CheckpointStore.choose): without `--step` the newest one that
verifies, naming on stderr the newer ones skipped and why; with `--step N`
that one, refused (exit 1) when it does not verify.
Export and inspect read the checkpoint's shards offline (no process group, no
GPU), after the manifest check, with the reader pretrain/checkpoint/formats.py
opens for its format (DeepSpeed's .pt files of earlier versions too, never
unpickling code). Local roots and object stores go through the same storage
layer (pretrain/checkpoint/storage.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from jobconfig.errors import ConfigError
from jobconfig.loader import from_dict
from jobconfig.model import ModelConfig
from orchestration.cli import reports_bad_input
from orchestration.preflight import check_s3_credentials
from parallel.dims import ParallelDims
from pretrain.checkpoint.export import DEFAULT_MAX_SHARD_SIZE, parse_shard_size, save_export
from pretrain.checkpoint.formats import Format, describe, layout_of, open_checkpoint
from pretrain.checkpoint.integrity import CheckpointError
from pretrain.checkpoint.fragment_reader import SavedFragments
from pretrain.checkpoint.manager import CheckpointManager, write_latest
from pretrain.checkpoint.reshard import make_portable, write_resharded
from pretrain.checkpoint.storage import CheckpointStore, read_trainer_state, tag_for
from pretrain.training.parallelize import TP_PLAN

HEADER = f"{'tag':16s} {'stage':8s} {'step':>7s} {'samples':>9s} {'layout':16s} {'size MB':>9s}  state"
REMOTE_COMMANDS = ("list", "verify", "export", "reshard")


def _pick(store: CheckpointStore, args, problems=None) -> str:
    """The checkpoint a verb works on, by the one rule of `CheckpointStore.choose`: `--step N` or
    the newest that verifies (every file re-hashed; `problems` replaces that check). The ones skipped
    are named on stderr; a broken `--step`, or no checkpoint that verifies, is refused."""
    choice = store.choose(args.step, full=True, problems=problems)
    tag = choice.required()  # none verifies: refused, naming each one and its problems
    for skipped in choice.skipped:
        print(f"vgpt ckpt {args.command}: skipped {skipped}", file=sys.stderr)
    return tag


def _short_layout(st: dict) -> str:
    if not st:
        return "?"
    lay = layout_of(st)
    if lay.get("format") == Format.PORTABLE:
        return "portable"
    return f"dp{lay.get('dp')} tp{lay.get('tp')} sp{lay.get('sp')} z{lay.get('zero_stage')}"


def _row(tag: str, st: dict, size: int, problems: list[str], latest: str | None) -> str:
    if not problems:
        mark = "complete"
    elif any(p.endswith("missing (save did not finish)") for p in problems):
        mark = "INCOMPLETE (no manifest)"
    else:
        mark = "BROKEN (" + "; ".join(problems) + ")"
    mark += "  <- latest" if tag == latest else ""
    return (f"{tag:16s} {st.get('stage', '?'):8s} {st.get('step', '?'):>7} {st.get('consumed_samples', '?'):>9} "
            f"{_short_layout(st):16s} {size / 2**20:9.1f}  {mark}")


def cmd_list(store: CheckpointStore, args) -> int:
    """A checkpoint is `complete` when every file's size matches its manifest (`--verify`: and its hashes).
    A listing exits 0 whatever it lists; with `--verify` it is a verification: 1 when a checkpoint is broken."""
    tags = _tags(store)
    latest = store.latest()
    print(HEADER)
    broken = False
    for tag in tags:
        files = store.files(tag)  # one listing gives the sizes of both columns: no request per file
        problems = store.verify(tag, args.verify, files=files)
        try:
            st = store.trainer_state(tag)
        except CheckpointError as e:  # a row of its own, not the end of the listing
            st, problems = {}, problems + [str(e)] * (str(e) not in problems)
        print(_row(tag, st, store.size(tag, files), problems, latest))
        broken = broken or bool(problems)
    return 1 if args.verify and broken else 0


def _tags(store: CheckpointStore) -> list[str]:
    if not (tags := store.tags()):
        raise ConfigError(f"no checkpoints (step_* folders) under {store.url()}")
    return tags


def cmd_verify(store: CheckpointStore, args) -> int:
    tags = _tags(store)
    if args.step is not None:
        if tag_for(args.step) not in tags:
            store.choose(args.step)  # raises: no such step, naming the ones there are
        tags = [tag_for(args.step)]
    results = [(tag, store.verify(tag)) for tag in tags]
    for tag, problems in results:
        print(f"{tag}: " + ("ok" if not problems else "BROKEN"))
        for p in problems:
            print(f"  {p}")
    return 1 if any(problems for _, problems in results) else 0


def consolidated_weights(ckpt: Path, verified: bool = False) -> dict[str, torch.Tensor]:
    """Full-size fp32 weights of a local checkpoint of any format (any ZeRO stage, TP, DP; or portable)."""
    # checkpoints record their TP plan; one without (written before plans were recorded) used this model's
    tp_plan = layout_of(read_trainer_state(ckpt)).get("tp_plan", TP_PLAN)
    return open_checkpoint(ckpt, verified=verified).read_full_state(with_optimizer=False, tp_plan=tp_plan).weights


def cmd_inspect(store: CheckpointStore, args) -> int:
    ckpt = store.local_dir(_pick(store, args))
    st = read_trainer_state(ckpt)
    cfg = st.get("config", {})
    print(f"checkpoint {ckpt}")
    print(f"stage {st.get('stage')}  step {st.get('step')}  consumed samples {st.get('consumed_samples')}  "
          f"world size {st.get('world_size')}")
    print("layout:   " + describe(layout_of(st)) + f" ({layout_of(st).get('format')})")
    print("parallel: " + json.dumps(cfg.get("parallel", {})))
    print("model:    " + json.dumps(cfg.get("model", {})))
    sd = consolidated_weights(ckpt, verified=True)
    for k, v in sd.items():
        print(f"  {k:60s} {str(tuple(v.shape)):>20s} {v.dtype}")
    print(f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M parameters")
    return 0


def cmd_export(store: CheckpointStore, args) -> int:
    parse_shard_size(args.max_shard_size)  # a typo is refused before the weights are consolidated
    with tempfile.TemporaryDirectory(prefix="vgpt-ckpt-") as tmp:
        # from an object store: a verified local copy, nothing is unpickled before its bytes are checked
        fetch = (lambda t: store.fetch(t, Path(tmp) / t)) if store.remote else None
        tag = _pick(store, args, problems=fetch)
        ckpt = Path(tmp) / tag if store.remote else store.local_dir(tag)
        st = read_trainer_state(ckpt, resumable=True)
        model_cfg = from_dict(ModelConfig, st["config"]["model"], "model")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        out = save_export(consolidated_weights(ckpt, verified=True), args.out, model_cfg, dtype=dtype,
                          extra={"stage": st.get("stage"), "step": st.get("step"), "source": store.url(tag),
                                 "init_from": st["config"].get("train", {}).get("init_from")},
                          max_shard_size=args.max_shard_size)
    print(f"exported {store.url(tag) if store.remote else tag} ({args.dtype}) to {out}")
    return 0


def cmd_reshard(store: CheckpointStore, args) -> int:
    tag = _pick(store, args)  # every file re-hashed (on an object store: streamed through the hasher once)
    st = store.trainer_state(tag, resumable=True)
    dims = ParallelDims(args.dp * args.tp * args.sp, args.tp, args.sp)
    dims.check_model(from_dict(ModelConfig, st["config"]["model"], "model"))
    dst_root = Path(args.out)
    if not store.remote and dst_root.resolve() == Path(store.root).resolve():
        print(f"vgpt ckpt reshard: --out {dst_root} is the source's own checkpoint root; give a new one",
              file=sys.stderr)
        return 2
    target = {"world_size": dims.world_size, "dp": dims.dp, "tp": dims.tp, "sp": dims.sp}
    if dims.tp > 1:
        target["tp_plan"] = TP_PLAN
    if store.remote:  # a sharded checkpoint read by byte ranges where it lies (the other formats: export it)
        if store.read_json(tag, "engine.json") is None:
            print(f"vgpt ckpt reshard: {store.url(tag)} is not in the sharded format; on object storage only "
                  "that one is resharded in place (copy it to local disk first)", file=sys.stderr)
            return 2
        saved = SavedFragments(store._path(tag), fs=store.fs, url=store.url(tag))
        try:
            dst = write_resharded(saved, st, store.fs.cat_file(store._path(tag, "rng.safetensors")),
                                  dst_root / tag, target)
        finally:
            saved.close()
    else:
        dst = make_portable(store.local_dir(tag), dst_root / tag, target, verified=True)
    write_latest(dst_root, tag)
    print(f"resharded {store.url(tag)} ({describe(layout_of(st))}) for {describe(target)} into {dst}")
    print(f"resume: vgpt train ... --resume {dst}   (or --train.out_dir={dst_root.parent} when "
          f"{dst_root.name} is that run's checkpoints/ folder)")
    return 0


def cmd_prune(store: CheckpointStore, args) -> int:
    manager = CheckpointManager(store.root, keep_last=args.keep_last, keep_every=args.keep_every)
    removed = manager.prune(full=True)  # files may have changed since they were written: re-hash them
    print(f"removed {len(removed)} checkpoint(s): {' '.join(removed) or '-'}")
    for tag, problems in manager.left_broken.items():  # never counted, never removed: a person should look
        print(f"vgpt ckpt prune: {tag} is broken, left in place: {problems[0]}", file=sys.stderr)
    return 1 if manager.left_broken else 0


COMMANDS = {"list": cmd_list, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export,
            "reshard": cmd_reshard, "prune": cmd_prune}


def build_parser() -> argparse.ArgumentParser:
    """`vgpt ckpt <verb>`: one sub-parser per verb, each with only the options that verb reads."""
    parser = argparse.ArgumentParser(prog="vgpt ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def verb(name: str, about: str, remote: bool = False, step: bool = False) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=about, description=about)
        where = " (or s3://bucket/run)" if remote else ""
        sub.add_argument("root", help=f"a run's out_dir or its checkpoints/ folder{where}")
        if step:
            sub.add_argument("--step", type=int, default=None,
                             help="this checkpoint (refused when it does not verify); default: the newest "
                                  "that verifies")
        if remote:
            sub.add_argument("--endpoint-url", default=None,
                             help="object store endpoint (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
        else:
            sub.set_defaults(endpoint_url=None)
        return sub

    sub = verb("list", "steps, stage, consumed samples, layout, size, complete or not", remote=True)
    sub.add_argument("--verify", action="store_true", help="re-hash every file (default: sizes against the "
                                                           "manifest only)")
    sub = verb("verify", "re-hash every file against its manifest; exit 1 on a problem, 2 when ROOT holds no "
                         "checkpoints", remote=True)
    sub.add_argument("--step", type=int, default=None, help="only this checkpoint (default: every one)")
    verb("inspect", "config, parallel layout, parameter shapes", step=True)
    sub = verb("export", "consolidated weights (ZeRO 0-3 and TP shards merged) as a from_pretrained directory, "
                         "loadable by inference, the next stage and diffusers", remote=True, step=True)
    sub.add_argument("--out", required=True, help="the export directory to write (config.json and sharded "
                                                  "safetensors); a path ending in .safetensors: the older "
                                                  "single-file export")
    sub.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    sub.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                     help="largest weights file of the directory, e.g. 2GB or 500MiB "
                          f"(default {DEFAULT_MAX_SHARD_SIZE})")
    sub = verb("reshard", "the checkpoint in portable form under a new checkpoint root, resumable by a run "
                          "of any layout", remote=True, step=True)
    sub.add_argument("--dp", type=int, required=True, help="data-parallel size of the target layout")
    sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the target layout")
    sub.add_argument("--sp", type=int, default=1, help="sequence-parallel size of the target layout")
    sub.add_argument("--out", required=True, help="the new checkpoint root")
    sub = verb("prune", "delete old checkpoints, keeping the newest K and every M-th")
    sub.add_argument("--keep-last", type=int, default=3)
    sub.add_argument("--keep-every", type=int, default=0)
    return parser


@reports_bad_input("ckpt")
def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reshard" and min(args.dp, args.tp, args.sp) < 1:
        parser.error(f"reshard: --dp/--tp/--sp: got {args.dp}/{args.tp}/{args.sp}, expected positive integers")
    check_s3_credentials({"ROOT": args.root})  # before any request: one line, not botocore's traceback
    store = CheckpointStore.of_run(args.root, args.endpoint_url)
    if store.remote and args.command not in REMOTE_COMMANDS:
        print(f"vgpt ckpt {args.command}: works on local checkpoints only; on object storage use "
              f"{', '.join(REMOTE_COMMANDS)}", file=sys.stderr)
        return 2
    if not store.exists():
        print(f"vgpt ckpt: {store.url()} does not exist", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](store, args)
    except CheckpointError as e:  # a broken checkpoint: one line, exit 1 like a failed verify
        print(f"vgpt ckpt {args.command}: {e}", file=sys.stderr)
        return 1
