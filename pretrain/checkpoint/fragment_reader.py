"""Read any piece of a sharded checkpoint's parameters by byte range, straight from its safetensors files.

What: `SavedFragments` indexes a sharded checkpoint (sharded.py) from its
safetensors headers alone: for every (TP rank, parameter) the fragments the
saving ranks wrote, each with its element span in the TP-local parameter and,
per kind (`fp32`, `exp_avg`, `exp_avg_sq`), the file, dtype and byte offset of
its data. `span(name, kind, lo, hi, ...)` then returns elements [lo, hi) of a
parameter, as laid out for a target TP rank and size, in fp32, reading only the
bytes of the saved fragments that overlap it; `parameter(...)` a whole one.
Local files are read with pread, object stores (s3://) with ranged GETs through
the retrying filesystem (data/object_store.py).

Why: a resume on another layout (resharded_load.py) and `vgpt ckpt reshard`
(reshard.py) need, per rank, only the part of each parameter the new
partition holds. Reading those byte ranges on every rank at once costs about
what a same-layout load reads, where putting the whole model together first
(full_state.py) cost rank 0 a full copy in memory and on disk, and every other
rank a wait. When the TP size changes, a parameter is merged from its saved TP
shards and re-split for the target (one parameter in memory at a time).

The headers are checked here too (bounded length, JSON, offsets inside the
file, fragments covering each parameter once): on an object store no verified
local copy has been through structure.py.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from data.object_store import retrying
from parallel.tensor_parallel import plan_style, shard_tensor, unshard_tensor
from pretrain.checkpoint import schema
from pretrain.checkpoint.full_state import MOMENTS, ConsolidateError
from pretrain.checkpoint.safetensors_stream import TORCH_DTYPES

KINDS = ("fp32", *MOMENTS)
RANK_FILE, MODEL_FILE = re.compile(r"^rank-\d{5}\.safetensors$"), re.compile(r"^model-tp(\d{2})\.safetensors$")
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # what a saved fragment may be stored as


class ByteRanges:
    """Ranged reads of the files of one checkpoint: pread on a local disk, ranged GETs on an fsspec
    filesystem (`fs`, retried past throttling). `on_read(n)` is called after each read (fault injection in
    tests); `log` (a list) records (file, offset, length) of every tensor read when given (the benchmark)."""

    def __init__(self, fs=None, on_read: Callable[[int], None] | None = None, log: list | None = None):
        self.fs, self.on_read, self.log = fs, on_read, log
        self._fds: dict[str, int] = {}
        self.count = 0
        self.bytes = 0

    def read(self, path: str, offset: int, length: int) -> torch.Tensor:
        """`length` bytes of `path` from `offset`, as a new uint8 tensor."""
        return self.read_into(path, offset, torch.empty(length, dtype=torch.uint8))

    def read_into(self, path: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (contiguous uint8, on any device) with the bytes of `path` from `offset`; returns it.
        A device tensor (an engine's state on a GPU) is filled through one host buffer."""
        length = out.numel()
        if length:
            if self.fs is None and out.device.type != "cpu":
                host = torch.empty(length, dtype=torch.uint8)
                self._pread(path, offset, host)
                out.copy_(host)
            elif self.fs is None:
                self._pread(path, offset, out)
            else:
                data = retrying(lambda: self.fs.cat_file(path, start=offset, end=offset + length), path)
                if len(data) != length:
                    raise ConsolidateError(f"{path}: {len(data)} bytes at offset {offset}, expected {length}")
                out.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.count += 1
        self.bytes += length
        if self.log is not None:
            self.log.append((path, offset, length))
        if self.on_read:
            self.on_read(self.count)
        return out

    def _pread(self, path: str, offset: int, out: torch.Tensor) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        view, done = memoryview(out.numpy()), 0
        while done < len(view):  # straight into the tensor: no intermediate bytes object
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConsolidateError(f"{path}: ends before byte {offset + len(view)} (a header points past it)")
            done += n

    def whole(self, path: str) -> bytes:
        """A small file (JSON) in full."""
        if self.fs is None:
            return Path(path).read_bytes()
        return retrying(lambda: self.fs.cat_file(path), path)

    def size(self, path: str) -> int:
        return os.path.getsize(path) if self.fs is None else self.fs.size(path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class Fragment:
    start: int  # first element of the (TP-local) parameter it holds
    numel: int  # elements it holds inside the parameter (ZeRO-3's padding past the end left out)
    data: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # kind -> (file, dtype, byte offset)


def read_header(src: ByteRanges, path: str) -> tuple[dict[str, tuple[str, list[int], int]], dict[str, str]]:
    """({tensor: (dtype, shape, absolute byte offset)}, string metadata) of a safetensors file, checked: a
    bounded JSON header whose entries' offsets lie inside the file and match their dtype and shape."""
    size = src.size(path)
    n = struct.unpack("<Q", bytes(src.read(path, 0, 8).numpy()))[0] if size >= 8 else -1
    if not 0 <= n <= min(schema.HEADER_LIMIT, size - 8):
        raise schema.refuse(path, "header length", f"at most {min(schema.HEADER_LIMIT, size - 8)} bytes", n)
    header = schema.obj(schema.parse_json(bytes(src.read(path, 8, n).numpy()), f"{path} (header)"), path, "header")
    tensors, meta = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            meta = {k: schema.string(v, path, f"header __metadata__.{schema.show(k)}")
                    for k, v in schema.obj(entry, path, "header __metadata__").items()}
            continue
        where = f"tensor {schema.show(name)}"
        entry = schema.obj(entry, path, where)
        dtype = schema.string(entry.get("dtype"), path, f"{where} dtype", tuple(schema.SAFETENSORS_DTYPES))
        dims = schema.shape(entry.get("shape"), path, f"{where} shape")
        begin, end = (entry.get("data_offsets") or [None, None])[:2]
        nbytes = math.prod(dims) * schema.SAFETENSORS_DTYPES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes
                and 8 + n + end <= size):
            raise schema.refuse(path, f"{where} data_offsets", f"{nbytes} bytes inside the file's {size}",
                                entry.get("data_offsets"))
        tensors[name] = (dtype, dims, 8 + n + begin)
    return tensors, meta


class SavedFragments:
    """The fragments of sharded checkpoint `ckpt` (a local directory, or a path on fsspec filesystem `fs`),
    indexed from its headers; `url` names it in messages."""

    def __init__(self, ckpt: str | Path, fs=None, url: str | None = None,
                 on_read: Callable[[int], None] | None = None, log: list | None = None):
        self.ckpt, self.url = str(ckpt).rstrip("/"), url or str(ckpt)
        self.src = ByteRanges(fs, on_read, log)
        self.engine = schema.engine_json(self._json(schema.ENGINE), self._name(schema.ENGINE), schema.SHARDED_FORMAT)
        state = schema.trainer_state(self._json(schema.TRAINER_STATE), self._name(schema.TRAINER_STATE))
        self.layout = state.get("layout", {})
        files = schema.manifest(self._json("manifest.json"), self._name("manifest.json"))["files"]
        self.shapes: dict[tuple[int, str], list[int]] = {}
        self.fragments: dict[tuple[int, str], list[Fragment]] = {}
        self.modules: dict[int, tuple[str, dict[str, tuple[str, list[int], int]]]] = {}
        for rel in sorted(files):
            if RANK_FILE.match(rel):
                self._index_rank_file(self._path(rel))
            elif m := MODEL_FILE.match(rel):
                self.modules[int(m.group(1))] = (self._path(rel), read_header(self.src, self._path(rel))[0])
        self.tp = len({tp for tp, _ in self.shapes})
        if not self.shapes or sorted({tp for tp, _ in self.shapes}) != list(range(self.tp)):
            raise ConsolidateError(f"{self.url}: tensor-parallel ranks {sorted({t for t, _ in self.shapes})} in its "
                                   f"rank files, expected 0..n-1")
        self._check_coverage()

    # ------------------------------------------------------------ index
    def _path(self, rel: str) -> str:
        return f"{self.ckpt}/{rel}"

    def _name(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _json(self, rel: str) -> Any:
        try:
            data = self.src.whole(self._path(rel))
        except FileNotFoundError:
            raise ConsolidateError(f"{self._name(rel)}: missing") from None
        return schema.parse_json(data, self._name(rel))

    def _index_rank_file(self, path: str) -> None:
        tensors, meta = read_header(self.src, path)
        field_ = f"header __metadata__.{schema.META_KEY}"
        info = schema.obj(schema.parse_json(meta.get(schema.META_KEY, ""), f"{path} ({field_})"), path, field_)
        tp = schema.integer(info.get("tp_rank"), path, f"{field_}.tp_rank")
        for name, frag in schema.obj(info.get("fragments"), path, f"{field_}.fragments").items():
            where = f"{field_}.fragments[{schema.show(name)}]"
            if not (isinstance(frag, list) and len(frag) == 3):
                raise schema.refuse(path, where, "[start, numel, shape]", frag)
            start, numel = schema.integer(frag[0], path, f"{where}[0]"), schema.integer(frag[1], path, f"{where}[1]")
            dims = schema.shape(frag[2], path, f"{where}[2]")
            if self.shapes.setdefault((tp, name), dims) != dims:
                raise schema.refuse(path, f"{where}[2]", f"{self.shapes[(tp, name)]}, as the other ranks record", dims)
            held = max(0, min(numel, math.prod(dims) - start))  # ZeRO-3 pads the last ranks' partitions
            out = Fragment(start, held)
            for kind in KINDS:
                got = tensors.get(f"{kind}/{name}")
                if got is None or got[1] != [numel] or got[0] not in FLOAT_DTYPES:
                    raise schema.refuse(path, f"tensor {schema.show(f'{kind}/{name}')}",
                                        f"a 1-D float tensor of {numel} elements (as {where} says)")
                out.data[kind] = (path, got[0], got[2])
            if held:
                self.fragments.setdefault((tp, name), []).append(out)

    def _check_coverage(self) -> None:
        for key, dims in self.shapes.items():
            frags = sorted(self.fragments.get(key, []), key=lambda f: f.start)
            self.fragments[key] = frags
            end = 0
            for f in frags:
                if f.start != end:
                    raise ConsolidateError(f"{self.url}: fragments of {key[1]!r} (TP rank {key[0]}) leave a gap or "
                                           f"overlap at element {end}")
                end += f.numel
            if end != math.prod(dims):
                raise ConsolidateError(f"{self.url}: the fragments of {key[1]!r} (TP rank {key[0]}) cover {end} of "
                                       f"its {math.prod(dims)} elements (a rank file is missing)")

    def names(self) -> list[str]:
        return [name for tp, name in self.shapes if tp == 0]

    def largest_parameter_bytes(self) -> int:
        return 4 * max(math.prod(d) for d in self.shapes.values())

    # ------------------------------------------------------------ reads
    def _local_span(self, tp: int, name: str, kind: str, lo: int, hi: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [lo, hi) of saved TP rank `tp`'s parameter `name`, fp32 (into `out`, a contiguous fp32
        tensor of hi - lo elements, when given), from the fragments they overlap."""
        if (tp, name) not in self.shapes:
            raise ConsolidateError(f"{self.url}: no fragments of {name!r} (TP rank {tp}); the model has it")
        out = torch.empty(hi - lo, dtype=torch.float32) if out is None else out.view(-1)
        for f in self.fragments[(tp, name)]:
            a, b = max(lo, f.start), min(hi, f.start + f.numel)
            if a >= b:
                continue
            path, dtype, offset = f.data[kind]
            size = schema.SAFETENSORS_DTYPES[dtype]
            if dtype == "F32":  # straight into place: no buffer, no copy
                self.src.read_into(path, offset + (a - f.start) * size, out[a - lo:b - lo].view(torch.uint8))
            else:
                raw = self.src.read(path, offset + (a - f.start) * size, (b - a) * size)
                out[a - lo:b - lo] = raw.view(TORCH_DTYPES[dtype])  # converted to fp32
        return out

    def parameter(self, name: str, kind: str, tp_rank: int = 0, tp_size: int = 1,
                  style: str | None = None) -> torch.Tensor:
        """The whole of parameter `name` as TP rank `tp_rank` of `tp_size` holds it (`style`: its split,
        None when replicated), fp32."""
        if tp_size == self.tp:
            shape = self.shapes.get((tp_rank, name))
            return self._local_span(tp_rank, name, kind, 0, math.prod(shape or [0])).view(shape or [0])
        plan = self.layout.get("tp_plan") or {}
        saved_style = plan_style(name.rpartition(".")[0], plan) if self.tp > 1 else None
        if self.tp > 1 and saved_style is None and style is not None:
            raise ConsolidateError(f"{self.url}: {name!r} is split over {self.tp} TP ranks but trainer_state.json's "
                                   "layout.tp_plan gives no style to merge it by")
        if saved_style is None:  # replicated (or one saved TP rank): TP rank 0's copy
            full = self.parameter(name, kind, 0, self.tp)
        else:  # merged from every saved TP rank: one parameter in memory at a time
            full = unshard_tensor([self.parameter(name, kind, t, self.tp) for t in range(self.tp)], saved_style)
        return full if style is None or tp_size == 1 else shard_tensor(full, style, tp_rank, tp_size).contiguous()

    def span(self, name: str, kind: str, lo: int, hi: int, tp_rank: int = 0, tp_size: int = 1,
             style: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [lo, hi) of the flattened parameter as TP rank `tp_rank` of `tp_size` holds it, fp32 (into
        `out`, contiguous fp32, when given): only the overlapping bytes when the TP size is the saved one, else
        sliced from the re-split whole."""
        if tp_size == self.tp:
            return self._local_span(tp_rank, name, kind, lo, hi, out)
        part = self.parameter(name, kind, tp_rank, tp_size, style).reshape(-1)[lo:hi]
        return part.clone() if out is None else out.view(-1).copy_(part)

    def buffer(self, name: str, tp_rank: int = 0) -> torch.Tensor | None:
        """A module buffer (TP rank `tp_rank`'s module file, else TP rank 0's); None when none holds it."""
        for tp in (tp_rank, 0):
            path, tensors = self.modules.get(tp, ("", {}))
            if name in tensors:
                dtype, dims, offset = tensors[name]
                if dtype not in schema.SAFETENSORS_DTYPES:
                    break
                size = math.prod(dims) * schema.SAFETENSORS_DTYPES[dtype]
                raw = self.src.read(path, offset, size)
                return raw.view(TORCH_DTYPES[dtype]).view(dims)
        return None

    def close(self) -> None:
        self.src.close()
