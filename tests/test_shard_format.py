"""Our shards are genuine WebDataset: the webdataset library itself reads them back."""
import json
import struct

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from data.dataset_index import open_dataset
from data.shard_format import ShardFormatError, build_tar, decode_sample, encode_sample, iter_tar
from data.synthetic.shards import write_toy_dataset


def test_webdataset_library_reads_our_shards(tmp_path):
    write_toy_dataset(str(tmp_path), [3], frames=5, shape=(4, 2, 2))
    url = str(tmp_path / "shards" / f"{open_dataset(str(tmp_path)).names[0]}.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["v000000", "v000001", "v000002"]
    for v, s in enumerate(samples):
        latents, meta = decode_sample({"latents.safetensors": s["latents.safetensors"], "meta.json": s["meta.json"]})
        assert latents.shape == (5, 4, 2, 2) and latents[3, 0, 0, 0] == v * 1000 + 3
        assert json.loads(s["meta.json"])["frames"] == 5


def test_tar_bytes_and_stream_parse_alike_and_truncation_is_caught():
    members = [(f"k{i}", encode_sample(torch.full((2, 4, 2, 2), float(i)), {"i": i})) for i in range(3)]
    tar = build_tar(members)
    assert build_tar(members) == tar  # deterministic bytes
    import io
    assert list(iter_tar(tar)) == list(iter_tar(io.BytesIO(tar)))
    assert [k for k, _ in iter_tar(tar)] == ["k0", "k1", "k2"]
    # every cut raises, naming the shard: inside a payload, at or inside a header, inside the
    # end-of-archive marker or the record padding (bytes or stream alike)
    for cut in range(len(tar)):
        for data in (tar[:cut], io.BytesIO(tar[:cut])):
            with pytest.raises(ShardFormatError, match="shard-x: corrupt or truncated tar"):
                list(iter_tar(data, where="shard-x"))


def test_latents_decode_as_safetensors_reads_them_without_a_copy_and_bad_headers_are_refused():
    """decode_sample gives what safetensors' own loader gives, for every stored dtype and both latent
    forms, as a view of the member's bytes (the loader's one copy is into its batch); a payload whose
    header lies about its tensor is refused naming the sample, never read past its end."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for channels in (4, 8):  # sample form, posterior form (mean and std)
            x = torch.randn(6, channels, 3, 5).to(dtype)
            members = encode_sample(x, {"k": 1})
            payload = members["latents.safetensors"]
            got, meta = decode_sample(members)
            assert got.dtype == dtype and torch.equal(got, st_load(payload)["latents"]) and meta == {"k": 1}
            base = np.frombuffer(payload, np.uint8).ctypes.data  # where the member's bytes are
            assert base < got.data_ptr() < base + len(payload)  # a view of them, not a fresh copy
    assert decode_sample(encode_sample(torch.zeros(0, 4, 2, 2), {}))[0].shape == (0, 4, 2, 2)

    def lying(entry: dict, data: bytes = b"\0" * 16) -> bytes:
        head = json.dumps({"latents": entry}).encode()
        return struct.pack("<Q", len(head)) + head + data

    bad = [b"", b"short", struct.pack("<Q", 10 ** 9) + b"{}",
           lying({"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}),
           lying({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}),  # past the payload's end
           lying({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}),  # span != shape's bytes
           lying({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}),
           lying({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}),
           struct.pack("<Q", 2) + b"{}"]  # no latents
    for payload in bad:
        with pytest.raises(ShardFormatError, match="shard-x sample k: cannot decode sample"):
            decode_sample({"latents.safetensors": payload, "meta.json": b"{}"}, where="shard-x sample k")


def test_frame_counts_are_recorded_once_and_older_records_still_read(tmp_path):
    """index.json and the manifests record each sample's shape [T, C, h, w] only (T is its frame count);
    manifests and indexes written when a second copy, sample_frames, was kept still read."""
    from data.columns_file import map_columns
    from data.dataset_index import DatasetMeta, legacy_index
    from data.shard_format import ShardManifest, committed_manifests, get_fs

    index = write_toy_dataset(str(tmp_path), [2, 1], frames=[5, 7, 3], shape=(4, 2, 2))
    cols = map_columns(tmp_path / index["columns"]["path"])  # frames: one column, the shape table [C, h, w] only
    # (sample_first_frame is where each sample starts in its input video: data/videos.py)
    assert sorted(k for k in cols if k.startswith("sample_")) == ["sample_first_frame", "sample_frames", "sample_shape"]
    assert cols["shape_table"].tolist() == [[4, 2, 2]]
    assert open_dataset(str(tmp_path)).frames.tolist() == [5, 7, 3]
    fs, root = get_fs(str(tmp_path))
    for name in ("train-000000", "train-000001"):  # as the earlier writer left them
        path = tmp_path / "shards" / f"{name}.json"
        m = json.loads(path.read_text())
        path.write_text(json.dumps({**m, "sample_frames": [s[0] for s in m["sample_shapes"]]}))
    manifests = committed_manifests(fs, root)
    assert manifests["train-000000"] == ShardManifest.from_json((tmp_path / "shards" / "train-000000.json").read_text())
    assert [m.sample_shapes for m in manifests.values()] == [[[5, 4, 2, 2], [7, 4, 2, 2]], [[3, 4, 2, 2]]]
    rewritten = legacy_index(manifests)  # index.json of format 1, shards inline
    older = {**rewritten, "shards": [{**s, "sample_frames": [x[0] for x in s["sample_shapes"]]}
                                     for s in rewritten["shards"]]}
    assert DatasetMeta.from_index(older).frames.tolist() == [5, 7, 3]


def test_the_latent_form_is_recorded_and_an_index_without_it_reads_as_one_draw(tmp_path):
    """index.json `latent_form` (issue 29): `posterior` datasets hold [mean, std] in 2C channels; an
    index without the field (every dataset of before it) reads as `sample`; DatasetMeta keeps the form
    when it crosses to a DataLoader worker (pickled as its columns file); a bad value names the key."""
    import pickle

    from data.loader import LatentLoader
    from jobconfig.data import DataConfig, StageSamplingConfig

    stage = StageSamplingConfig(frames=2, interval="fixed", interval_value=1, clips="single_frame", patch_size=2)
    for form, want in (("posterior", "posterior"), ("sample", "sample"), (None, "sample")):
        root = tmp_path / str(form)
        index = write_toy_dataset(str(root), [2], frames=4, shape=(4, 2, 2), latent_form=form, std=0.5)
        assert index.get("latent_form") == form
        meta = open_dataset(str(root))
        assert meta.latent_form == want and pickle.loads(pickle.dumps(meta)).latent_form == want
        channels = 8 if form == "posterior" else 4
        assert meta.sample_shape(0) == [4, channels, 2, 2]
        batch = next(iter(LatentLoader(DataConfig(root=str(root), batch_size=2, stage=stage))))
        assert batch.moments == (want == "posterior") and batch.latents.shape[2] == channels
        assert batch.to("cpu").moments == batch.moments
        if form == "posterior":
            assert (batch.latents[:, :, 4:] == 0.5).all()  # the std after the mean
    text = (root / "index.json").read_text()
    (root / "index.json").write_text(text.replace('"latent_form"', '"x"').replace("{", '{"latent_form": "mean", ', 1))
    with pytest.raises(ShardFormatError, match="index.json: latent_form 'mean', expected 'posterior' or 'sample'"):
        open_dataset(str(root))


def test_a_commit_killed_before_its_manifest_is_whole_leaves_no_manifest(tmp_path, monkeypatch):
    """The manifest's existence is the commit: a driver killed while writing it (here: just before the
    rename that publishes it) leaves the shard uncommitted, never an empty or partial manifest that
    every reader of the dataset would then fail on."""
    import fsspec

    import data.object_store as object_store
    from data.shard_format import commit_shard, committed_manifests

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    tar = build_tar([("k0", encode_sample(torch.zeros(2, 4, 2, 2, dtype=torch.bfloat16), {"key": "k0"}))])
    commit_shard(fs, root, "train-000000", tar, ["k0"], 2)

    def killed(src, dst):
        raise SystemExit("killed while committing")

    monkeypatch.setattr(object_store.os, "replace", killed)
    with pytest.raises(SystemExit):
        commit_shard(fs, root, "train-000001", tar, ["k0"], 2)
    assert not (tmp_path / "shards" / "train-000001.json").exists()
    assert list(committed_manifests(fs, root)) == ["train-000000"]  # the one whole commit, readable
