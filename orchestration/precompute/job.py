"""`vgpt precompute`: the latent-precompute farm, a Ray job (videos -> latent shards).

    ray job submit --working-dir . -- vgpt precompute --config configs/precompute/sdxl.yaml
    vgpt precompute --config configs/precompute/tiny.yaml --precompute.inputs.dir=/data/videos

The same code runs on a cluster (RAY_ADDRESS, set by `ray job submit`) and on
one box (a local Ray). The driver plans deterministically (data/precompute_plan.py),
skips shards whose manifest exists, and streams the rest through Ray: decode
tasks on CPUs overlap the encoder actors (GPU where there is one), at most
`ray.decode_in_flight` videos between decode and encode so the object store
stays small. Each shard is committed as soon as its last video is done, in a
background thread: rejected inputs go to errors/ first, then the tar, then the
manifest (the commit). A job killed at any point is finished by submitting it
again; nothing is redone or duplicated, and index.json is written only when
every shard of the plan is committed. Ray Jobs do not retry a failed job, so
this idempotence is what makes a days-long job survivable.

Fault injection for tests: orchestration/faults.py (the committer's `after_commit`).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from data.precompute_plan import PlanError, ShardPlan, build_plan, config_hash, list_inputs, pin_plan, plan_hash
from data.shard_format import build_tar, commit_shard, committed_manifests, get_fs, write_error, write_index
from data.vae import vae_info
from jobconfig.precompute import PrecomputeConfig
from orchestration.faults import exit_after_commits
from orchestration.precompute.progress import Progress
from orchestration.precompute.workers import make_encoders, remote_decode


def log(msg: str) -> None:
    print(f"[precompute] {msg}", flush=True)


class _ShardWork:
    """What is known so far about one shard being computed."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.samples: dict[str, dict[str, bytes]] = {}
        self.rejected: dict[str, str] = {}
        self.frames = 0
        self.shapes: dict[str, list[int]] = {}

    @property
    def complete(self) -> bool:
        return len(self.samples) + len(self.rejected) == len(self.plan.items)


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
                write_error(self.fs, self.root, key, uris[key], work.rejected[key])
        keys = [k for k, _ in work.plan.items if k in work.samples]
        tar = build_tar((k, work.samples[k]) for k in keys)
        commit_shard(self.fs, self.root, work.plan.stem, tar, keys, work.frames, [work.shapes[k] for k in keys])
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
                  progress: Progress) -> None:
    ray = _init_ray(cfg)

    decode = remote_decode(cfg.ray)
    encoders = make_encoders(cfg.ray, cfg.vae, cfg.output.latent_dtype)
    try:
        for ident in ray.get([e.identity.remote() for e in encoders]):
            if ident["sha256"] != vae["sha256"]:
                raise RuntimeError(f"precompute.vae.path={cfg.vae.path!r}: an encoder loaded VAE {ident} but "
                                   f"the driver sees {vae}: every node must hold the same VAE files")
        log(f"{len(encoders)} encoder actor(s) ready ({cfg.ray.encode_cpus} CPU, {cfg.ray.encode_gpus} GPU each), "
            f"vae {vae['name']} {vae['sha256']}, batch {cfg.vae.batch_size}, dtype {cfg.vae.dtype}")
        committer = _Committer(fs, root, cfg.ray.commit_threads, after_commit=exit_after_commits())
        progress.restart()
        _drive(cfg, ray, decode, encoders, todo, committer, progress)
    finally:
        for e in encoders:  # a long-lived (e.g. local, reused) Ray must not keep idle VAEs around
            ray.kill(e)


def _drive(cfg: PrecomputeConfig, ray, decode, encoders: list, todo: list[ShardPlan], committer: "_Committer",
           progress: Progress) -> None:
    """The scheduling loop: bounded decode -> least-loaded encoder -> per-shard collection -> commit."""
    from ray.exceptions import RayActorError, RayError, RayTaskError

    queue = deque((s, k, u) for s in todo for k, u in s.items)
    work = {s.stem: _ShardWork(s) for s in todo}
    decoding: dict = {}  # status ref -> (shard, key, uri, frames ref)
    encoding: dict = {}  # sample ref -> (shard, key, encoder index)
    load = [0] * len(encoders)

    def finish(stem: str, key: str, sample: dict | None = None, reason: str | None = None) -> None:
        w = work[stem]
        if sample is not None:
            w.samples[key] = sample["members"]
            w.frames += sample["frames"]
            w.shapes[key] = sample["shape"]
        else:
            w.rejected[key] = reason
            log(f"rejected {key}: {reason}")
        progress.video(frames=sample["frames"] if sample else 0, rejected=sample is None)
        if w.complete:
            committer.submit(work.pop(stem))

    while queue or decoding or encoding:
        while queue and len(decoding) + len(encoding) < cfg.ray.decode_in_flight:
            shard, key, uri = queue.popleft()
            status_ref, frames_ref = decode.remote(key, uri, cfg.video, cfg.inputs.storage_options)
            decoding[status_ref] = (shard.stem, key, uri, frames_ref)
        ready, _ = ray.wait(list(decoding) + list(encoding), num_returns=1, timeout=cfg.progress_every_s)
        for ref in ready:
            if ref in decoding:
                stem, key, uri, frames_ref = decoding.pop(ref)
                try:
                    status = ray.get(ref)
                except RayError as e:  # retries exhausted: e.g. a file that crashes the decoder
                    status = {"ok": False, "reason": f"decode failed after {cfg.ray.max_retries} retries: "
                                                     f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                if not status["ok"]:
                    finish(stem, key, reason=status["reason"])
                    continue
                i = min(range(len(encoders)), key=load.__getitem__)
                load[i] += 1
                encoding[encoders[i].encode.remote(status, uri, frames_ref)] = (stem, key, i)
            else:
                stem, key, i = encoding.pop(ref)
                load[i] -= 1
                try:
                    sample = ray.get(ref)
                except RayActorError:
                    raise  # restarts exhausted: fail the job; a resubmission resumes it
                except RayTaskError as e:
                    finish(stem, key, reason=f"encode failed: {str(e).splitlines()[0][:300]}")
                    continue
                finish(stem, key, sample=sample)
        for stem in committer.reap():
            progress.shard_committed(stem)
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
    t0 = time.monotonic()
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
        if m is not None and not set(m.keys) <= {k for k, _ in s.items}:
            raise PlanError(f"{root}/shards/{s.stem}.json: committed keys are not in this plan's shard")
    todo = [s for s in plan if s.stem not in committed]
    done_videos = sum(len(s.items) for s in plan if s.stem in committed)
    log(f"plan {phash}: {len(uris)} inputs -> {len(plan)} shards of <= {cfg.output.videos_per_shard} videos; "
        f"{len(plan) - len(todo)} already committed, {len(todo)} to do; output {cfg.output.root}")
    progress = Progress(len(uris), done_videos, len(plan), len(plan) - len(todo), cfg.progress_every_s)
    if todo:
        _run_pipeline(cfg, fs, root, todo, vae, progress)
    else:
        log(f"nothing to do: all {len(plan)} shards are already committed; no video decoded or encoded")
    manifests = committed_manifests(fs, root)
    missing = [s.stem for s in plan if s.stem not in manifests]
    if missing:
        raise RuntimeError(f"{root}: shards {missing[:5]} of the plan are not committed after the run")
    keys = {k for s in plan for k, _ in s.items}
    rejected = _count_rejected(fs, root, keys)
    index = write_index(fs, root, {s.stem: manifests[s.stem] for s in plan}, plan_hash=phash, config_hash=chash,
                        vae=vae, latent_channels=vae["latent_channels"], downsample=vae["downsample"],
                        latent_layout="TCHW", latent_dtype="bfloat16" if cfg.output.latent_dtype == "bf16"
                        else "float16", num_inputs=len(uris), num_rejected=rejected)
    seconds = time.monotonic() - t0
    summary = {"encoded_videos": progress.videos - progress.rejected, "rejected_this_run": progress.rejected,
               "frames": progress.frames, "seconds": seconds, "frames_per_s": progress.frames_per_s(),
               "pipeline_seconds": progress.seconds() if todo else 0.0,
               "num_samples": index["num_samples"], "num_rejected": rejected, "num_shards": len(plan)}
    log(f"done: {index['num_samples']} samples ({index['num_frames']} frames) in {len(plan)} shards, "
        f"{rejected} inputs rejected (see {cfg.output.root}/errors/); this run encoded "
        f"{summary['encoded_videos']} videos, {progress.frames} frames at {summary['frames_per_s']:.1f} frames/s "
        f"(after encoder start-up; whole job {seconds:.1f} s), rejected {progress.rejected}")
    return summary
