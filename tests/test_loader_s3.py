"""Acceptance 4: the loader over an S3 server on loopback (moto, tests/conftest.py):
exactly-once across ranks with worker processes, and resume on another world size."""
from __future__ import annotations

import itertools

import pytest

from data.loader import LatentLoader
from data.synthetic.shards import video_of, write_toy_dataset
from jobconfig.data import DataConfig, StageSamplingConfig

SIZES = [3, 7, 2, 5, 4]
N = sum(SIZES)


@pytest.fixture
def s3_root(s3_bucket):
    fs, opts, bucket = s3_bucket
    root = f"s3://{bucket}/latents"
    write_toy_dataset(root, SIZES, frames=[5 + v % 9 for v in range(N)], storage_options=opts)
    return root, opts


def cfg(root, opts, workers=0):
    return DataConfig(root=root, storage_options=opts, seed=3, shuffle_buffer=4, batch_size=2, epochs=1,
                      num_workers=workers, stage=StageSamplingConfig(frames=3, interval="random", interval_min=1,
                                                                     interval_max=3, clips="random"))


def run(loader, steps=None):
    out = []
    for batch in itertools.islice(loader, steps):  # islice: never pulls (consumes) one batch too many
        for r, row in enumerate(batch.clips):
            f0 = 0
            for s, clips in enumerate(row):
                key = batch.keys[r][s]
                vals = batch.latents[r, f0:f0 + sum(clips), 0, 0, 0].tolist()
                assert vals == [video_of(key) * 1000 + t for t in batch.frame_indices[r][s]]
                f0 += sum(clips)
        out += batch.samples()
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_exactly_once_over_s3(s3_root, workers):
    root, opts = s3_root
    W = 2
    per_rank = [run(LatentLoader(cfg(root, opts, workers), r, W)) for r in range(W)]
    epoch0 = sorted(video_of(key) for rank in per_rank for g, key, *_ in rank if g < N)
    assert epoch0 == list(range(N))  # all long enough: every video exactly once


def test_resume_over_s3_on_another_world_size(s3_root):
    root, opts = s3_root
    reference = sorted(run(LatentLoader(cfg(root, opts), 0, 1)))
    loaders = [LatentLoader(cfg(root, opts), r, 2) for r in range(2)]
    before = [x for ld in loaders for x in run(ld, 2)]
    state = loaders[0].state_dict()
    after = []
    for r in range(3):
        ld = LatentLoader(cfg(root, opts, workers=1 if r == 0 else 0), r, 3)
        ld.load_state_dict(state)
        after += run(ld)
    merged = sorted(before + after)
    assert merged[: len(reference)] == reference  # nothing repeated, nothing skipped, same samples
    assert len({g for g, *_ in merged}) == len(merged)
