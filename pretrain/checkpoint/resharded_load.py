"""A sharded checkpoint loaded into a live engine of another layout, every rank reading its own part at once.

What: `load_resharded(engine, model, saved, tp_rank, tp_size)` walks the
model's parameters; for each, it asks the engine which fragment of the fp32
master and Adam moments this rank holds now (optimizer_fragments.fragment, the
same API the same-layout load writes through, or the ZeRO-3 partition) and
reads exactly those elements from the saved fragments (fragment_reader.py:
byte ranges of the rank files, for the target TP rank). The module copy of a
parameter that this rank holds whole (ZeRO-0/1/2) is read whole; under ZeRO-3
only its partition. Then the buffers, Adam's step, hyper-parameters, LR
scheduler and counters (engine.json).

Why: a resume on another DP size, ZeRO stage or TP size used to put the whole
training state together on rank 0 (three full fp32 copies of the model), write
it out in the portable form and have every rank read that back. Here no
process holds more than its own new shard plus one parameter, nothing is
written, and all ranks read at once, at about the speed of a same-layout
load. A SIGKILL at any point leaves the checkpoint as it was: it is only read.
Collective only where DeepSpeed's setters are (ZeRO-3's local API).
"""
from __future__ import annotations

import math

import torch

from parallel.tensor_parallel import tensor_parallel_modules
from pretrain.checkpoint.fragment_reader import SavedFragments
from pretrain.checkpoint.full_state import MOMENTS, ConsolidateError
from pretrain.checkpoint.optimizer_fragments import (
    fragment,
    prepare_optimizer_state,
    restore_engine_info,
    set_zero3_local,
    zero3_partition,
)


def load_resharded(engine, model: torch.nn.Module, saved: SavedFragments, tp_rank: int = 0,
                   tp_size: int = 1) -> dict:
    """Weights, Adam moments and step, LR scheduler and counters of the sharded checkpoint `saved` into
    `engine` (which wraps `model`, the plain model after `apply_tensor_parallel`), whatever layout wrote
    it. Every rank calls it. Returns engine.json."""
    meta = saved.engine
    opt = engine.optimizer
    base = prepare_optimizer_state(opt, step=meta["optimizer"]["step"])
    styles = {f"{n}.{pn}": m.tp_style for n, m in tensor_parallel_modules(model).items()
              for pn, _ in m.named_parameters(recurse=False)}
    zero3, known = [], set(saved.names())
    with torch.no_grad():
        for name, p in model.named_parameters():
            want = tuple(getattr(p, "ds_shape", p.shape))
            style = styles.get(name) if tp_size > 1 else None
            if name not in known:
                raise ConsolidateError(f"{saved.url}: no fragments of {name!r}; the model has it")
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the module, masters and moments
                zero3.append((p, _zero3_state(saved, name, p, want, tp_rank, tp_size, style)))
                continue
            # this rank holds the module parameter whole: read straight into it when it is fp32
            if tp_size == saved.tp and p.dtype == torch.float32 and p.data.is_contiguous():
                _fits(saved, name, saved.shapes.get((tp_rank, name), ()), want, tp_rank, tp_size)
                weights = saved.span(name, "fp32", 0, p.numel(), tp_rank, tp_size, out=p.data)
            else:
                weights = saved.parameter(name, "fp32", tp_rank, tp_size, style)
                _fits(saved, name, weights.shape, want, tp_rank, tp_size)
                p.data.copy_(weights.view_as(p.data))
            frag = fragment(opt, base, p)
            if frag is None:
                continue
            hp, moments, start, numel = frag
            hp.data.copy_(weights.reshape(-1)[start:start + numel].view_as(hp))
            del weights
            for k, dst in moments.items():
                if dst.is_contiguous() and dst.dtype == torch.float32:  # read straight into the optimizer state
                    saved.span(name, k, start, start + numel, tp_rank, tp_size, style, out=dst.data)
                else:
                    dst.data.copy_(saved.span(name, k, start, start + numel, tp_rank, tp_size, style).view_as(dst))
        for p, (fp32, moments) in zero3:  # once every module partition is in place (as load_sharded)
            set_zero3_local(p, fp32, moments)
        for name, buf in model.named_buffers():
            got = saved.buffer(name, tp_rank)
            if got is None:
                continue
            if tuple(got.shape) != tuple(buf.shape):  # copy_ would broadcast a smaller one without a word
                raise ConsolidateError(f"{saved.url}: buffer {name!r} has shape {tuple(got.shape)}, the model "
                                       f"expects {tuple(buf.shape)}")
            buf.copy_(got)
    restore_engine_info(engine, base, meta["optimizer"])
    return meta


def _zero3_state(saved: SavedFragments, name: str, p, want: tuple, tp_rank: int, tp_size: int, style):
    """(fp32 partition, {moment: partition}) this rank holds of ZeRO-3 parameter `p`, its module partition
    written into `p.ds_tensor`; the last ranks' partitions are padded with zeros past the end."""
    start, part = zero3_partition(p)
    total = math.prod(want)
    if tp_size == saved.tp:  # else the re-split parameter is checked by its span's length
        _fits(saved, name, saved.shapes.get((tp_rank, name), ()), want, tp_rank, tp_size)
    lo, hi = min(start, total), min(start + part, total)
    out = {}
    for kind in ("fp32", *MOMENTS):
        out[kind] = torch.zeros(part, dtype=torch.float32)
        saved.span(name, kind, lo, hi, tp_rank, tp_size, style, out=out[kind][:hi - lo])
    p.ds_tensor.copy_(out["fp32"].view_as(p.ds_tensor))
    fp32 = out.pop("fp32")
    return fp32, out


def _fits(saved: SavedFragments, name: str, got, want: tuple, tp_rank: int, tp_size: int) -> None:
    if tuple(got) != tuple(want):
        raise ConsolidateError(f"{saved.url}: {name!r} has shape {tuple(got)} for TP rank {tp_rank}/{tp_size}, "
                               f"the model expects {tuple(want)}")
