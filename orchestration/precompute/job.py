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
replaces nothing and duplicates nothing. A node that cannot set up the job
(Ray's RuntimeEnvSetupError, which Ray does not retry) gets no more work: what
it refused goes to other nodes, never to errors/ as a bad video; an encoder
that cannot start is left out. Each shard is committed as soon as its last
segment is done, in a background thread: rejected inputs go to errors/ first,
then the tar, then the manifest (the commit). A job killed at any point
is finished by submitting it again; nothing is redone or duplicated, and
the index is published only when every shard of the plan is committed. Ray Jobs
do not retry a failed job, so this idempotence is what makes a days-long job
survivable.

Growth: a job over more inputs than the root's earlier jobs adds a generation
(data/precompute_plan.py; planning and publishing around the pipeline are in
generation.py): shards for the new inputs only, after the existing ones, then
a new index version (`write_index`: the versioned columns file, then
index.json replaced whole, so a reader sees the old version or the new one).
A job killed while publishing leaves the old version readable; its
resubmission publishes the same version an uninterrupted job would. A rerun
with nothing new publishes nothing. `--plan-only` (`run(plan_only=True)`)
stops after planning: no Ray, nothing written.

Fault injection for tests: orchestration/faults.py (the committer's `after_commit`, the driver's pause,
the publishing filesystem).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from data.object_store import retry_count, retrying
from data.precompute_plan import ShardPlan, record_generation
from data.shard_format import build_tar, commit_shard, write_error
from data.vae import vae_info
from jobconfig.precompute import PrecomputeConfig
from orchestration.faults import exit_after_commits, pause_when_nodes_decoded
from orchestration.local_ray import start_local_ray
from orchestration.precompute.generation import log, peak_rss_mb, plan_job, publish, rss_mb
from orchestration.precompute.placement import NodeSlots
from orchestration.precompute.progress import Progress
from orchestration.precompute.workers import decode_threads, make_encoders, remote_decode


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
        self.first_frames: dict[tuple[str, int], int] = {}  # (key, seg) -> its first frame in the input

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def source_done(self, key: str) -> bool:
        return key not in self.rejected and sum(1 for k, _ in self.samples if k == key) == self.segments.get(key, -1)

    def ordered(self) -> list[tuple[str, dict[str, bytes], list[int]]]:
        """(sample key, members, shape) in plan order, segments in order; rejected inputs left out."""
        return [self.samples[(k, i)] for k, _ in self.plan.items if k not in self.rejected
                for i in range(self.segments.get(k, 0))]

    def ordered_first_frames(self) -> list[int]:
        """Each sample's first frame in its input, aligned with `ordered` (the loader groups by it)."""
        return [self.first_frames[(k, i)] for k, _ in self.plan.items if k not in self.rejected
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
                                      sum(s[0] for _, _, s in samples), [s for _, _, s in samples],
                                      work.ordered_first_frames()),
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
    import ray

    if not ray.is_initialized():
        if local:  # a one-box run: Ray on loopback only (by default it binds the routable interface)
            start_local_ray()
        else:
            ray.init(address=cfg.ray.address or None)
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
    made = make_encoders(cfg.ray, cfg.vae, cfg.output.latent_dtype, cfg.latents)
    try:
        encoders, idents = _started_encoders(ray, made, cfg, vae)
        slots = NodeSlots(ray, cfg.ray)
        log(f"{len(encoders)} encoder actor(s) ready ({cfg.ray.encode_cpus} CPU, {cfg.ray.encode_gpus} GPU each) "
            f"on {len({i['node'] for i in idents})} node(s), vae {vae['name']} {vae['sha256']}, batch "
            f"{cfg.vae.batch_size}, dtype {cfg.vae.dtype}, latents {cfg.latents}; decoding on {len(slots.alive)} node(s), "
            f"<= {cfg.ray.decode_in_flight} segments in flight each")
        committer = _Committer(fs, root, cfg.ray.commit_threads, after_commit=exit_after_commits())
        progress.restart()
        _drive(cfg, ray, decode, encoders, [i["node"] for i in idents], todo, committer, progress, slots)
        log(f"work by node: {slots.line()}")
        return slots.report()
    finally:
        for e in made:  # a long-lived (e.g. local, reused) Ray must not keep idle VAEs around
            ray.kill(e)


def _started_encoders(ray, encoders: list, cfg: PrecomputeConfig, vae: dict) -> tuple[list, list[dict]]:
    """The encoders that started, and their identities. One that cannot start (its node cannot set up
    the job's runtime env, or its VAE fails to load there) is dead for good: Ray restarts an actor whose
    process died, not one whose creation failed. The job goes on with the others, as it
    does when an encoder's node dies later; it fails only when none started. A VAE that differs from
    the driver's fails the job: its latents would not be the dataset's."""
    from ray.exceptions import RayError

    started, idents = [], []
    for i, (encoder, ref) in enumerate(zip(encoders, [e.identity.remote() for e in encoders])):
        try:
            ident = ray.get(ref)
        except RayError as e:
            log(f"WARNING: encoder {i} did not start ({type(e).__name__}: {_first_line(e)}); "
                f"going on with the others")
            continue
        if ident["sha256"] != vae["sha256"]:
            raise RuntimeError(f"precompute.vae.path={cfg.vae.path!r}: an encoder loaded VAE {ident} but "
                               f"the driver sees {vae}: every node must hold the same VAE files")
        started.append(encoder)
        idents.append(ident)
    if not started:
        raise RuntimeError(f"none of the {len(encoders)} encoder actor(s) started (precompute.ray.encode_actors): "
                           "see the warnings above for why")
    return started, idents


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _drive(cfg: PrecomputeConfig, ray, decode, encoders: list, encoder_nodes: list[str], todo: list[ShardPlan],
           committer: "_Committer", progress: Progress, slots: NodeSlots) -> None:
    """The scheduling loop: decode segments on the least-loaded node (bounded per node) -> least-loaded
    encoder (same node first) -> per-shard collection -> commit. A long video's first segment tells how
    many follow; they are queued first, so a shard's inputs finish together."""
    from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError, RuntimeEnvSetupError

    threads = decode_threads(cfg.ray)
    queue = deque((s.stem, k, u, 0, None) for s in todo for k, u in s.items)
    work = {s.stem: _ShardWork(s) for s in todo}
    decoding: dict = {}  # status ref -> (stem, key, uri, frames ref, table ref, node, what the decode was given)
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
            w.first_frames[(key, segment)] = int(sample["first_frame"])
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
            decoding[status_ref] = (stem, key, uri, frames_ref, out_table, node, (segment, table_ref))
        if not decoding and not encoding:
            if not queue:
                break
            slots.refresh(force=True)  # every decode node is gone: wait for one (an autoscaler, a restart)
            if not slots.alive and slots.refused:
                raise RuntimeError(f"every decode node refused this job: {slots.line()}")
            log(f"WARNING: no live node can take decode work ({cfg.ray.decode_cpus} CPU + "
                f"{cfg.ray.decode_resources or 'no custom resources'}); waiting")
            time.sleep(cfg.progress_every_s)
            continue
        ready, _ = ray.wait(list(decoding) + list(encoding), num_returns=1, timeout=cfg.progress_every_s)
        for ref in ready:
            if ref in decoding:
                stem, key, uri, frames_ref, table_ref, node, given = decoding.pop(ref)
                try:
                    status = ray.get(ref)
                except RuntimeEnvSetupError as e:
                    # The node cannot set up this job (Ray does not retry that): its fault, not the video's.
                    # It gets no more work, and the segment goes back to the queue for another node.
                    why = f"{type(e).__name__}: {_first_line(e)}"
                    if slots.refuse(node, why):
                        log(f"WARNING: node {node[:8]}[{slots.labels.get(node, '')}] cannot run this job and gets "
                            f"no more work; its segments go to other nodes: {why}")
                    slots.release(node)
                    queue.appendleft((stem, key, uri, *given))
                    continue
                except RayError as e:  # retries exhausted: e.g. a file that crashes the decoder
                    status = {"ok": False, "segment": -1,
                              "reason": f"decode failed after {cfg.ray.max_retries} retries: "
                                        f"{type(e).__name__}: {_first_line(e)}"}
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
                    settle(stem, key, node, reason=f"encode failed: {_first_line(e)}")
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


def run(cfg: PrecomputeConfig, plan_only: bool = False) -> dict:
    """Run (or finish) the job described by `cfg`; returns a summary (also printed). `plan_only`: list,
    plan and compare with the committed shards, print the plan's size, time and peak memory; no Ray,
    nothing decoded or written."""
    t0, retries_before, rss0 = time.monotonic(), retry_count(), rss_mb()
    fs, root, plan, todo, committed = plan_job(cfg)
    if plan_only:
        summary = {"num_listed": plan.num_listed, "num_inputs": plan.num_inputs, "num_shards": plan.num_shards,
                   "generations": len(plan.generations), "new_inputs": sum(len(s.items) for s in plan.new),
                   "new_shards": len(plan.new), "committed": len(committed), "todo": len(todo),
                   "gone": plan.num_gone, "seconds": time.monotonic() - t0, "peak_rss_mb": peak_rss_mb(),
                   "start_rss_mb": rss0}
        log(f"plan only: {summary['num_listed']} inputs listed, {summary['new_inputs']} new in "
            f"{summary['new_shards']} new shards; {summary['num_shards']} shards planned in "
            f"{summary['generations']} generation(s), {summary['committed']} committed, {summary['todo']} to do; "
            f"planned in {summary['seconds']:.2f} s, driver peak memory {summary['peak_rss_mb']:.0f} MB "
            f"({summary['start_rss_mb']:.0f} MB before listing)")
        return summary
    vae = vae_info(cfg.vae.path)
    record_generation(fs, root, plan)  # pinned before any shard of the new generation is written
    total_videos = plan.num_inputs
    progress = Progress(total_videos, total_videos - sum(len(s.items) for s in todo), plan.num_shards,
                        plan.num_shards - len(todo), cfg.progress_every_s)
    nodes = {}
    if todo:
        nodes = _run_pipeline(cfg, fs, root, todo, vae, progress)
    else:
        log(f"nothing to do: all {plan.num_shards} shards are already committed; no video decoded or encoded")
    index, rejected = publish(cfg, fs, root, plan, vae)
    seconds = time.monotonic() - t0
    summary = {"encoded_videos": progress.videos - progress.rejected, "rejected_this_run": progress.rejected,
               "frames": progress.frames, "seconds": seconds, "frames_per_s": progress.frames_per_s(),
               "pipeline_seconds": progress.seconds() if todo else 0.0,
               "num_samples": index["num_samples"], "num_rejected": rejected, "num_shards": plan.num_shards,
               "index_version": index.get("version", 1), "generations": len(plan.generations),
               "nodes": nodes, "storage_retries": retry_count() - retries_before}
    log(f"done: {index['num_samples']} samples ({index['num_frames']} frames) in {plan.num_shards} shards, "
        f"{rejected} inputs rejected (see {cfg.output.root}/errors/); this run encoded "
        f"{summary['encoded_videos']} videos, {progress.frames} frames at {summary['frames_per_s']:.1f} frames/s "
        f"(after encoder start-up; whole job {seconds:.1f} s), rejected {progress.rejected}; "
        f"storage retries {summary['storage_retries']}")
    return summary
