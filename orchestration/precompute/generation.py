"""The precompute driver's bookkeeping around the pipeline: plan a job against its output root,
and publish the root's next index version once every planned shard is committed.

`plan_job` lists the inputs, plans the root's generations (data/precompute_plan.py: only inputs no
earlier generation planned are new) and compares with the committed shards: what is left to do is
the new generation's shards plus any an interrupted job left. It writes nothing, so it is also
`vgpt precompute --plan-only`. `publish` writes the index (data/dataset_index.py `write_index`:
the versioned columns file, then index.json replaced whole) unless the published index already
lists this plan: a rerun with nothing new publishes nothing, and a job killed while publishing
(orchestration/faults.py `kill_while_publishing`) is finished by its resubmission, which publishes
the version the uninterrupted job would have.
"""
from __future__ import annotations

import os

from data.dataset_index import read_index, write_index
from data.object_store import retrying
from data.precompute_plan import (
    GrowthPlan,
    PlanError,
    ShardPlan,
    config_hash,
    generation_shards,
    list_inputs,
    plan_growth,
    source_key,
)
from data.shard_format import ShardFormatError, committed_manifests, get_fs, shard_stem
from jobconfig.precompute import PrecomputeConfig
from orchestration.faults import kill_while_publishing


def log(msg: str) -> None:
    print(f"[precompute] {msg}", flush=True)


def _count_rejected(fs, root: str, manifests: dict) -> int:
    """Inputs with an error record and no sample in the dataset (a record left by a killed run whose
    input a later run encoded does not count)."""
    fs.invalidate_cache(f"{root}/errors")
    try:
        names = fs.glob(f"{root}/errors/*.json")
    except FileNotFoundError:
        return 0
    stored = {source_key(k) for m in manifests.values() for k in m.keys}
    return sum(1 for p in names if p.rsplit("/", 1)[-1][:-5] not in stored)


def _open_shards(fs, root: str, plan: GrowthPlan, committed: dict) -> list[ShardPlan]:
    """The planned shards not committed yet: the new generation's, and any an interrupted earlier job
    left (rebuilt from its generation file). Committed shards are checked against their plan."""
    stray = sorted(set(committed) - set(plan.stems))
    if stray:
        raise PlanError(f"{root}/shards/{stray[0]}.json: a committed shard that no generation of "
                        f"{root}/plan.json plans ({len(stray)} such); this root was written by another job: "
                        "write to a new precompute.output.root")
    recorded = plan.generations[:-1] if plan.record else plan.generations
    shards = []
    for g in recorded:
        if any(shard_stem(plan.shard_name, i) not in committed for i in g.shard_range):
            shards += generation_shards(fs, root, plan, g)
    shards += plan.new
    for s in shards:
        m = committed.get(s.stem)
        if m is not None and not {source_key(k) for k in m.keys} <= {k for k, _ in s.items}:
            raise PlanError(f"{root}/shards/{s.stem}.json: committed keys are not in this plan's shard")
    return [s for s in shards if s.stem not in committed]


def _published(fs, root: str) -> dict | None:
    """The index readers see now, or None when there is none yet."""
    try:
        return read_index(fs, root)
    except ShardFormatError:
        return None


def publish(cfg: PrecomputeConfig, fs, root: str, plan: GrowthPlan, vae: dict) -> tuple[dict, int]:
    """Publish every planned shard (all committed) as the next index version, unless the index already
    lists this plan; returns (index.json, inputs rejected)."""
    manifests = committed_manifests(fs, root)
    missing = [s for s in plan.stems if s not in manifests]
    if missing:
        raise RuntimeError(f"{root}: shards {missing[:5]} of the plan are not committed after the run")
    manifests = {s: manifests[s] for s in plan.stems}
    rejected = _count_rejected(fs, root, manifests)
    before = _published(fs, root)
    if before is not None and before.get("plan_hash") == plan.plan_hash and before.get("num_shards") == plan.num_shards:
        log(f"index version {before.get('version', 1)} already lists every shard of plan {plan.plan_hash}: "
            "not republished")
        return before, rejected
    index = retrying(lambda: write_index(
        kill_while_publishing(fs), root, manifests, plan_hash=plan.plan_hash, config_hash=config_hash(cfg),
        vae=vae, latent_channels=vae["latent_channels"], downsample=vae["downsample"], latent_layout="TCHW",
        latent_form=cfg.latents,  # posterior: the stored C is 2 x latent_channels (mean, std)
        latent_dtype="bfloat16" if cfg.output.latent_dtype == "bf16" else "float16",
        num_inputs=plan.num_inputs, num_rejected=rejected, generations=len(plan.generations)),
        f"{root}/index.json")
    log(f"published index version {index.get('version', 1)}: {index['num_samples']} samples in "
        f"{index['num_shards']} shards" + (f" (was {before['num_samples']} samples in {before['num_shards']} "
                                            f"shards, version {before.get('version', 1)})" if before else ""))
    return index, rejected


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """Resident memory now (Linux; 0 elsewhere): the driver's baseline before it lists anything."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def plan_job(cfg: PrecomputeConfig) -> tuple:
    """List, plan and compare with the committed shards: (fs, root, plan, todo, committed). Writes nothing."""
    fs, root = get_fs(cfg.output.root, cfg.output.storage_options)
    uris = list_inputs(cfg.inputs)
    if not uris:
        where = cfg.inputs.dir or cfg.inputs.glob or cfg.inputs.list_file
        raise PlanError(f"precompute.inputs: no input matched {where!r} "
                        f"with extensions {cfg.inputs.extensions}")
    plan = plan_growth(fs, root, uris, cfg)
    del uris  # the plan holds what it needs (the new inputs)
    committed = committed_manifests(fs, root)
    todo = _open_shards(fs, root, plan, committed)
    g = plan.generations[-1]
    if plan.new:
        what = (f"generation {g.generation}: {g.num_inputs} new inputs -> shards {plan.new[0].stem}.."
                f"{plan.new[-1].stem}")
    else:
        what = "no new inputs"
    log(f"plan {plan.plan_hash}: {plan.num_listed} inputs listed; {what}; {len(plan.generations)} generation(s), "
        f"{plan.num_inputs} inputs -> {plan.num_shards} shards of <= {cfg.output.videos_per_shard} videos; "
        f"{len(committed)} already committed, {len(todo)} to do; output {cfg.output.root}")
    if plan.num_gone:
        log(f"{plan.num_gone} input(s) planned by an earlier generation are no longer listed: their shards are "
            "kept (a dataset only grows; write to a new root to drop inputs)")
    return fs, root, plan, todo, committed
