"""Acceptance 6: a corrupt shard is reported by name and skipped, or fails loudly, as
configured (data.corrupt_shards); it never yields garbage.

Four kinds of damage: a truncated tar, a flipped byte (same size, bad sha256),
an index whose hash matches a tar that is not a tar (only the parser can tell),
and a shard listed in the index but missing.
"""
from __future__ import annotations

import json
import logging

import pytest

from data.loader import LatentLoader
from data.shard_format import ShardFormatError
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig

SIZES = [4, 6, 3, 5]
BAD = "train-000001"  # 6 samples: v000004 .. v000009


def _truncate(root):
    path = f"{root}/shards/{BAD}.tar"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _flip(root):
    path = f"{root}/shards/{BAD}.tar"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0xFF  # inside a sample's latents: the tar still parses, the values are garbage
    open(path, "wb").write(bytes(data))


def _not_a_tar(root):
    import hashlib

    from data.dataset_index import dataset_info, read_index, write_index
    from data.shard_format import committed_manifests, get_fs
    junk = b"\x13" * 4096
    open(f"{root}/shards/{BAD}.tar", "wb").write(junk)
    manifest = json.load(open(f"{root}/shards/{BAD}.json"))
    manifest["sha256"], manifest["bytes"] = hashlib.sha256(junk).hexdigest(), len(junk)
    open(f"{root}/shards/{BAD}.json", "w").write(json.dumps(manifest))
    fs, path = get_fs(root)  # the index, republished from the manifests, vouches for the junk
    write_index(fs, path, committed_manifests(fs, path), **dataset_info(read_index(fs, path)))


def _missing(root):
    import os
    os.remove(f"{root}/shards/{BAD}.tar")


DAMAGE = {"truncated": _truncate, "bad_sha256": _flip, "not_a_tar": _not_a_tar, "missing": _missing}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, tmp_path):
    write_toy_dataset(str(tmp_path), SIZES, frames=8)
    DAMAGE[request.param](str(tmp_path))
    return str(tmp_path)


def cfg(root, policy, workers=0):
    return DataConfig(root=root, seed=5, shuffle_buffer=3, batch_size=2, epochs=1, num_workers=workers,
                      corrupt_shards=policy, stage=StageSamplingConfig(frames=2, interval_value=2))


@pytest.mark.parametrize("workers", [0, 1])
def test_fail_policy_raises_naming_the_shard(damaged, workers):
    with pytest.raises(ShardFormatError, match=rf"shard .*/shards/{BAD}\.tar: "):
        for _ in LatentLoader(cfg(damaged, "fail", workers)):
            pass


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_policy_reports_and_skips_the_whole_shard(damaged, workers, caplog):
    W, served, skipped, corrupt = 2, [], [], set()
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        for r in range(W):
            loader = LatentLoader(cfg(damaged, "skip", workers), r, W)
            rank_skips = 0
            for batch in loader:
                for r_, row in enumerate(batch.clips):
                    for s, _ in enumerate(row):
                        key = batch.keys[r_][s]
                        frames = batch.latents[r_, 2 * s: 2 * s + 2, 0, 0, 0].tolist()
                        # never garbage: values are exactly the stored frames of this key's video
                        assert frames == [video_of(key) * 1000 + t for t in batch.frame_indices[r_][s]]
                        served.append((batch.global_index[r_][s], key))
                skipped += [(g, reason) for g, _, reason in batch.skipped]
                rank_skips += sum(reason == "corrupt_shard" for _, _, reason in batch.skipped)
            corrupt |= loader.corrupt_shards
            assert loader.stats["skipped/corrupt_shard"] == rank_skips
    N = sum(SIZES)
    epoch0_keys = sorted(video_of(k) for g, k in served if g < N)
    assert epoch0_keys == [v for v in range(N) if not 4 <= v < 10], "every good sample exactly once"
    assert sorted(g for g, reason in skipped if g < N and reason == "corrupt_shard") == \
        sorted(set(range(N)) - {g for g, k in served if g < N})
    assert len([g for g, _ in skipped if g < N]) == 6
    assert corrupt == {BAD}
    if workers == 0:  # warnings from worker processes go to their own stderr
        assert any(BAD in rec.getMessage() for rec in caplog.records)


def test_an_undecodable_sample_in_a_verified_shard(tmp_path):
    """A shard whose hash is right but one sample's latents are junk (a writer bug): the same policy."""
    from data.dataset_index import write_index
    from data.shard_format import build_tar, commit_shard, committed_manifests, encode_sample, get_fs
    from data.synthetic.shards import video_latents

    fs, root = get_fs(str(tmp_path))
    good = [(f"v{v:06d}", encode_sample(video_latents(v, 8, (4, 4, 4)), {})) for v in range(3)]
    good[1][1]["latents.safetensors"] = b"not safetensors"
    commit_shard(fs, root, "train-000000", build_tar(good), [k for k, _ in good], 24)
    write_index(fs, root, committed_manifests(fs, root))
    with pytest.raises(ShardFormatError, match="shard train-000000 sample v000001: cannot decode"):
        list(LatentLoader(cfg(root, "fail")))
    loader = LatentLoader(cfg(root, "skip"))
    batches = list(loader)
    served = sorted(k for b in batches for row in b.keys for k in row)
    assert "v000001" not in served and {"v000000", "v000002"} <= set(served)
    assert loader.stats["skipped/corrupt_sample"] >= 1
