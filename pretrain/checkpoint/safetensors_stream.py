"""Write a safetensors file as a stream: header, then each tensor's bytes straight from its memory.

Why not `safetensors.torch.save_file`: it serialises the whole file into one
bytes object first (a second copy of a rank's multi-GB optimizer partition
in host memory) and writes it with no way to hash while writing. Here the
bytes go from each host tensor through `integrity.HashingWriter` (checksummed
from the page cache while later tensors are still being written, fsynced),
in slices, so a background save holds no extra copy. The file is the
standard format (8-byte little-endian header length, JSON header with dtype,
shape and byte offsets, 8-byte aligned data); `safetensors.safe_open` reads it.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.checkpoint.integrity import HashingWriter

SLICE = 16 << 20  # bytes per write: small enough to interleave with training's memory traffic
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}  # a header's dtype name -> torch's


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be a contiguous CPU tensor)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return header_of({n: (t.dtype, list(t.shape)) for n, t in tensors.items()}, metadata)


def header_of(specs: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """The header of a file holding tensors of these dtypes and shapes, in sorted name order."""
    entries: dict[str, Any] = {}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      on_write: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write `tensors` (contiguous, CPU) to `path`, checksummed while written and fsynced; returns the
    file's manifest entry. `on_write(n)` is called after each slice (fault injection in tests)."""
    writer = HashingWriter(path, on_write=on_write, stable_buffers=True)  # the tensors outlive the writer
    try:
        writer.write(header(tensors, metadata))
        for name in sorted(tensors):
            data = _bytes_of(tensors[name])
            for start in range(0, len(data), SLICE):
                writer.write(data[start:start + SLICE])
    finally:
        info = writer.close()
    return info


def write_safetensors_lazy(path: str | Path, specs: dict[str, tuple[torch.dtype, list[int]]],
                           produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None
                           ) -> dict[str, Any]:
    """A file of the tensors `specs` names, each made by `produce(name)` only when its turn comes (one
    tensor in memory at a time: `vgpt ckpt reshard`); returns the file's manifest entry."""
    writer = HashingWriter(path)  # not stable_buffers: the writer hashes a copy, each tensor is dropped once written
    try:
        writer.write(header_of(specs, metadata))
        for name in sorted(specs):
            t = produce(name).detach().to("cpu", specs[name][0]).contiguous()
            if list(t.shape) != list(specs[name][1]):
                raise ValueError(f"{path}: tensor {name!r} came out {list(t.shape)}, its header says {specs[name][1]}")
            data = _bytes_of(t)
            for start in range(0, len(data), SLICE):
                writer.write(data[start:start + SLICE])
    finally:
        info = writer.close()
    return info
