"""The held-out evaluator: the next-clip loss of a model at fixed noise levels on fixed held-out samples.

One evaluator for every held-out set (`HeldOutSet`): the held-out split of a latent dataset
(data/heldout_split.py: by key hash, never served to training), a separate latent root
(eval.root), or the synthetic moving squares of pretrain/evaluation/heldout.py (training on
synthetic data). A held-out sample is a video, as in training (data/videos.py): a long video
stored as several segments takes one place, keyed by its input's key, its window planned over the
whole video and cut from the segments it touches. Everything random about a held-out sample comes
from its key, eval.seed and the stage (data.stage): its frames and clip partition from a hash of
(key, seed, stage config), its noise from (seed, key hash), never from the training RNG streams, so the loss is
a function of the weights alone: the same on any world size, at any step of any run, and
comparable across runs of one stage. A dataset of the `posterior` latent form (data/shard_format.py)
is evaluated on the posterior mean, not on a draw: no draw at all keeps the loss a function of the
weights, the mean is what training's draws average to (the target's least noisy value, so the loss
measures the model and not the VAE's noise), and the held-out predictions (pretrain/inference/
heldout_predict.py) condition on and score against the same mean latents.

The loss at each t in eval.t_values (every clip of the sample noised to t; the clean context
noised as in training) is each sample's mean frame MSE; `heldout_loss_t{t}` is its mean over
the samples and `heldout_loss` the mean over t. Sample i is evaluated on data-parallel rank
i mod dp, alone in its forward (one row per t), so its loss never depends on which other
samples shared a batch; the per-sample losses are summed into a vector that holds each sample
once (every other rank adds exact zeros) by one all-reduce over the data-parallel group, and
added up in sample order on the host: the result is bitwise the same for 1 and 2 ranks. Every
rank of the group runs the same number of forwards (padding repeats its last sample with
weight 0), so ZeRO-3 gathers and TP/SP collectives stay matched.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.batch import Batch, posterior_mean
from data.dataset_index import DatasetMeta
from data.heldout_split import key_hash, heldout_samples
from data.shard_format import decode_sample, get_fs
from data.shards import load_shard
from data.stage import SamplePlan, plan_sample, sample_tokens
from data.videos import Videos, cut_window
from jobconfig.data import StageSamplingConfig
from jobconfig.errors import ConfigError
from jobconfig.eval import EvalConfig
from jobconfig.job import JobConfig
from jobconfig.train import ObjectiveConfig
from pretrain.evaluation.heldout import eval_batch, synthetic_eval_seed
from pretrain.training.objective import add_noise, row_seed

EVAL_VERSION = 1  # bumped whenever a held-out sample's frames, clips or noise would change


@dataclass
class HeldOutSample:
    key: str
    latents: torch.Tensor  # [F, C, h, w]: the planned frames
    clips: list[int]       # clip sizes, summing to F
    seed: int              # its noise seed


@dataclass
class HeldOutSet:
    """The held-out samples of one stage: `count` in all, `mine` this rank's (position, sample)."""
    count: int
    mine: list[tuple[int, HeldOutSample]]


def plan_rng(key: str, seed: int, stage: StageSamplingConfig) -> random.Random:
    """The RNG of a held-out sample's frames and clips: from its key, eval.seed and the stage config."""
    text = f"{EVAL_VERSION}/{seed}/{key}/{json.dumps(asdict(stage), sort_keys=True)}"
    return random.Random(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little"))


def noise_seed(key: str, seed: int) -> int:
    return row_seed(seed, key_hash(key), salt=EVAL_VERSION)


def plan_heldout(meta: DatasetMeta, job: JobConfig, root: str) -> tuple[Videos, list[tuple[int, str, SamplePlan]]]:
    """The dataset's videos and (video index, video key, plan) of every held-out video evaluated, from
    the index alone (nothing read): the lowest key hashes of eval.root, or of the split of `meta`, that
    fit data.stage. A video is one held-out sample whatever its number of segments, its window planned
    over the whole video as training plans it (data/videos.py); a video of one segment is planned
    from the same key as before videos were grouped."""
    ec, stage = job.eval, job.data.stage
    if not meta.has_shapes:
        raise ConfigError(f"eval: {root}/index.json records no per-sample shapes; rebuild the index with the "
                          "precompute job to evaluate on it")
    videos = Videos.of(meta)
    planned = []
    for i in heldout_samples(meta, None if ec.root else ec.heldout_fraction, ec.heldout_max, videos=True):
        v = int(np.searchsorted(videos.starts, i)) if videos.grouped else i
        key = videos.key(v, meta.key(i))
        T, _, h, w = videos.shape(v)
        plan = plan_sample(stage, T, plan_rng(key, ec.seed, stage))
        if plan is not None and sample_tokens(stage, plan.clips, (h, w)) <= stage.max_tokens:
            planned.append((v, key, plan))
    if not planned:
        raise ConfigError(f"eval: no held-out sample of {root} fits data.stage (frames={stage.frames}, "
                          f"max_tokens={stage.max_tokens}); raise eval.heldout_fraction or eval.heldout_max")
    return videos, planned


def latent_set(job: JobConfig, dp_rank: int, dp_size: int) -> HeldOutSet:
    """The held-out videos of eval.root, or of the split of data.root (a blend: of its first dataset),
    planned for data.stage; this rank reads only its own share, and of a long video only the segments
    its window touches. Videos the stage cannot use (too short, too many tokens) are left out."""
    ec = job.eval
    src = job.data.blend()[0]
    root, options = (ec.root, job.data.storage_options) if ec.root else (src.root, job.data.options_of(src))
    fs, path = get_fs(root, options)
    meta = DatasetMeta.load(fs, path, where=f"{root}/index.json")
    videos, planned = plan_heldout(meta, job, root)
    mine = [(pos, v, key, plan, videos.pieces(v, plan.frame_indices, plan.interval))
            for pos, (v, key, plan) in enumerate(planned) if pos % dp_size == dp_rank]
    needed = sorted({i for *_, pieces in mine for i, _, _ in pieces})
    shard_of = np.searchsorted(meta.offsets, needed, side="right") - 1
    loaded: dict[int, torch.Tensor] = {}
    for shard in sorted(set(shard_of.tolist())):
        base = int(meta.offsets[shard])
        want = {i - base for i, s in zip(needed, shard_of.tolist()) if s == shard}
        for idx, (_, members) in load_shard(fs, path, meta, shard, keep=want).items():
            latents, _ = decode_sample(members, where=f"{root} shard {shard}")
            loaded[base + idx] = latents
    out = []
    for pos, v, key, plan, pieces in mine:
        window = cut_window([loaded[i] for i, _, _ in pieces], pieces, plan.interval)
        out.append((pos, HeldOutSample(key, posterior_mean(window, meta.moments).float(), list(plan.clips),
                                       noise_seed(key, ec.seed))))
    return HeldOutSet(len(planned), out)


def synthetic_set(job: JobConfig, dp_rank: int, dp_size: int) -> HeldOutSet:
    """The synthetic held-out videos (pretrain/evaluation/heldout.py) as a held-out set: eval.heldout_max
    videos of a seed training never uses."""
    batch, seeds = eval_batch(job, {"num_videos": job.eval.heldout_max, "seed": synthetic_eval_seed(job.eval.seed)})
    n = batch.latents.shape[0]
    return HeldOutSet(n, [(i, HeldOutSample(f"synthetic-heldout-{i}", batch.latents[i], batch.clips[i][0], seeds[i]))
                          for i in range(n) if i % dp_size == dp_rank])


def heldout_set(job: JobConfig, dp_rank: int, dp_size: int) -> HeldOutSet:
    return (synthetic_set if job.train.data == "synthetic" else latent_set)(job, dp_rank, dp_size)


def metric_name(t: float) -> str:
    return f"heldout_loss_t{t:g}"


class HeldOutEvaluator:
    """`evaluate(model, forward)`: {heldout_loss, heldout_loss_t<t>...}, the same on every rank."""

    def __init__(self, samples: HeldOutSet, ec: EvalConfig, objective: ObjectiveConfig, device: torch.device,
                 dp_size: int = 1, group=None):
        self.set, self.t_values, self.objective = samples, list(ec.t_values), objective
        self.device, self.dp_size, self.group = device, dp_size, group
        if samples.count < dp_size:
            raise ConfigError(f"eval: {samples.count} held-out samples for {dp_size} data-parallel ranks; every rank "
                              "needs one (raise eval.heldout_max or eval.heldout_fraction)")

    @torch.no_grad()
    def evaluate(self, model, forward=None) -> dict[str, float]:
        """Every rank of the job calls (collective over the data-parallel group when dp > 1). The model
        is put in eval mode and back; torch's global RNG states are restored afterwards."""
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        dev_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        model.eval()
        try:
            losses = torch.zeros(self.set.count, len(self.t_values), dtype=torch.float64, device=self.device)
            rounds = -(-self.set.count // self.dp_size)
            mine = self.set.mine
            for r in range(rounds):
                pos, sample = mine[min(r, len(mine) - 1)]  # past its share: its last sample again, unused
                row = self._sample_losses(model, forward, sample)
                if r < len(mine):
                    losses[pos] = row
            if self.dp_size > 1:
                dist.all_reduce(losses, group=self.group)
            per_t = losses.sum(0).div(self.set.count).tolist()  # the one host read, after the reduce
        finally:
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                torch.cuda.set_rng_state(dev_rng, self.device)
            model.train(was_training)
        out = {metric_name(t): v for t, v in zip(self.t_values, per_t)}
        return {"heldout_loss": sum(per_t) / len(per_t), **out}

    def _sample_losses(self, model, forward, s: HeldOutSample) -> torch.Tensor:
        """[len(t_values)] float64: the sample's mean frame MSE at each t (one forward, a row per t)."""
        B = len(self.t_values)
        x1 = s.latents.to(self.device)[None].expand(B, *s.latents.shape).contiguous()
        batch = Batch(x1, [[list(s.clips)] for _ in range(B)])
        noised = add_noise(batch, self.objective, [s.seed] * B, fixed_t=self.t_values)
        seq = model.sequence(batch.clips, tuple(x1.shape[-2:]))
        pred = (forward or model)(noised.x_noisy, noised.x_clean, noised.t, seq)
        per_frame = (pred.float() - x1.float()).pow(2).flatten(2).mean(-1)  # [B, F], every frame real
        return per_frame.double().mean(1)


def make_evaluator(job: JobConfig, device: torch.device, dp_rank: int, dp_size: int, group=None) -> HeldOutEvaluator:
    """The evaluator of a training run's held-out set (eval.root, the split, or synthetic), this rank's share."""
    return HeldOutEvaluator(heldout_set(job, dp_rank, dp_size), job.eval, job.objective, device, dp_size, group)
