"""A columns file: named numpy arrays in one uncompressed .npz that a reader memory-maps in place.

An .npz is a zip of .npy files; stored (not deflated), each member's array bytes lie in the file
as they are in memory, so np.memmap over the member's offset is the array, with nothing read
until touched. The writer pads each member (a private zip extra field) so that every array starts
64-byte aligned, and fixes every timestamp, so the same arrays always give the same bytes (and
sha256). Any zip reader, and `np.load`, still reads the file. Used by the dataset index
(data/dataset_index.py); the integrity check (size, then sha256) is here too.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from data.shard_format import ShardFormatError

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_ALIGN = 64
_PAD_EXTRA_ID = 0x5647  # a private zip extra field that pads a member so its array is 64-byte aligned


def columns_bytes(cols: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of `cols` (in key order), each array 64-byte aligned in the file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(cols):
            arr = np.ascontiguousarray(cols[name])
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type, info.external_attr = zipfile.ZIP_STORED, 0o644 << 16
            # data starts after the 30-byte header, the name, our pad field and zipfile's 20-byte zip64 field
            head = buf.tell() + 30 + len(info.filename.encode()) + 4 + 20
            pad = -head % _ALIGN
            info.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def map_columns(path: str | Path) -> dict[str, np.ndarray]:
    """Every member of a columns file as a read-only np.memmap over the file (nothing is read into memory)."""
    try:
        return _map(path)
    except ShardFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:
        raise ShardFormatError(f"{path}: unreadable columns file: {e}") from None


def _map(path: str | Path) -> dict[str, np.ndarray]:
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ShardFormatError(f"{path}: member {info.filename!r} is not a stored .npy array")
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise ShardFormatError(f"{path}: member {info.filename!r}: bad zip local header")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(f)
            if dtype.hasobject:
                raise ShardFormatError(f"{path}: member {info.filename!r} holds Python objects")
            name = info.filename[:-4]
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype=dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                      order="F" if fortran else "C")
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: str | Path, want: dict, what: str) -> None:
    """The file is the one index.json names: its size, then its sha256."""
    size = os.path.getsize(path)
    if size != want["bytes"]:
        raise ShardFormatError(f"{path}: {size} bytes, {what} says {want['bytes']} (a truncated or foreign "
                               "columns file)")
    digest = sha256_file(path)
    if digest != want["sha256"]:
        raise ShardFormatError(f"{path}: sha256 {digest[:16]}... does not match {what} ({want['sha256'][:16]}...)")
