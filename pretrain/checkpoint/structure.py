"""Whether the files of one checkpoint fit together.

What: `checkpoint_problems(ckpt, files)` runs schema.py's validators over every
file of a checkpoint directory (its JSON files, every safetensors header) and
then checks them against each other: each rank file's fragments name tensors of
the size they claim, the fragments of a parameter cover it once (no overlap, no
gap) with one shape, the module file's tensors have the fragments' shapes, the
moments of a portable checkpoint have its weights' shapes, the RNG state is one.
The first problem found is returned as a line naming the file, the field and
what was expected. (Against the model itself: formats.open_checkpoint.)

Why here and not in the readers: a full verification (storage.py,
`CheckpointStore.verify`) runs it after the checksums, so every reader of a
checkpoint (resume, `vgpt ckpt inspect/export/reshard/verify/list --verify`)
gets the same refusal before it reads a tensor, and the one checkpoint-choice
rule falls back past a checkpoint whose files do not fit. A tensor the path
taken would not read (a transposed module weight when the fp32 masters are
loaded) is refused too. Only headers and JSON are read, kilobytes per file, and
nothing here imports torch or the model: storage.py stays light to import.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from pretrain.checkpoint.integrity import RefusedFile
from pretrain.checkpoint.schema import (
    ENGINE,
    FLOAT_DTYPES,
    META_KEY,
    OPTIMIZER,
    PORTABLE_FORMAT,
    RNG_FILE,
    SHARDED_FORMAT,
    TRAINER_STATE,
    WEIGHTS,
    Header,
    engine_json,
    integer,
    obj,
    optimizer_json,
    read_json,
    refuse,
    safetensors_header,
    shape,
    show,
    string,
    trainer_state,
)

MOMENTS = ("exp_avg", "exp_avg_sq")  # full_state.MOMENTS, without importing the readers (and torch)
_RANK_FILE = re.compile(r"^rank-(\d{5})\.safetensors$")
_MODEL_FILE = re.compile(r"^model-tp(\d{2})\.safetensors$")


def checkpoint_problems(ckpt: Path, files: Iterable[str]) -> list[str]:
    """[] when the files of checkpoint directory `ckpt` (`files`: names relative to it, the manifest's)
    pass every schema and fit together; else one line naming the first problem."""
    try:
        check_checkpoint(Path(ckpt), set(files))
    except RefusedFile as e:
        return [str(e)]
    return []


def check_checkpoint(ckpt: Path, files: set[str]) -> None:
    # the safetensors files a reader of this directory's format opens (formats.py tells the format the same way)
    read = {RNG_FILE}
    if ENGINE in files:
        read |= {rel for rel in files if _RANK_FILE.match(rel) or _MODEL_FILE.match(rel)}
    elif OPTIMIZER in files:
        read |= {WEIGHTS, *(f"{k}.safetensors" for k in MOMENTS)}
    headers = {rel: safetensors_header(ckpt / rel) for rel in sorted(read & files)}
    if TRAINER_STATE in files:
        trainer_state(read_json(ckpt / TRAINER_STATE), ckpt / TRAINER_STATE)
    if RNG_FILE in headers:
        _check_rng(headers[RNG_FILE])
    if ENGINE in files:
        _check_sharded(ckpt, headers)
    elif OPTIMIZER in files:
        _check_portable(ckpt, headers)


def _check_rng(h: Header) -> None:
    import torch  # the size of a CPU generator's state; torch is imported by every reader of one anyway

    want = ["U8", [torch.get_rng_state().numel()]]
    if list(h.tensors) != ["cpu"] or list(h.tensors["cpu"]) != want:
        raise refuse(h.path, "tensors", f"one tensor 'cpu' of {want[0]} {want[1]} (a CPU RNG state)",
                     {k: f"{d} {s}" for k, (d, s) in h.tensors.items()})


def _check_sharded(ckpt: Path, headers: dict[str, Header]) -> None:
    meta = engine_json(read_json(ckpt / ENGINE), ckpt / ENGINE, SHARDED_FORMAT)
    ranks = {int(m.group(1)): h for rel, h in headers.items() if (m := _RANK_FILE.match(rel))}
    world = meta.get("layout", {}).get("world_size", len(ranks))
    if not ranks or sorted(ranks) != list(range(world)):
        raise refuse(ckpt / ENGINE, "layout.world_size", f"one rank file per rank, rank-00000..rank-{world - 1:05d}"
                                                         ".safetensors", sorted(ranks))
    # (tp rank, parameter) -> its shape, and the [begin, end) of it each fragment covers
    shapes: dict[tuple[int, str], list[int]] = {}
    spans: dict[tuple[int, str], list[tuple[int, int, Path]]] = {}
    for rank, h in sorted(ranks.items()):
        info = obj(h.meta_json(META_KEY), h.path, f"header __metadata__.{META_KEY}")
        field = f"header __metadata__.{META_KEY}"
        string(info.get("format"), h.path, f"{field}.format", (SHARDED_FORMAT,))
        integer(info.get("rank"), h.path, f"{field}.rank", rank, rank)
        tp = integer(info.get("tp_rank"), h.path, f"{field}.tp_rank")
        integer(info.get("zero_rank"), h.path, f"{field}.zero_rank")
        stage = integer(info.get("zero_stage"), h.path, f"{field}.zero_stage", 0, 3)
        for name, frag in obj(info.get("fragments"), h.path, f"{field}.fragments").items():
            where = f"{field}.fragments[{show(name)}]"
            if not (isinstance(frag, list) and len(frag) == 3):
                raise refuse(h.path, where, "[start, numel, shape]", frag)
            start, numel = integer(frag[0], h.path, f"{where}[0]"), integer(frag[1], h.path, f"{where}[1]")
            dims = shape(frag[2], h.path, f"{where}[2]")
            if shapes.setdefault((tp, name), dims) != dims:
                raise refuse(h.path, f"{where}[2]", f"{shapes[(tp, name)]}, the shape the other ranks record", dims)
            for kind in ("fp32", *MOMENTS, *(("module",) if stage == 3 else ())):
                key = f"{kind}/{name}"
                got = h.tensors.get(key)
                if got is None or got[1] != [numel] or got[0] not in FLOAT_DTYPES:
                    raise refuse(h.path, f"tensor {show(key)}", f"a 1-D float tensor of {numel} elements (as {where} "
                                                                "says)", got and f"{got[0]} {got[1]}")
            total = math.prod(dims)
            if numel and start < total:  # ZeRO-3 pads the last ranks' partitions past the end
                spans.setdefault((tp, name), []).append((start, min(start + numel, total), h.path))
            elif start > total and stage != 3:
                raise refuse(h.path, f"{where}[0]", f"a start inside the parameter's {total} elements", start)
    for (tp, name), dims in shapes.items():
        end = 0
        for begin, stop, path in sorted(spans.get((tp, name), [])):
            if begin != end:
                raise refuse(path, f"fragment of {show(name)} (TP rank {tp}) at [{begin}, {stop})",
                             f"to begin at element {end}, where the one before it ends (no overlap, no gap)")
            end = stop
        if end != math.prod(dims):
            raise refuse(ckpt, f"fragments of {show(name)} (TP rank {tp})",
                         f"to cover its {math.prod(dims)} elements (a rank file missing or cut)", end)
    for rel, h in headers.items():
        if m := _MODEL_FILE.match(rel):
            tp = int(m.group(1))
            info = obj(h.meta_json(META_KEY), h.path, f"header __metadata__.{META_KEY}")
            integer(info.get("tp_rank"), h.path, f"header __metadata__.{META_KEY}.tp_rank", tp, tp)
            for name, (_, dims) in h.tensors.items():
                if (tp, name) in shapes and dims != shapes[(tp, name)]:
                    raise refuse(h.path, f"tensor {show(name)} shape", f"{shapes[(tp, name)]}, as the rank files' "
                                                                       "fragments record", dims)


def _check_portable(ckpt: Path, headers: dict[str, Header]) -> None:
    optimizer_json(read_json(ckpt / OPTIMIZER), ckpt / OPTIMIZER, PORTABLE_FORMAT)
    weights = headers.get(WEIGHTS)
    if weights is None:
        raise refuse(ckpt, WEIGHTS, "present (optimizer.json makes this a portable checkpoint)")
    for kind in MOMENTS:
        h = headers.get(f"{kind}.safetensors")
        if h is None:
            raise refuse(ckpt, f"{kind}.safetensors", "present (optimizer.json makes this a portable checkpoint)")
        for name, (_, dims) in h.tensors.items():
            if name not in weights.tensors:
                raise refuse(h.path, f"tensor {show(name)}", f"a tensor {WEIGHTS} holds too (it has none of that name)")
            if weights.shape(name) != dims:
                raise refuse(h.path, f"tensor {show(name)} shape", f"{weights.shape(name)}, as in {WEIGHTS}", dims)
