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
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.checkpoint.integrity import HashingWriter

SLICE = 16 << 20  # bytes per write: small enough to interleave with training's memory traffic
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be a contiguous CPU tensor)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    entries: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
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
