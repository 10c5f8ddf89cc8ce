"""The latent dataset format (DESIGN.md, "Latent dataset"): one definition shared
by the precompute farm (writer) and the streaming loader (reader).

    <root>/shards/<name>-NNNNNN.tar    WebDataset: <key>.latents.safetensors, <key>.meta.json
    <root>/shards/<name>-NNNNNN.json   manifest, written only after the tar is complete (the commit)
    <root>/index.json                  the dataset index (data/dataset_index.py): committed shards, each
                                       sample's latents shape [T, C, h, w], counts, dtype, VAE, config hash
    <root>/errors/<key>.json           one record per rejected input, with its reason

`root` is anything fsspec understands: `/path`, `file:///path`, `s3://bucket/prefix`.
Tars are built in memory with a fixed mtime so that the same inputs give
byte-identical shards, hashed, uploaded in one PUT, and only then is the
manifest written: a reader that sees a manifest sees a complete tar.

The index over the committed shards, and `DatasetMeta` that every reader uses,
live in data/dataset_index.py.

Latent forms (index.json and meta.json `latent_form`; data/vae.py makes both):
    posterior  [T, 2C, h, w]: per frame the VAE posterior's scaled mean (channels :C), then its scaled
               std (C:); the trainer draws a fresh latent from it every step (METHOD.md, Latents).
               The default of `vgpt precompute` (`precompute.latents`).
    sample     [T, C, h, w]: one scaled posterior draw per frame, fixed at precompute time (half the
               bytes). An index without `latent_form` (written before it was recorded) holds this.
Both forms keep the frames in the first axis, so a reader's frame windows work on either.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import fsspec
import torch
from safetensors.torch import save as st_save

from data.object_store import open_fs, put_atomic

FORMAT_VERSION = 1  # of a shard manifest
LATENT_FORMS = ("posterior", "sample")  # index.json `latent_form`; an index without it holds `sample`
LATENTS_MEMBER = "latents.safetensors"
META_MEMBER = "meta.json"
FIXED_MTIME = 1_700_000_000  # any constant: byte-identical tars across runs
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardFormatError(ValueError):
    """A shard, manifest or sample does not match the format; the message names it."""


def latent_form(index: dict, where: str = "index.json") -> str:
    """The `latent_form` an index.json (or meta.json) records; `sample` when it records none."""
    form = index.get("latent_form", "sample")
    if form not in LATENT_FORMS:
        raise ShardFormatError(f"{where}: latent_form {form!r}, expected {' or '.join(map(repr, LATENT_FORMS))}")
    return form


def get_fs(root: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `root` and its path; object stores retry throttling (data/object_store.py)."""
    return open_fs(root, storage_options)


def shard_stem(name: str, index: int) -> str:
    return f"{name}-{index:06d}"


def check_key(key: str) -> str:
    # WebDataset splits the sample key at the first dot of the basename.
    if not _KEY_OK.match(key):
        raise ShardFormatError(f"sample key {key!r}: expected only letters, digits, '_' and '-' (no dots)")
    return key


def encode_sample(latents: torch.Tensor, meta: dict) -> dict[str, bytes]:
    """latents [T, C, h, w] (bf16/fp16/fp32) -> tar members."""
    if latents.ndim != 4:
        raise ShardFormatError(f"latents: expected [T, C, h, w], got shape {tuple(latents.shape)}")
    return {
        LATENTS_MEMBER: st_save({"latents": latents.contiguous().cpu()}),
        META_MEMBER: json.dumps(meta, sort_keys=True).encode(),
    }


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def latents_view(payload: bytes) -> torch.Tensor:
    """The `latents` tensor of a safetensors payload as a view of the payload's bytes, not a copy: the
    loader copies each window once, into its batch, and a decoding copy of every stored byte cost the
    posterior form 14% of its samples/s (bench/loader.py --forms). The tensor is read-only (it aliases
    `bytes`) and keeps the payload, one sample's member, alive. Checked as safetensors checks a file:
    the header inside the payload, a dtype latents are stored in, and a byte span that is exactly the
    shape's."""
    view = memoryview(payload)
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes, too short for a safetensors header")
    size = int.from_bytes(view[:8], "little")
    if size > len(view) - 8:
        raise ValueError(f"a header of {size} bytes in a payload of {len(view)}")
    header = json.loads(bytes(view[8:8 + size]))
    entry = header.get("latents") if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise ValueError("no tensor 'latents'")
    dtype, shape, span = _SAFETENSORS_DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ValueError(f"latents dtype {entry.get('dtype')!r}, expected one of {sorted(_SAFETENSORS_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(span, list) and len(span) == 2 and all(isinstance(o, int) for o in span)):
        raise ValueError(f"latents shape {shape!r} / data_offsets {span!r}: expected lists of non-negative ints")
    count, (begin, end) = math.prod(shape), span
    if not 0 <= begin <= end <= len(view) - 8 - size or end - begin != count * dtype.itemsize:
        raise ValueError(f"latents data_offsets {span} do not hold {shape} {entry['dtype']} in the "
                         f"{len(view) - 8 - size} data bytes")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "buffer is not writable": nothing writes a stored sample
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=dtype, count=count, offset=8 + size + begin).view(shape)


def decode_sample(members: dict[str, bytes], where: str = "") -> tuple[torch.Tensor, dict]:
    """(latents, meta) of a sample's tar members; the latents a read-only view of their member's bytes."""
    try:
        latents = latents_view(members[LATENTS_MEMBER])
        meta = json.loads(members[META_MEMBER])
    except KeyError as e:
        raise ShardFormatError(f"{where}: missing member {e.args[0]!r}") from None
    except Exception as e:  # safetensors/json give terse errors
        raise ShardFormatError(f"{where}: cannot decode sample: {e}") from None
    return latents, meta


def build_tar(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """(key, members) pairs -> tar bytes, deterministic (sorted members, fixed mtime/owner)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            check_key(key)
            for member in sorted(members):
                data = members[member]
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def iter_tar(data: bytes | io.BufferedIOBase, where: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Tar bytes (or a binary file, read whole: a shard is only ever used whole) -> (key, members) in
    order. Any truncation raises ShardFormatError, wherever the cut falls."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = data.read()
        except OSError as e:
            raise ShardFormatError(f"{where}: cannot read the tar: {e}") from None
    yield from _group_members(_members_of_bytes(data, where))


def _members_of_bytes(data: bytes | bytearray | memoryview, where: str) -> Iterator[tuple[str, bytes]]:
    """Read only the headers, slice the payloads (several times faster than streaming every byte
    through tarfile). tarfile takes a cut at (or inside) a header after the first for the end of the
    archive, so the end is checked here: the end-of-archive marker (two zero blocks) and zero padding
    to a whole record, as tarfile (build_tar) and GNU tar write it."""
    view = memoryview(data)
    try:
        infos = tarfile.open(fileobj=io.BytesIO(data), mode="r:").getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{where}: corrupt or truncated tar: {e}") from None
    end = 0
    for info in infos:
        end = info.offset_data + info.size
        if end > len(view):
            raise ShardFormatError(f"{where}: corrupt or truncated tar: member {info.name!r} ends at byte "
                                   f"{end} but the file has {len(view)}")
        end = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tail = view[end:]
    if len(tail) < 2 * tarfile.BLOCKSIZE or len(view) % tarfile.RECORDSIZE or bytes(tail).count(0) != len(tail):
        raise ShardFormatError(f"{where}: corrupt or truncated tar: {len(view)} bytes, no end-of-archive marker "
                               f"and record padding after the last member (ends at byte {end})")
    for info in infos:
        if info.isfile():
            yield info.name, bytes(view[info.offset_data:info.offset_data + info.size])


def _group_members(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members sharing a key (basename up to its first dot) form one sample."""
    key, group = None, {}
    for name, payload in members:
        k, _, member = name.rpartition("/")[2].partition(".")
        if key is not None and k != key:
            yield key, group
            group = {}
        key = k
        group[member] = payload
    if key is not None:
        yield key, group


@dataclass
class ShardManifest:
    name: str  # shard stem, e.g. "train-000003"
    keys: list[str]
    num_samples: int
    num_frames: int
    bytes: int
    sha256: str
    format_version: int = FORMAT_VERSION
    # Per sample, aligned with `keys`: the latents' shape [T, C, h, w] (T: its stored frames). It lets
    # the loader skip samples a stage cannot use, and group samples by shape, without opening the tar.
    # None in manifests written before it was recorded.
    sample_shapes: list[list[int]] | None = None
    # Per sample: the index of its first frame in its input video (0 unless it is a later segment of a
    # long video): the loader groups segments into videos by it (data/videos.py). None: not recorded.
    sample_first_frames: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "") -> "ShardManifest":
        try:
            fields = json.loads(text)
            fields.pop("sample_frames", None)  # manifests of before sample_shapes[:, 0] was the only copy
            return cls(**fields)
        except Exception as e:
            raise ShardFormatError(f"{where}: bad manifest: {e}") from None


def commit_shard(fs: fsspec.AbstractFileSystem, root: str, stem: str, tar_bytes: bytes,
                 keys: list[str], num_frames: int, sample_shapes: list[list[int]] | None = None,
                 first_frames: list[int] | None = None) -> ShardManifest:
    """Upload the complete tar, then write its manifest (the commit).

    `sample_shapes`: each sample's latents shape [T, C, h, w], aligned with `keys`; `first_frames`: each
    sample's first frame in its input video (data/videos.py)."""
    shapes = [list(map(int, s)) for s in sample_shapes] if sample_shapes is not None else None
    if shapes is not None and len(shapes) != len(keys):
        raise ShardFormatError(f"{stem}: {len(shapes)} sample shapes for {len(keys)} keys")
    if first_frames is not None and len(first_frames) != len(keys):
        raise ShardFormatError(f"{stem}: {len(first_frames)} first frames for {len(keys)} keys")
    manifest = ShardManifest(stem, list(keys), len(keys), int(num_frames), len(tar_bytes),
                             hashlib.sha256(tar_bytes).hexdigest(), sample_shapes=shapes,
                             sample_first_frames=[int(f) for f in first_frames] if first_frames is not None else None)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.pipe_file(f"{root}/shards/{stem}.tar", tar_bytes)
    # the manifest's existence is the commit: never visible half-written (a driver killed mid-commit)
    put_atomic(fs, f"{root}/shards/{stem}.json", manifest.to_json().encode())
    return manifest


def committed_manifests(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, ShardManifest]:
    """Manifests present now (listing cache invalidated: s3fs caches listings)."""
    fs.invalidate_cache(f"{root}/shards")
    try:
        paths = fs.glob(f"{root}/shards/*.json")
    except FileNotFoundError:
        return {}
    out = {}
    for p in sorted(paths):
        m = ShardManifest.from_json(fs.cat_file(p).decode(), where=p)
        out[m.name] = m
    return out


def write_error(fs: fsspec.AbstractFileSystem, root: str, key: str, source: str, reason: str) -> None:
    fs.makedirs(f"{root}/errors", exist_ok=True)
    put_atomic(fs, f"{root}/errors/{check_key(key)}.json",
               json.dumps({"key": key, "source": source, "reason": reason}, sort_keys=True).encode())
