"""The columnar dataset index (data/dataset_index.py): index.json of format 2 names an immutable,
versioned columns file that readers memory-map; format 1 (every shard inline) still reads.

Real components: tar shards written by data/synthetic/shards.py, the local filesystem, the moto S3
server of tests/conftest.py. Figures at 10M samples are bench/loader.py --samples's, not asserted here.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from data.buckets import build_buckets
from data.columns_file import map_columns
from data.dataset_index import DatasetMeta, dataset_info, legacy_index, open_dataset, read_index, write_index
from data.loader import LatentLoader, _Readers
from data.order import Schedule, resolve_num_streams
from data.shard_format import ShardFormatError, build_tar, commit_shard, committed_manifests, encode_sample, get_fs
from data.synthetic.shards import video_latents, write_synthetic_index, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig
from jobconfig.errors import ConfigError

SIZES = [3, 0, 4, 2]  # an empty shard: left out of DatasetMeta by either format
FRAMES = [5 + 3 * v for v in range(9)]
SHAPES = [(4, 4, 4), (4, 4, 6), (4, 6, 4)] * 3


def cfg(root, **kw):
    return DataConfig(root=root, seed=1, shuffle_buffer=2, batch_size=2, epochs=1,
                      stage=StageSamplingConfig(frames=3, interval_value=2), **kw)


def keys_served(loader):
    return [key for b in loader for _, key, *_ in b.samples()]


def same_columns(a: DatasetMeta, b: DatasetMeta) -> None:
    assert a == b and a.fingerprint == b.fingerprint and a.shard_frames == b.shard_frames
    assert a.offsets.tolist() == b.offsets.tolist()
    assert [a.sample_shape(i) for i in range(a.num_samples)] == [b.sample_shape(i) for i in range(b.num_samples)]


@pytest.fixture
def toy(tmp_path):
    write_toy_dataset(str(tmp_path), SIZES, frames=FRAMES, shape=SHAPES)
    fs, root = get_fs(str(tmp_path))
    return tmp_path, fs, root


def as_format_1(fs, root):
    """index.json rewritten as the format-1 writer left it (shards inline, no columns file)."""
    index = read_index(fs, root)
    text = json.dumps(legacy_index(committed_manifests(fs, root), **dataset_info(index)), sort_keys=True, indent=1)
    fs.pipe_file(f"{root}/index.json", text.encode())


def test_round_trip_equals_the_format_1_index(toy):
    tmp_path, fs, root = toy
    index = read_index(fs, root)
    assert index["format_version"] == 2 and index["version"] == 1 and "shards" not in index
    assert (index["num_samples"], index["num_shards"], index["num_frames"]) == (9, 4, sum(FRAMES))
    assert index["latent_shape"] == [4, 4, 4] and index["dtype"] == "float32"  # the writer's facts
    # published by rename: no temporary left beside index.json or the columns file
    assert sorted(os.listdir(tmp_path)) == ["index", "index.json", "shards"]
    assert os.listdir(tmp_path / "index") == [index["columns"]["path"].split("/")[1]]
    meta = open_dataset(str(tmp_path))
    manifests = committed_manifests(fs, root)
    v1 = DatasetMeta.from_index(legacy_index(manifests, **dataset_info(index)))
    same_columns(meta, v1)
    assert meta.names == ("train-000000", "train-000002", "train-000003") and meta.sizes == (3, 4, 2)
    assert [meta.sample_shape(i) for i in range(9)] == [[f, *s] for f, s in zip(FRAMES, SHAPES)]
    assert [meta.key(i) for i in range(9)] == [k for m in manifests.values() for k in m.keys]
    stage_cfg = cfg(str(tmp_path))
    assert build_buckets(meta, stage_cfg).code.tolist() == build_buckets(v1, stage_cfg).code.tolist()


def test_a_format_1_index_still_reads_to_the_same_data_order(toy):
    tmp_path, fs, root = toy
    columns = open_dataset(str(tmp_path))
    served = keys_served(LatentLoader(cfg(str(tmp_path))))
    as_format_1(fs, root)
    assert read_index(fs, root)["format_version"] == 1
    legacy = open_dataset(str(tmp_path))
    same_columns(legacy, columns)
    assert legacy.version == 1 and legacy.key(0) is None  # format 1 listed no keys
    loader = LatentLoader(cfg(str(tmp_path)))
    assert keys_served(loader) == served and sorted(set(served)) == [f"v{v:06d}" for v in range(9)]
    # publishing over it: version 2, read from its columns
    assert write_index(fs, root, committed_manifests(fs, root), **dataset_info(read_index(fs, root)))["version"] == 2
    same_columns(open_dataset(str(tmp_path)), columns)


def test_a_second_publish_is_version_2_and_a_reader_of_version_1_still_reads(toy):
    tmp_path, fs, root = toy
    first = open_dataset(str(tmp_path))
    old_columns = first.columns_file
    lat = video_latents(9, 11, (4, 4, 4))
    commit_shard(fs, root, "train-000004", build_tar([("v000009", encode_sample(lat, {}))]), ["v000009"], 11,
                 [list(lat.shape)])
    index = write_index(fs, root, committed_manifests(fs, root), **dataset_info(read_index(fs, root)))
    assert index["version"] == 2 and index["num_samples"] == 10
    assert index["columns"]["path"].startswith("index/v000002-") and os.path.exists(old_columns)
    # the reader of version 1, and a worker it hands its index to, still read version 1's columns
    again = pickle.loads(pickle.dumps(first))
    assert again.columns_file == old_columns and again.version == 1
    same_columns(again, first)
    grown = open_dataset(str(tmp_path))
    assert grown.version == 2 and grown.names[-1] == "train-000004" and grown.sample_shape(9) == [11, 4, 4, 4]
    older = grown.prefix(len(first.names))  # append-only: the older dataset is a prefix
    same_columns(older, first)
    assert older.key(8) == first.key(8) and grown.fingerprint != first.fingerprint
    assert pickle.loads(pickle.dumps(older)).num_samples == first.num_samples


def test_a_truncated_or_altered_columns_file_is_refused_naming_it(toy):
    tmp_path, fs, root = toy
    path = tmp_path / read_index(fs, root)["columns"]["path"]
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ShardFormatError, match=rf"{path}: {len(data) - 100} bytes, .*index.json says {len(data)}"):
        open_dataset(str(tmp_path))
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(ShardFormatError, match=rf"{path}: sha256 .* does not match .*index.json"):
        LatentLoader(cfg(str(tmp_path)))
    from orchestration.preflight import read_dataset_index
    with pytest.raises(ConfigError, match=rf"data.root: {path}: sha256"):
        read_dataset_index(str(tmp_path), {})
    path.unlink()
    with pytest.raises(ShardFormatError, match=rf"{path}: missing"):
        open_dataset(str(tmp_path))
    index = json.loads((tmp_path / "index.json").read_text())
    del index["columns"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardFormatError, match=r"index.json: expected an integer `version` and `columns`"):
        open_dataset(str(tmp_path))


def test_from_s3_the_columns_are_fetched_once_per_node(s3_bucket, tmp_path, monkeypatch):
    fs, opts, bucket = s3_bucket
    monkeypatch.setenv("VGPT_CACHE", str(tmp_path / "cache"))
    root = f"s3://{bucket}/latents"
    index = write_toy_dataset(root, [2, 3], frames=[5, 6, 7, 8, 9], storage_options=opts)
    meta = open_dataset(root, opts)
    cached = tmp_path / "cache" / "index" / f"{index['columns']['sha256']}.npz"
    assert meta.columns_file == str(cached) and isinstance(meta.frames, np.memmap)
    assert sorted(os.listdir(cached.parent)) == [cached.name]  # no temporary left behind
    # a second reader of the node maps the cached file: with the object gone, it still reads
    fs.rm(f"{bucket}/latents/{index['columns']['path']}")
    again = open_dataset(root, opts)
    same_columns(again, meta)
    assert sorted({b for batch in LatentLoader(cfg(root, storage_options=opts)) for _, b, *_ in batch.samples()}) \
        == [f"v{v:06d}" for v in range(5)]
    cached.write_bytes(cached.read_bytes()[:-1])  # a damaged cache entry is fetched again: gone now, refused
    with pytest.raises(ShardFormatError, match=rf"s3://{bucket}/latents/index/v000001-.*npz: missing"):
        open_dataset(root, opts)


def test_a_large_index_is_mapped_and_workers_get_the_map_not_a_copy(tmp_path):
    index = write_synthetic_index(str(tmp_path), 2_000_000, shard_size=1000)
    meta = open_dataset(str(tmp_path))
    assert meta.num_samples == 2_000_000 and len(meta.names) == 2000 and meta.version == 1
    for col in (meta.frames, meta.shape_ids, meta.key_blob, meta.key_offsets):
        assert isinstance(col, np.memmap) and not col.flags.owndata and col.filename == meta.columns_file
    assert meta.key(1_999_999).startswith("clip001999999-")
    data_cfg = cfg(str(tmp_path), num_workers=2)
    buckets = build_buckets(meta, data_cfg)
    assert sum(buckets.sizes) + buckets.num_known_skips == meta.num_samples
    sched = Schedule(buckets.sizes, buckets.num_known_skips, buckets.batch, 8, (0,) * len(buckets.names))
    readers = _Readers(data_cfg, meta, buckets, resolve_num_streams(0, len(meta.names)), sched, 0)
    handed = pickle.dumps(readers)  # what a DataLoader worker started by spawn receives
    index_bytes = sum(c.nbytes for c in (meta.frames, meta.shape_ids, buckets.code))
    assert len(handed) < 20_000 < index_bytes // 100, (len(handed), index_bytes)
    got = pickle.loads(handed)
    assert isinstance(got.meta.frames, np.memmap) and got.meta.columns_file == meta.columns_file
    assert np.array_equal(got.meta.frames, meta.frames) and np.array_equal(got.buckets.code, buckets.code)
    assert got.buckets.fingerprint == buckets.fingerprint and got.meta.fingerprint == meta.fingerprint
    assert set(map_columns(tmp_path / index["columns"]["path"])) >= {"sample_frames", "sample_shape", "key_blob"}
