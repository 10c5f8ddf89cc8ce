"""The dataset index at scale: start-up and resident memory per process kind (bench/loader.py --samples).

Each kind is measured in a fresh interpreter (`--probe KIND`), after its imports, so that the figures
are what the index adds: start-up in seconds, and resident memory in MB from /proc (RSS, split into
anonymous memory and file pages; the file pages of a memory-mapped index are the page cache, one
copy per node whoever maps them). The raw read is np.load of every column of the same file, the
floor any reader that copies the columns pays; each kind is printed with its ratio to it.

  rank       index read -> first batch planned: DatasetMeta + build_buckets + the first window of
             data/order.py's Schedule (8 ranks, batch 4: a node's rank)
  worker     a DataLoader worker: the loader's reader object (data/loader.py `_Readers`) unpickled, as
             a worker started by spawn gets it, and its index look-ups for the first step; its epoch
             order (data/order.py, the worker's own arrays, not the index) reported beside it
  preflight  orchestration/preflight.py's dataset read + the stage's buckets
  2 workers  a DataLoader of 2 workers (fork, the default, and spawn) whose workers touch every
             per-sample column the loader reads: the private memory each adds (a copy of the index
             would show here) next to the shared pages it maps
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from data.buckets import build_buckets  # noqa: E402
from data.dataset_index import DatasetMeta, legacy_index, open_dataset, read_index  # noqa: E402
from data.loader import _Readers  # noqa: E402
from data.order import Schedule, bucket_streams, epoch_order, reader_items, resolve_num_streams  # noqa: E402
from data.shard_format import ShardManifest, get_fs  # noqa: E402
from data.synthetic.shards import synthetic_columns, write_synthetic_index  # noqa: E402
from jobconfig.data import DataConfig, StageSamplingConfig  # noqa: E402

WORLD, BATCH = 8, 4
HERE = Path(__file__).resolve()


def memory() -> dict[str, float]:
    """MB: rss, anon (RssAnon), file (RssFile), private (Private_Dirty: pages only this process wrote)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    kb = lambda d, k: int(d[k].split()[0]) / 1024  # noqa: E731
    return {"rss": kb(status, "VmRSS"), "anon": kb(status, "RssAnon"), "file": kb(status, "RssFile"),
            "private": kb(rollup, "Private_Dirty")}


def delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k], 1) for k in before}


def cfg_of(root: str) -> DataConfig:
    return DataConfig(root=root, batch_size=BATCH, shuffle_buffer=256,
                      stage=StageSamplingConfig(frames=16, interval="fixed", interval_value=4))


def _rank(root: str, blob: str | None) -> dict:
    cfg = cfg_of(root)
    t, m0 = time.perf_counter(), memory()
    meta = open_dataset(root)
    t_meta = time.perf_counter() - t
    buckets = build_buckets(meta, cfg, where=f"{root}/index.json")
    S = resolve_num_streams(cfg.num_streams, len(meta.names))
    sched = Schedule(buckets.sizes, buckets.num_known_skips, buckets.batch, WORLD, (0,) * len(buckets.names),
                     cfg.epoch_tail, cfg.epochs, 0)
    window = next(sched.windows())
    out = {"seconds": time.perf_counter() - t, "meta_s": t_meta, "mem": delta(m0, memory()),
           "steps_in_window": len(window), "buckets": list(buckets.names)}
    if blob:
        data = pickle.dumps(_Readers(cfg, meta, buckets, S, sched, 0))
        Path(blob).write_bytes(data)
        out["handed_bytes"] = len(data)
    return out


def _worker(root: str, blob: str) -> dict:
    data = Path(blob).read_bytes()
    t, m0 = time.perf_counter(), memory()
    readers = pickle.loads(data)
    meta, sched = readers.meta, readers.schedule
    window = next(sched.windows())
    steps, bks, items, _ = reader_items(window, sched.batch, WORLD, 0, 0, 2)
    index_s, m_index = time.perf_counter() - t, memory()
    cfg = readers.cfg
    args = (cfg.seed, 0, readers.num_streams, cfg.shuffle_buffer)
    sh, ix = epoch_order(meta.sizes, *args)
    streams = bucket_streams(meta.sizes, readers.buckets.code, len(readers.buckets.names), *args)
    first = steps == steps[0]  # the first step's reads: their recorded shapes
    shapes = [meta.sample_shape(int(meta.offsets[sh[p]]) + int(ix[p]))
              for p in (int(streams[b][i % sched.sizes[b]]) for b, i in zip(bks[first], items[first]))]
    return {"seconds": time.perf_counter() - t, "index_s": index_s, "mem": delta(m0, m_index),
            "with_order_mem": delta(m0, memory()), "first_step_reads": len(shapes)}


def _preflight(root: str, blob: str | None) -> dict:
    from orchestration.preflight import read_dataset_index  # the preflight's imports are not the index's
    cfg = cfg_of(root)
    t, m0 = time.perf_counter(), memory()
    meta = read_dataset_index(root, {})
    build_buckets(meta, cfg, where=f"{root}/index.json")
    return {"seconds": time.perf_counter() - t, "mem": delta(m0, memory())}


def _raw(root: str, blob: str | None) -> dict:
    fs, path = get_fs(root)
    legacy = not Path(path, "index").is_dir()  # format 1: no columns folder (and no second parse here)
    index = None if legacy else read_index(fs, path)
    t, m0 = time.perf_counter(), memory()
    if legacy:  # the old reader: parse the JSON, then the arrays it gave
        DatasetMeta.from_index(json.loads(Path(path, "index.json").read_bytes()))
    else:
        with np.load(f"{path}/{index['columns']['path']}") as z:
            cols = {k: z[k] for k in z.files}
        assert cols
    return {"seconds": time.perf_counter() - t, "mem": delta(m0, memory())}


class _Probe(IterableDataset):
    """In a DataLoader worker: the reader object as the worker gets it (fork: inherited from the parent,
    which has touched every column; spawn: unpickled here, as the worker's start would), then every
    per-sample column the loader reads touched (reductions: no temporaries). Yields what that added."""

    def __init__(self, readers=None, handed: bytes | None = None):
        self.readers, self.handed = readers, handed

    def __iter__(self):
        m0 = memory()
        readers = self.readers if self.handed is None else pickle.loads(self.handed)
        meta, code = readers.meta, readers.buckets.code
        touched = int(meta.frames.sum(dtype=np.int64) + meta.shape_ids.sum(dtype=np.int64)
                      + code.sum(dtype=np.int64))
        yield {"pid": os.getpid(), "touched": touched, "mem": delta(m0, memory())}


def _two_workers(root: str, blob: str) -> dict:
    handed = Path(blob).read_bytes()
    readers = pickle.loads(handed)
    readers.meta.frames.sum(dtype=np.int64), readers.meta.shape_ids.sum(dtype=np.int64)  # the rank's pages
    out = {}
    for ctx, probe in (("fork", _Probe(readers)), ("spawn", _Probe(handed=handed))):
        got = list(DataLoader(probe, batch_size=None, num_workers=2, multiprocessing_context=ctx))
        out[ctx] = [g["mem"] for g in got]
    return out


PROBES = {"rank": _rank, "worker": _worker, "preflight": _preflight, "raw": _raw, "two_workers": _two_workers}


def probe(kind: str, root: str, blob: str | None = None) -> dict:
    """Run one kind in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, str(HERE), "--probe", kind, "--root", root] + (["--blob", blob] if blob else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parents[1])
    if res.returncode:
        raise RuntimeError(f"probe {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _line(kind: str, r: dict, raw: dict, extra: str = "") -> str:
    m = r["mem"]
    return (f"{kind:<10} start-up {r['seconds']:6.2f} s  resident {m['rss']:7.1f} MB (anon {m['anon']:.1f}, "
            f"file pages {m['file']:.1f})  vs raw read: time x{r['seconds'] / raw['seconds']:.2f}, "
            f"memory x{m['rss'] / max(raw['mem']['rss'], 1e-9):.2f}{extra}")


def report(root: str, label: str) -> None:
    blob = str(Path(root) / "handed.pkl")
    raw = probe("raw", root)
    print(f"[{label}] raw read of the same columns: {raw['seconds']:.2f} s, resident {raw['mem']['rss']:.1f} MB")
    rank = probe("rank", root, blob)
    print(_line("rank", rank, raw, f"  (DatasetMeta {rank['meta_s']:.2f} s; buckets {rank['buckets']}; first "
                                   f"window {rank['steps_in_window']} steps)"))
    worker = probe("worker", root, blob)
    wo = worker["with_order_mem"]
    print(_line("worker", {"seconds": worker["index_s"], "mem": worker["mem"]}, raw,
                f"  (handed object {rank['handed_bytes'] / 1e3:.1f} kB pickled; with its epoch order: "
                f"{worker['seconds']:.2f} s, {wo['rss']:.1f} MB)"))
    print(_line("preflight", probe("preflight", root), raw))
    two = probe("two_workers", root, blob)
    for ctx, per in two.items():
        print(f"{'2 workers':<10} ({ctx}) index added per worker: " + ", ".join(
            f"private {t['private']:+.1f} MB, anon {t['anon']:+.1f} MB, file pages {t['file']:+.1f} MB" for t in per)
            + " (private: pages the worker wrote; a copy of the index would be there)")


def index_bench(samples: int, shard_size: int, legacy: bool, where: str | None) -> None:
    tmp = None if where else tempfile.TemporaryDirectory(prefix="vgpt-index-")
    root = where or tmp.name
    print(f"dataset index: {samples} samples in shards of {shard_size}; cpus={os.cpu_count()} load average "
          f"{os.getloadavg()[0]:.1f} (other work on the machine skews every figure)")
    t = time.perf_counter()
    index = write_synthetic_index(f"{root}/v2", samples, shard_size)
    print(f"index build: {time.perf_counter() - t:.2f} s (columns + publish), columns file "
          f"{index['columns']['bytes'] / 1e6:.1f} MB")
    report(f"{root}/v2", "columns")
    if legacy:
        t = time.perf_counter()
        manifests = _manifests(synthetic_columns(samples, shard_size))
        text = json.dumps(legacy_index(manifests, latent_channels=16), sort_keys=True, indent=1).encode()
        os.makedirs(f"{root}/v1")
        Path(f"{root}/v1/index.json").write_bytes(text)
        print(f"format-1 index.json build: {time.perf_counter() - t:.2f} s, {len(text) / 1e6:.1f} MB")
        del manifests, text
        report(f"{root}/v1", "format 1")
    if tmp is not None:
        tmp.cleanup()


def _manifests(cols: dict) -> dict[str, ShardManifest]:
    """The manifests the synthetic columns stand for (the format-1 index is written from these)."""
    bounds = np.concatenate([[0], np.cumsum(cols["shard_num_samples"])])
    shapes = np.concatenate([cols["sample_frames"][:, None].astype(np.int64),
                             cols["shape_table"][cols["sample_shape"]].astype(np.int64)], axis=1)
    out = {}
    for s, name in enumerate(cols["shard_name"].tolist()):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        keys = [bytes(k).decode() for k in cols["key_blob"].reshape(len(shapes), -1)[lo:hi]]
        out[name.decode()] = ShardManifest(name.decode(), keys, hi - lo, int(cols["shard_num_frames"][s]),
                                           int(cols["shard_bytes"][s]), cols["shard_sha256"][s].decode(),
                                           sample_shapes=shapes[lo:hi].tolist())
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", choices=sorted(PROBES), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--blob")
    a = ap.parse_args()
    print(json.dumps(PROBES[a.probe](a.root, a.blob)))
