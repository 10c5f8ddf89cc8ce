"""`vgpt precompute`: the latent-precompute farm, a Ray job (videos -> latent shards).

    ray job submit --working-dir . -- vgpt precompute --config configs/precompute/sdxl.yaml
    vgpt precompute --config configs/precompute/tiny.yaml --precompute.inputs.dir=/data/videos

The same code runs on a cluster of many nodes (RAY_ADDRESS, set by `ray job
submit`) and on one box (a local Ray). The driver plans deterministically
(data/precompute_plan.py), skips shards whose manifest exists, and streams the
rest through Ray: decode tasks on CPUs overlap the encoder actors (GPU where
there is one). A video longer than `video.max_frames` is decoded one segment
per task, each becoming its own sample. Decode work is placed per node
(placement.py): on the nodes with the configured resources, at most
`ray.decode_in_flight` segments per node between decode and encode, so every
node's object store stays small. Losing a node costs time, not data: its tasks
are retried elsewhere, frames it held are recomputed from their task, its
encoders restart on other nodes, and samples are keyed, so a retried one
replaces nothing and duplicates nothing. Each shard is committed as soon as its
last segment is done, in a background thread: rejected inputs go to errors/
first, then the tar, then the manifest (the commit). A job killed at any point
is finished by submitting it again; nothing is redone or duplicated, and
index.json is written only when every shard of the plan is committed. Ray Jobs
do not retry a failed job, so this idempotence is what makes a days-long job
survivable.

Fault injection for tests: orchestration/faults.py (the committer's `after_commit`, the driver's pause).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from data.object_store import retry_count, retrying
from data.precompute_plan import (
    PlanError,
    ShardPlan,
    build_plan,
    config_hash,
    list_inputs,
    pin_plan,
    plan_hash,
    source_key,
)
from data.shard_format import build_tar, commit_shard, committed_manifests, get_fs, write_error, write_index
from data.vae import vae_info
from jobconfig.precompute import PrecomputeConfig
from orchestration.faults import exit_after_commits, pause_when_nodes_decoded
from orchestration.precompute.placement import NodeSlots
from orchestration.precompute.progress import Progress
from orchestration.precompute.workers import decode_threads, make_encoders, remote_decode


def log(msg: str) -> None:
    print(f"[precompute] {msg}", flush=True)


class _ShardWork:
    """What is known so far about one shard being computed. An input yields one sample per segment;
    the shard is complete when nothing of it is queued or in flight (`pending`)."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.samples: dict[tuple[str, int], tuple[str, dict[str, bytes], list[int]]] = {}  # (key, seg) -> ...
        self.segments: dict[str, int] = {}  # key -> number of segments, known after its first decode
        self.rejected: dict[str, str] = {}
        self.pending = len(plan.items)  # segments queued or in flight
        self.frames: dict[str, int] = {}  # key -> frames encoded so far

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def source_done(self, key: str) -> bool:
        return key not in self.rejected and sum(1 for k, _ in self.samples if k == key) == self.segments.get(key, -1)

    def ordered(self) -> list[tuple[str, dict[str, bytes], list[int]]]:
        """(sample key, members, shape) in plan order, segments in order; rejected inputs left out."""
        return [self.samples[(k, i)] for k, _ in self.plan.items if k not in self.rejected
                for i in range(self.segments.get(k, 0))]


class _Committer:
    """Commits finished shards in background threads; `after_commit(count)` is called after each
    (fault injection, orchestration/faults.py)."""

    def __init__(self, fs, root: str, threads: int, after_commit=None):
        self.fs, self.root = fs, root
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="commit")
        self.futures: list[tuple[str, Future]] = []
        self.lock, self.count = threading.Lock(), 0
        self.after_commit = after_commit

    def submit(self, work: _ShardWork) -> None:
        self.futures.append((work.plan.stem, self.pool.submit(self._commit, work)))

    def _commit(self, work: _ShardWork) -> None:
        uris = dict(work.plan.items)
        # Rejections are recorded before the manifest, so a committed shard never needs redoing.
        for key, _ in work.plan.items:
            if key in work.rejected:
                retrying(lambda: write_error(self.fs, self.root, key, uris[key], work.rejected[key]),
                         f"error record of {key}")
        samples = work.ordered()
        tar = build_tar((k, members) for k, members, _ in samples)
        # a throttled store costs time, not the job: the commit (tar, then manifest) is safe to redo
        retrying(lambda: commit_shard(self.fs, self.root, work.plan.stem, tar, [k for k, _, _ in samples],
                                      sum(s[0] for _, _, s in samples), [s for _, _, s in samples]),
                 f"commit of shard {work.plan.stem}")
        with self.lock:
            self.count += 1
            if self.after_commit:
                self.after_commit(self.count)

    def reap(self, wait: bool = False) -> list[str]:
        """Stems committed since the last call; re-raises a failed commit."""
        done, keep = [], []
        for stem, fut in self.futures:
            if wait or fut.done():
                fut.result()
                done.append(stem)
            else:
                keep.append((stem, fut))
        self.futures = keep
        return done


def _init_ray(cfg: PrecomputeConfig):
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if local:
        # A one-box run: keep Ray on loopback (by default it binds the routable interface).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None, include_dashboard=False if local else None)
    res = ray.cluster_resources()
    need_cpu = cfg.ray.encode_actors * cfg.ray.encode_cpus + cfg.ray.decode_cpus
    need_gpu = cfg.ray.encode_actors * cfg.ray.encode_gpus
    if res.get("CPU", 0) < need_cpu or res.get("GPU", 0) < need_gpu:
        log(f"WARNING: the cluster has {res.get('CPU', 0)} CPU / {res.get('GPU', 0)} GPU now; "
            f"precompute.ray asks {need_cpu} CPU / {need_gpu} GPU (encoders + one decode task): "
            "work waits until an autoscaler adds nodes")
    return ray


def _run_pipeline(cfg: PrecomputeConfig, fs, root: str, todo: list[ShardPlan], vae: dict,
                  progress: Progress) -> dict:
    ray = _init_ray(cfg)

    decode = remote_decode(cfg.ray)
    encoders = make_encoders(cfg.ray, cfg.vae, cfg.output.latent_dtype)
    try:
        idents = ray.get([e.identity.remote() for e in encoders])
        for ident in idents:
            if ident["sha256"] != vae["sha256"]:
                raise RuntimeError(f"precompute.vae.path={cfg.vae.path!r}: an encoder loaded VAE {ident} but "
                                   f"the driver sees {vae}: every node must hold the same VAE files")
        slots = NodeSlots(ray, cfg.ray)
        log(f"{len(encoders)} encoder actor(s) ready ({cfg.ray.encode_cpus} CPU, {cfg.ray.encode_gpus} GPU each) "
            f"on {len({i['node'] for i in idents})} node(s), vae {vae['name']} {vae['sha256']}, batch "
            f"{cfg.vae.batch_size}, dtype {cfg.vae.dtype}; decoding on {len(slots.alive)} node(s), "
            f"<= {cfg.ray.decode_in_flight} segments in flight each")
        committer = _Committer(fs, root, cfg.ray.commit_threads, after_commit=exit_after_commits())
        progress.restart()
        _drive(cfg, ray, decode, encoders, [i["node"] for i in idents], todo, committer, progress, slots)
        log(f"work by node: {slots.line()}")
        return slots.report()
    finally:
        for e in encoders:  # a long-lived (e.g. local, reused) Ray must not keep idle VAEs around
            ray.kill(e)


def _drive(cfg: PrecomputeConfig, ray, decode, encoders: list, encoder_nodes: list[str], todo: list[ShardPlan],
           committer: "_Committer", progress: Progress, slots: NodeSlots) -> None:
    """The scheduling loop: decode segments on the least-loaded node (bounded per node) -> least-loaded
    encoder (same node first) -> per-shard collection -> commit. A long video's first segment tells how
    many follow; they are queued first, so a shard's inputs finish together."""
    from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

    threads = decode_threads(cfg.ray)
    queue = deque((s.stem, k, u, 0, None) for s in todo for k, u in s.items)
    work = {s.stem: _ShardWork(s) for s in todo}
    decoding: dict = {}  # status ref -> (stem, key, uri, frames ref, table ref, node)
    encoding: dict = {}  # sample ref -> (stem, key, node, encoder index, what `encode` needs to redo it)
    load, dead = [0] * len(encoders), set()
    pause = pause_when_nodes_decoded()

    def settle(stem: str, key: str, node: str, sample: dict | None = None, segment: int = 0,
               reason: str | None = None) -> None:
        """One queued segment is resolved (encoded or rejected): account for it, commit a complete shard."""
        slots.release(node)
        w = work[stem]
        w.pending -= 1
        if reason is not None and key not in w.rejected:
            w.rejected[key] = reason
            log(f"rejected {key}: {reason}")
            progress.video(rejected=True)
        elif sample is not None and key not in w.rejected:
            w.samples[(key, segment)] = (sample["key"], sample["members"], sample["shape"])
            w.frames[key] = w.frames.get(key, 0) + sample["frames"]
            if w.source_done(key):
                progress.video(frames=w.frames[key])
        if w.complete:
            committer.submit(work.pop(stem))

    def encode(stem: str, key: str, node: str, status: dict, uri: str, frames_ref, attempt: int,
               avoid: int = -1) -> None:
        """To the least-loaded live encoder; among those, one on the decode's node (no frame transfer)."""
        i = min((j for j in range(len(encoders)) if j not in dead),
                key=lambda j: (j == avoid, load[j], encoder_nodes[j] != status["node"]))
        load[i] += 1
        ref = encoders[i].encode.remote(status, uri, frames_ref)
        encoding[ref] = (stem, key, node, i, {"status": status, "uri": uri, "frames_ref": frames_ref,
                                              "attempt": attempt})

    while queue or decoding or encoding:
        while queue:
            stem, key, uri, segment, table_ref = queue[0]
            if key in work[stem].rejected:  # an earlier segment failed: the input is out
                queue.popleft()
                work[stem].pending -= 1
                if work[stem].complete:
                    committer.submit(work.pop(stem))
                continue
            node = slots.pick()
            if node is None:
                break
            queue.popleft()
            slots.take(node)
            status_ref, frames_ref, out_table = decode(node).remote(
                key, uri, cfg.video, cfg.inputs.storage_options, segment, table_ref, threads)
            decoding[status_ref] = (stem, key, uri, frames_ref, out_table, node)
        if not decoding and not encoding:
            if not queue:
                break
            slots.refresh(force=True)  # every decode node is gone: wait for one (an autoscaler, a restart)
            log(f"WARNING: no live node can take decode work ({cfg.ray.decode_cpus} CPU + "
                f"{cfg.ray.decode_resources or 'no custom resources'}); waiting")
            time.sleep(cfg.progress_every_s)
            continue
        ready, _ = ray.wait(list(decoding) + list(encoding), num_returns=1, timeout=cfg.progress_every_s)
        for ref in ready:
            if ref in decoding:
                stem, key, uri, frames_ref, table_ref, node = decoding.pop(ref)
                try:
                    status = ray.get(ref)
                except RayError as e:  # retries exhausted: e.g. a file that crashes the decoder
                    status = {"ok": False, "segment": -1,
                              "reason": f"decode failed after {cfg.ray.max_retries} retries: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                slots.count("decode", status.get("node"))
                if not status["ok"]:
                    seg = status["segment"]
                    settle(stem, key, node, reason=status["reason"] if seg <= 0 else f"segment {seg}: {status['reason']}")
                    continue
                w = work[stem]
                if status["segment"] == 0 and key not in w.rejected:
                    n = w.segments[key] = status["num_segments"]
                    w.pending += n - 1
                    queue.extendleft((stem, key, uri, i, table_ref) for i in range(n - 1, 0, -1))
                encode(stem, key, node, status, uri, frames_ref, attempt=0)
            else:
                stem, key, node, i, args = encoding.pop(ref)
                load[i] -= 1
                try:
                    sample = ray.get(ref)
                except RayActorError as e:
                    # Its node died (or it is restarting): Ray's own retries can run out before the cluster
                    # has noticed, so the encode moves to another encoder. Samples are keyed: a sample
                    # that was in fact encoded twice is stored once.
                    if isinstance(e, ActorDiedError):
                        dead.add(i)
                    if args["attempt"] >= cfg.ray.max_retries or len(dead) == len(encoders):
                        raise  # fail the job; a resubmission resumes it
                    log(f"encoder {i} unavailable ({type(e).__name__}); encoding {key} elsewhere")
                    encode(stem, key, node, **{**args, "attempt": args["attempt"] + 1}, avoid=i)
                    continue
                except RayTaskError as e:
                    settle(stem, key, node, reason=f"encode failed: {str(e).splitlines()[0][:300]}")
                    continue
                slots.count("encode", sample["node"])
                settle(stem, key, node, sample=sample, segment=args["status"]["segment"])
        for stem in committer.reap():
            progress.shard_committed(stem)
        if pause:
            pause(slots.report())
        progress.maybe_print()
    for stem in committer.reap(wait=True):
        progress.shard_committed(stem)


def _count_rejected(fs, root: str, keys: set[str]) -> int:
    fs.invalidate_cache(f"{root}/errors")
    try:
        names = fs.glob(f"{root}/errors/*.json")
    except FileNotFoundError:
        return 0
    return sum(1 for p in names if p.rsplit("/", 1)[-1][:-5] in keys)


def run(cfg: PrecomputeConfig) -> dict:
    """Run (or finish) the job described by `cfg`; returns a summary (also printed)."""
    t0, retries_before = time.monotonic(), retry_count()
    fs, root = get_fs(cfg.output.root, cfg.output.storage_options)
    uris = list_inputs(cfg.inputs)
    if not uris:
        raise PlanError(f"precompute.inputs: no input matched {cfg.inputs.dir or cfg.inputs.glob or cfg.inputs.list_file!r} "
                        f"with extensions {cfg.inputs.extensions}")
    plan = build_plan(uris, cfg.output.shard_name, cfg.output.videos_per_shard)
    chash = config_hash(cfg)
    phash = plan_hash(plan, chash)
    vae = vae_info(cfg.vae.path)
    pin_plan(fs, root, {"plan_hash": phash, "config_hash": chash, "num_inputs": len(uris), "num_shards": len(plan),
                        "config": cfg.dataset_dict()})
    committed = committed_manifests(fs, root)
    for s in plan:
        m = committed.get(s.stem)
        if m is not None and not {source_key(k) for k in m.keys} <= {k for k, _ in s.items}:
            raise PlanError(f"{root}/shards/{s.stem}.json: committed keys are not in this plan's shard")
    todo = [s for s in plan if s.stem not in committed]
    done_videos = sum(len(s.items) for s in plan if s.stem in committed)
    log(f"plan {phash}: {len(uris)} inputs -> {len(plan)} shards of <= {cfg.output.videos_per_shard} videos; "
        f"{len(plan) - len(todo)} already committed, {len(todo)} to do; output {cfg.output.root}")
    progress = Progress(len(uris), done_videos, len(plan), len(plan) - len(todo), cfg.progress_every_s)
    nodes = {}
    if todo:
        nodes = _run_pipeline(cfg, fs, root, todo, vae, progress)
    else:
        log(f"nothing to do: all {len(plan)} shards are already committed; no video decoded or encoded")
    manifests = committed_manifests(fs, root)
    missing = [s.stem for s in plan if s.stem not in manifests]
    if missing:
        raise RuntimeError(f"{root}: shards {missing[:5]} of the plan are not committed after the run")
    keys = {k for s in plan for k, _ in s.items}
    rejected = _count_rejected(fs, root, keys)
    index = retrying(lambda: write_index(
        fs, root, {s.stem: manifests[s.stem] for s in plan}, plan_hash=phash, config_hash=chash, vae=vae,
        latent_channels=vae["latent_channels"], downsample=vae["downsample"], latent_layout="TCHW",
        latent_dtype="bfloat16" if cfg.output.latent_dtype == "bf16" else "float16", num_inputs=len(uris),
        num_rejected=rejected), f"{root}/index.json")
    seconds = time.monotonic() - t0
    summary = {"encoded_videos": progress.videos - progress.rejected, "rejected_this_run": progress.rejected,
               "frames": progress.frames, "seconds": seconds, "frames_per_s": progress.frames_per_s(),
               "pipeline_seconds": progress.seconds() if todo else 0.0,
               "num_samples": index["num_samples"], "num_rejected": rejected, "num_shards": len(plan),
               "nodes": nodes, "storage_retries": retry_count() - retries_before}
    log(f"done: {index['num_samples']} samples ({index['num_frames']} frames) in {len(plan)} shards, "
        f"{rejected} inputs rejected (see {cfg.output.root}/errors/); this run encoded "
        f"{summary['encoded_videos']} videos, {progress.frames} frames at {summary['frames_per_s']:.1f} frames/s "
        f"(after encoder start-up; whole job {seconds:.1f} s), rejected {progress.rejected}; "
        f"storage retries {summary['storage_retries']}")
    return summary
