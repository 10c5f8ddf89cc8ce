"""The dataset index: which shards a latent dataset holds, and every sample's frame count, latent
shape and key, as columns that a reading process memory-maps instead of parsing.

    <root>/index.json                       small JSON, replaced atomically on each publish:
                                            format_version 2, version (1, 2, ...), counts, the
                                            dataset-wide facts (dtype, VAE, config hash, ...), and
                                            `columns`: {path, sha256, bytes} of the file below
    <root>/index/v000003-<sha16>.npz        the columns of version 3; immutable, never removed

Why: at 10M samples the JSON of every sample's shape was 584 MB, 14 s to parse and +2.4 GB
resident in every rank, worker and preflight. The columns file is an uncompressed .npz (a zip of
.npy arrays, members 64-byte aligned, fixed timestamps: the same shards give the same bytes), so
`np.load` reads it as is and a reader maps each member in place (np.memmap): nothing is parsed,
only the pages a process touches become resident, and they are the page cache, shared by every
process of the node. Columns (shards in name order, samples flat: shard order, then order in the
shard, i.e. `DatasetMeta.offsets[shard] + index`; the file format: data/columns_file.py):

    shard_name, shard_sha256 (bytes), shard_num_samples, shard_num_frames, shard_bytes (int64)
    sample_frames (uint16 or int32), sample_shape (uint16 or int32: a row of shape_table),
    shape_table ([k, 3] int32: the distinct latent [C, h, w]); absent when a manifest lacks shapes
    key_blob (uint8), key_offsets (uint32 or int64, N + 1): sample i's key is blob[off[i]:off[i+1]]
    sample_first_frame (uint16 or int32): the sample's first frame in its input video, > 0 for the later
                       segments of a long one (data/videos.py); absent in indexes written before it

Publishing (`write_index`): the new columns file first, under its new name, then index.json in one
step (a local file is written beside it and renamed; an object store takes one PUT), so a reader
sees the old index or the new one, never half of one; a reader that read the old index.json still
opens the old columns file. A columns file that is not what index.json says (size, then sha256) is
refused naming it; both are checked at every open (sha256 runs at ~2 GB/s: 0.15 s at 10M
samples, whose columns file is ~320 MB), and only then is the file mapped. From object storage
the columns file is fetched once per node into $VGPT_CACHE/index/ (default ~/.cache/vgpt/index/),
named by its sha256, written under a temporary name and renamed, so the ranks of one node may race
to it safely.

Older datasets: an index.json of format_version 1 (every shard, with its samples' shapes, inline)
still reads, to the same DatasetMeta (its arrays then live in memory: such indexes are small).
A format-1 index counts as version 1: the first publish over it is version 2.

`latent_form` (data/shard_format.py): what the latents hold, posterior moments or one draw; an index
of before it was recorded reads as `sample`, and trains as it did.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from data.columns_file import check_file, columns_bytes, map_columns
from data.object_store import put_atomic
from data.shard_format import ShardFormatError, ShardManifest, get_fs, latent_form
from jobconfig.errors import ConfigError

FORMAT_VERSION = 2          # index.json with a columns file
LEGACY_FORMAT_VERSION = 1   # index.json with every shard inline
INDEX_NAME = "index.json"
COLUMNS_DIR = "index"
# index.json keys the publisher sets; every other key is a dataset-wide fact of the writer's
_OWN_KEYS = ("format_version", "version", "num_samples", "num_shards", "num_frames", "columns", "shards")


def cache_dir() -> Path:
    """Where columns files fetched from object storage are kept, by sha256 (one copy per node)."""
    return Path(os.environ.get("VGPT_CACHE", Path.home() / ".cache" / "vgpt")) / "index"


def dataset_info(index: dict) -> dict:
    """The writer's dataset-wide facts of an index.json (either format): what `write_index(**info)` took."""
    return {k: v for k, v in index.items() if k not in _OWN_KEYS}


# ---------------------------------------------------------------- the columns file
def _smallest(values: np.ndarray, small=np.uint16, big=np.int64) -> np.ndarray:
    return values.astype(small if not len(values) or int(values.max()) <= np.iinfo(small).max else big)


def build_columns(manifests: list[ShardManifest]) -> dict[str, np.ndarray]:
    """The columns of shards in the given order (the caller sorts them by name)."""
    cols: dict[str, np.ndarray] = {
        "shard_name": np.array([m.name.encode() for m in manifests], dtype=bytes),
        "shard_sha256": np.array([m.sha256.encode() for m in manifests], dtype="S64"),
        "shard_num_samples": np.array([m.num_samples for m in manifests], dtype=np.int64),
        "shard_num_frames": np.array([m.num_frames for m in manifests], dtype=np.int64),
        "shard_bytes": np.array([m.bytes for m in manifests], dtype=np.int64),
    }
    keys = [k.encode() for m in manifests for k in m.keys]
    lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
    cols["key_blob"] = np.frombuffer(b"".join(keys), dtype=np.uint8)
    cols["key_offsets"] = _smallest(np.concatenate([[0], np.cumsum(lengths)]), np.uint32)
    if manifests and all(m.sample_shapes is not None for m in manifests):
        n = len(keys)
        shapes = np.fromiter(chain.from_iterable(chain.from_iterable(m.sample_shapes for m in manifests)),
                             dtype=np.int64, count=4 * n).reshape(n, 4)
        cols.update(shape_columns(shapes[:, 0], shapes[:, 1:]))
        if all(m.sample_first_frames is not None for m in manifests):  # segments of long videos: data/videos.py
            cols["sample_first_frame"] = _smallest(np.fromiter(
                chain.from_iterable(m.sample_first_frames for m in manifests), dtype=np.int64, count=n),
                np.uint16, np.int32)
    return cols


def shape_columns(frames: np.ndarray, chw: np.ndarray) -> dict[str, np.ndarray]:
    """sample_frames, sample_shape and shape_table of per-sample frame counts and [C, h, w] rows."""
    if len(chw) and (chw.min() < 0 or chw.max() >= 1 << 20):
        raise ShardFormatError(f"latent shapes must lie in [0, 2^20), got {chw.min()}..{chw.max()}")
    packed = chw[:, 0] << 40 | chw[:, 1] << 20 | chw[:, 2]  # one int64 per shape: a 1-D unique is fast
    distinct, ids = np.unique(packed, return_inverse=True)
    table = np.stack([distinct >> 40, distinct >> 20 & 0xFFFFF, distinct & 0xFFFFF], axis=1)
    return {"sample_frames": _smallest(np.asarray(frames), np.uint16, np.int32),
            "sample_shape": _smallest(ids.reshape(-1), np.uint16, np.int32),
            "shape_table": table.astype(np.int32).reshape(-1, 3)}


def _local_columns(fs: fsspec.AbstractFileSystem, root: str, ref: dict, where: str) -> str:
    """A local, checked path of the columns file `ref` (index.json's `columns`): in place on a local
    filesystem, else fetched once into the node's cache."""
    remote = f"{root}/{ref['path']}"
    url = f"{where.rpartition('/')[0]}/{ref['path']}"  # as the user named the dataset (s3://...)
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(remote):
            raise ShardFormatError(f"{url}: missing (named by {where})")
        check_file(remote, ref, where)
        return remote
    cache = cache_dir()
    local = cache / f"{ref['sha256']}{Path(ref['path']).suffix}"
    if local.exists():
        try:
            check_file(local, ref, where)
            return str(local)
        except ShardFormatError:
            pass  # a damaged cache entry: fetch it again
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{ref['sha256'][:16]}-")
    os.close(fd)
    try:
        try:
            fs.get_file(remote, tmp)
        except FileNotFoundError:
            raise ShardFormatError(f"{url}: missing (named by {where})") from None
        try:
            check_file(tmp, ref, where)
        except ShardFormatError as e:
            raise ShardFormatError(str(e).replace(tmp, url)) from None
        os.replace(tmp, local)  # atomic: a concurrent rank renames the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(local)


# ---------------------------------------------------------------- publishing
def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    try:
        index = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ShardFormatError(f"{path}: unreadable index: {e}") from None
    if not isinstance(index, dict):
        raise ShardFormatError(f"{path}: unreadable index: expected a JSON object")
    return index


def write_index(fs: fsspec.AbstractFileSystem, root: str, manifests: dict[str, ShardManifest], **info: Any) -> dict:
    """Publish the committed shards (in name order) plus the dataset-wide facts `info` as the next
    version of the index: the columns file under its new name, then index.json. Returns index.json."""
    return publish_columns(fs, root, build_columns(sorted(manifests.values(), key=lambda m: m.name)), **info)


def publish_columns(fs: fsspec.AbstractFileSystem, root: str, cols: dict[str, np.ndarray], **info: Any) -> dict:
    """`write_index` from columns already built (data/synthetic builds large ones directly)."""
    path = f"{root}/{INDEX_NAME}"
    fs.invalidate_cache(root)
    try:
        previous = int(_read_json(fs, path).get("version", 1))
    except (FileNotFoundError, ShardFormatError, TypeError, ValueError):
        previous = 0  # none, or unreadable: this publish replaces it
    data = columns_bytes(cols)
    sha = hashlib.sha256(data).hexdigest()
    version = previous + 1
    rel = f"{COLUMNS_DIR}/v{version:06d}-{sha[:16]}.npz"
    put_atomic(fs, f"{root}/{rel}", data)
    index = {**info, "format_version": FORMAT_VERSION, "version": version,
             "num_shards": len(cols["shard_name"]), "num_samples": int(cols["shard_num_samples"].sum()),
             "num_frames": int(cols["shard_num_frames"].sum()),
             "columns": {"path": rel, "sha256": sha, "bytes": len(data)}}
    put_atomic(fs, path, json.dumps(index, sort_keys=True, indent=1).encode())
    return index


def legacy_index(manifests: dict[str, ShardManifest], **info: Any) -> dict:
    """index.json as format 1 wrote it (every shard inline): for tests and the bench's before figures."""
    shards = [{"name": m.name, "num_samples": m.num_samples, "num_frames": m.num_frames,
               "bytes": m.bytes, "sha256": m.sha256,
               **({"sample_shapes": m.sample_shapes} if m.sample_shapes is not None else {})}
              for m in sorted(manifests.values(), key=lambda m: m.name)]
    return {"format_version": LEGACY_FORMAT_VERSION, "num_shards": len(shards),
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_frames": sum(s["num_frames"] for s in shards), "shards": shards, **info}


def read_index(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """index.json as stored: format 2 (counts, facts, the columns file's name) or format 1 (shards inline)."""
    path = f"{root}/{INDEX_NAME}"
    fs.invalidate_cache(root)
    try:
        index = _read_json(fs, path)
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: no index.json (has the precompute job finished?)") from None
    fmt = index.get("format_version")
    if fmt not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
        raise ShardFormatError(f"{path}: format_version {fmt!r}, expected {FORMAT_VERSION} "
                               f"(or {LEGACY_FORMAT_VERSION}, with the shards inline)")
    if fmt == FORMAT_VERSION:
        ref = index.get("columns")
        if (not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str)
                or not isinstance(ref.get("bytes"), int) or not isinstance(index.get("version"), int)):
            raise ShardFormatError(f"{path}: expected an integer `version` and `columns` with path, sha256 and "
                                   f"bytes, got version={index.get('version')!r} columns={ref!r}")
    elif not isinstance(index.get("shards"), list):
        raise ShardFormatError(f"{path}: format_version 1 without a list of shards (corrupt index)")
    return index


# ---------------------------------------------------------------- the reader's view
def _reopen(path: str, latent_shape, version: int, num_shards: int, where: str,
            form: str = "sample") -> "DatasetMeta":
    """A DatasetMeta re-mapped from its (already checked, immutable) columns file: how one crosses to
    a worker process."""
    meta = DatasetMeta._from_columns(map_columns(path), latent_shape, version, where, path).prefix(num_shards)
    return replace(meta, latent_form=form)


@dataclass(frozen=True)
class DatasetMeta:
    """What readers need from the index (the loader, the trainer's data source, the preflight): read
    once per process. Shards with no samples are left out. Per-sample columns (by flat index:
    `offsets[shard]` + index in the shard) are np.memmap views of the columns file where it is a file,
    else arrays (a format-1 index); `frames` is None when the index records no shapes.

    A DatasetMeta of a columns file pickles as the file's path (a DataLoader worker maps the same
    pages, it gets no copy of the arrays). `latent_shape`: the dataset-wide [C, h, w] some writers
    record (data/synthetic), else None. `version`: the index version it was read from. `latent_form`:
    `posterior` (latents hold 2C channels: mean, std) or `sample` (data/shard_format.py)."""
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    sha256: tuple[str, ...]
    num_bytes: tuple[int, ...]
    latent_shape: tuple[int, ...] | None = None
    version: int = field(default=1, compare=False)
    shard_frames: tuple[int, ...] = field(default=(), compare=False)  # stored frames per shard, in all
    frames: np.ndarray | None = field(default=None, compare=False, repr=False)       # [N] stored frames
    shape_ids: np.ndarray | None = field(default=None, compare=False, repr=False)    # [N] row of shape_table
    shape_table: np.ndarray | None = field(default=None, compare=False, repr=False)  # [k, 3] latent C, h, w
    key_blob: np.ndarray | None = field(default=None, compare=False, repr=False)
    key_offsets: np.ndarray | None = field(default=None, compare=False, repr=False)
    columns_file: str | None = field(default=None, compare=False)  # the local file mapped, if any
    where: str = field(default=INDEX_NAME, compare=False, repr=False)
    latent_form: str = field(default="sample", compare=False)
    # [N] each sample's first frame in its input video (data/videos.py groups segments by it); None when
    # the index does not record it
    first_frames: np.ndarray | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------ reading
    @classmethod
    def load(cls, fs: fsspec.AbstractFileSystem, root: str, index: dict | None = None,
             where: str | None = None) -> "DatasetMeta":
        """The index of the dataset at `root` (index.json read unless given), either format."""
        where = where or f"{root}/{INDEX_NAME}"
        index = read_index(fs, root) if index is None else index
        latent_shape = _latent_shape(index)
        if index.get("format_version") == LEGACY_FORMAT_VERSION:
            return cls.from_index(index, where=where)
        path = _local_columns(fs, root, index["columns"], where)
        meta = cls._from_columns(map_columns(path), latent_shape, int(index["version"]), where, path)
        return replace(meta, latent_form=latent_form(index, where))

    @classmethod
    def _from_columns(cls, cols: dict[str, np.ndarray], latent_shape, version: int, where: str,
                      path: str | None) -> "DatasetMeta":
        try:
            sizes = cols["shard_num_samples"].tolist()
            keep = [i for i, n in enumerate(sizes) if n > 0]
            names = tuple(cols["shard_name"][keep].astype(bytes).tolist())
            meta = cls(tuple(n.decode() for n in names), tuple(sizes[i] for i in keep),
                       tuple(s.decode() for s in cols["shard_sha256"][keep].tolist()),
                       tuple(cols["shard_bytes"][keep].tolist()), latent_shape, version,
                       tuple(cols["shard_num_frames"][keep].tolist()), cols.get("sample_frames"),
                       cols.get("sample_shape"), cols.get("shape_table"), cols["key_blob"], cols["key_offsets"],
                       path, where, first_frames=cols.get("sample_first_frame"))
        except KeyError as e:
            raise ShardFormatError(f"{path}: columns file lacks the column {e.args[0]!r}") from None
        n = meta.num_samples
        for name, col, want in (("sample_frames", meta.frames, n), ("sample_shape", meta.shape_ids, n),
                                ("key_offsets", meta.key_offsets, n + 1),
                                ("sample_first_frame", meta.first_frames, n)):
            if col is not None and len(col) != want:
                raise ShardFormatError(f"{path}: column {name} has {len(col)} rows, expected {want} "
                                       f"({n} samples in {len(meta.names)} shards)")
        if not meta.names:
            raise ConfigError(f"{where}: the dataset has no samples")
        return meta

    @classmethod
    def from_index(cls, index: dict, where: str = INDEX_NAME) -> "DatasetMeta":
        """A format-1 index.json (shards inline) as read from JSON."""
        if index.get("format_version") == FORMAT_VERSION:
            raise ShardFormatError(f"{where}: format_version 2 names a columns file: read it with DatasetMeta.load")
        try:
            shards = [s for s in index["shards"] if int(s["num_samples"]) > 0]
            names, sizes = tuple(s["name"] for s in shards), tuple(int(s["num_samples"]) for s in shards)
            sha, nbytes = tuple(s["sha256"] for s in shards), tuple(int(s["bytes"]) for s in shards)
            totals = tuple(int(s.get("num_frames", 0)) for s in shards)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: shard list lacks {e} (expected name, num_samples, sha256, bytes)") from None
        if not names:
            raise ConfigError(f"{where}: the dataset has no samples")
        frames = shape_ids = table = None
        if all("sample_shapes" in s for s in shards):  # else: an index of before shapes were recorded
            shapes = []
            for s, n in zip(shards, sizes):
                try:
                    sh = np.asarray(s["sample_shapes"], dtype=np.int64)
                except (TypeError, ValueError):
                    sh = None
                if sh is None or sh.shape != (n, 4):
                    raise ConfigError(f"{where}: shard {s['name']}: sample_shapes must list one [T, C, h, w] per "
                                      f"sample ({n} samples)")
                shapes.append(sh)
            shapes = np.concatenate(shapes)
            cols = shape_columns(shapes[:, 0], shapes[:, 1:])
            frames, shape_ids, table = cols["sample_frames"], cols["sample_shape"], cols["shape_table"]
        return cls(names, sizes, sha, nbytes, _latent_shape(index), 1, totals, frames, shape_ids, table, where=where,
                   latent_form=latent_form(index, where))

    # ------------------------------------------------------------ views
    @property
    def moments(self) -> bool:
        """Whether the latents hold posterior moments (2C channels) rather than one draw."""
        return self.latent_form == "posterior"

    @property
    def has_shapes(self) -> bool:
        """Whether the index records every sample's shape (an older one does not)."""
        return self.frames is not None

    def sample_shape(self, i: int) -> list[int]:
        """The recorded latents shape [T, C, h, w] of sample i (flat index)."""
        frames, ids, table = self._lookup
        return [int(frames[i]), *table[ids[i]]]

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        # plain ndarray views of the maps (no copy): np.memmap's per-item indexing costs 4x more, and the
        # loader looks up every sample it plans
        return np.asarray(self.frames), np.asarray(self.shape_ids), self.shape_table.tolist()

    def first_shape(self) -> tuple[int, ...] | None:
        """[C, h, w] of the first sample, else the dataset-wide latent_shape, else None."""
        return tuple(self.shape_table[int(self.shape_ids[0])].tolist()) if self.has_shapes else self.latent_shape

    def key(self, i: int) -> str | None:
        """Sample i's key (None for a format-1 index, which does not list keys)."""
        if self.key_offsets is None:
            return None
        return bytes(self.key_blob[int(self.key_offsets[i]):int(self.key_offsets[i + 1])]).decode()

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Flat sample index of each shard's first sample (shards in index order)."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @cached_property
    def fingerprint(self) -> str:
        """Changes when any shard is added, removed or rewritten: a resumed run must see the same data.
        Hashes the shard table only (cheap at any size; a shard's samples are its bytes' sha256)."""
        blob = json.dumps([self.names, self.sizes, self.sha256]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def prefix(self, num_shards: int) -> "DatasetMeta":
        """The first `num_shards` shards as a DatasetMeta (an older version of an append-only dataset:
        shards keep name order, new ones come after). Same version; columns are views, not copies."""
        if not 0 < num_shards <= len(self.names):
            raise ValueError(f"prefix: {num_shards} shards, expected 1..{len(self.names)}")
        if num_shards == len(self.names):
            return self
        k, n = num_shards, int(sum(self.sizes[:num_shards]))
        def cut(a, m):
            return None if a is None else a[:m]
        return replace(self, names=self.names[:k], sizes=self.sizes[:k], sha256=self.sha256[:k],
                       num_bytes=self.num_bytes[:k], shard_frames=self.shard_frames[:k],
                       frames=cut(self.frames, n), shape_ids=cut(self.shape_ids, n),
                       key_offsets=cut(self.key_offsets, n + 1), first_frames=cut(self.first_frames, n))

    def __reduce__(self):
        if self.columns_file is not None:
            return _reopen, (self.columns_file, self.latent_shape, self.version, len(self.names), self.where,
                             self.latent_form)
        return _from_fields, (tuple(getattr(self, f) for f in self.__dataclass_fields__),)


def _from_fields(values: tuple) -> DatasetMeta:
    return DatasetMeta(*values)


def _latent_shape(index: dict) -> tuple[int, ...] | None:
    recorded = index.get("latent_shape")
    return tuple(int(x) for x in recorded) if isinstance(recorded, list) and len(recorded) >= 2 else None


def open_dataset(root: str, storage_options: dict | None = None) -> DatasetMeta:
    """DatasetMeta of the dataset at `root` (a path or URL); errors name `<root>/index.json` as given."""
    return DatasetMeta.load(*get_fs(root, storage_options), where=f"{root}/{INDEX_NAME}")
