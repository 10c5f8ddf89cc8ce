"""The portable checkpoint: a training state that no parallel layout owns, and
loading it into a DeepSpeed engine of any layout. It is what `vgpt ckpt reshard`
writes (reshard.py) and what an older .pt checkpoint is converted to when it
resumes on another world size (or TP size, or ZeRO stage); a checkpoint in our
sharded format resumes on another layout without it (resharded_load.py).

    step_N/weights.safetensors     fp32 master weights of the plain model; a valid
                                   export too (model config in the header)
    step_N/exp_avg.safetensors     Adam first moments, same names and full shapes
    step_N/exp_avg_sq.safetensors  Adam second moments
    step_N/optimizer.json          Adam step, param-group hyper-parameters, LR
                                   scheduler state, engine counters, source layout
    (+ trainer_state.json, rng.safetensors, manifest.json, as every checkpoint)

Why this design, of the three on offer:
- DeepSpeed refuses a native ZeRO checkpoint on another data-parallel size
  ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
  world size is not currently supported", engine._load_zero_checkpoint), even
  with `elastic_checkpoint` set: the check runs before the elastic code.
- The universal checkpoint (ds_to_universal + load_universal) covers ZeRO-1/2/3,
  but it merges and re-slices TP shards only for Megatron-LM's or AutoTP's
  registered patterns (its ZeRO-3 loader only for AutoTP), not for our
  megatron-core layers with fused qkv / gate_up columns; it does not cover
  ZeRO-0; it must be switched on in the DeepSpeed config before the engine
  exists; and it is pickles throughout (one file per parameter and tensor kind).
- Ours: full, TP-merged fp32 weights and Adam moments, by name, in safetensors
  (no pickle), read offline from any native layout (formats.py) and
  written into the live engine through DeepSpeed's own per-parameter
  fragment API (`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`,
  optimizer_fragments.py),
  which knows each stage's partitioning (ZeRO-1/2 flat partitions, ZeRO-3
  per-parameter partitions, the bf16 optimizer); TP slices come from the live
  model's own swapped layers (`tp_style`). The same tensors serve export.
  Cost of loading it: every rank reads every full tensor (reshard.py writes it
  one parameter at a time; the .pt conversion holds ~3x the fp32 model on rank 0).

Adam creates its state lazily at the first step, so before the fragment API can
write into it, `load_portable` creates zero state for every master partition
and re-links DeepSpeed's fragment views (ZeRO-1/2, bf16); all of it is
collective and every rank must call it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from parallel.tensor_parallel import shard_tensor, tensor_parallel_modules
from pretrain.checkpoint import schema
from pretrain.checkpoint.export import save_export, write_safetensors
from pretrain.checkpoint.full_state import MOMENTS, FullState, PortableError, jsonable
from pretrain.checkpoint.optimizer_fragments import prepare_optimizer_state, restore_engine_info, set_full_parameter

WEIGHTS = schema.WEIGHTS
OPTIMIZER = schema.OPTIMIZER
FORMAT = schema.PORTABLE_FORMAT


def is_portable(ckpt: Path) -> bool:
    return (Path(ckpt) / OPTIMIZER).is_file()


def read_optimizer(ckpt: Path) -> dict:
    """optimizer.json, refused unless it follows its schema (schema.optimizer_json)."""
    return schema.optimizer_json(schema.read_json(ckpt / OPTIMIZER), ckpt / OPTIMIZER, FORMAT)


def write_portable(full: FullState, ckpt: Path, model_cfg) -> None:
    """The tensors of `full` as a portable checkpoint directory (not its manifest: the caller's job)."""

    ckpt.mkdir(parents=True, exist_ok=True)
    save_export(full.weights, ckpt / WEIGHTS, model_cfg, extra={"format_note": FORMAT})
    for kind in MOMENTS:
        if kind not in full.moments:
            raise PortableError(f"{ckpt}: no {kind} to write (the source was read without optimizer state)")
        write_safetensors({k: v.contiguous() for k, v in full.moments[kind].items()}, ckpt / f"{kind}.safetensors")
    meta = {"format": FORMAT, "optimizer": jsonable(full.optimizer, "optimizer"), "source": full.source}
    (ckpt / OPTIMIZER).write_text(json.dumps(meta, indent=1))


def read_portable(ckpt: Path, with_optimizer: bool = True) -> FullState:
    """The FullState a portable checkpoint holds (without the moments unless `with_optimizer`)."""
    ckpt = Path(ckpt)
    meta = read_optimizer(ckpt)  # the tensors' headers: checked by structure.py when the checkpoint verified
    moments = {k: load_file(str(ckpt / f"{k}.safetensors")) for k in MOMENTS} if with_optimizer else {}
    return FullState(load_file(str(ckpt / WEIGHTS)), moments, meta["optimizer"], meta.get("source", {}))


# ---------------------------------------------------------------- into a live engine
def load_portable(engine, model: torch.nn.Module, ckpt: Path, tp_rank: int = 0, tp_size: int = 1) -> dict:
    """Weights, Adam moments and step, LR scheduler and counters of `ckpt` into `engine`.

    Collective over all ranks. `model` is the plain model the engine wraps,
    after `apply_tensor_parallel`: its swapped layers say how each tensor is
    split over `tp_size` ranks. Returns the optimizer.json contents.
    """

    ckpt = Path(ckpt)
    meta = read_optimizer(ckpt)
    info = meta["optimizer"]
    opt = engine.optimizer
    base = prepare_optimizer_state(opt, info["step"])
    styles = {f"{n}.{pn}": m.tp_style for n, m in tensor_parallel_modules(model).items()
              for pn, _ in m.named_parameters(recurse=False)}
    files = {"weights": ckpt / WEIGHTS, **{k: ckpt / f"{k}.safetensors" for k in MOMENTS}}
    with safe_open(str(files["weights"]), "pt") as fw, safe_open(str(files["exp_avg"]), "pt") as f1, \
            safe_open(str(files["exp_avg_sq"]), "pt") as f2, torch.no_grad():
        readers = {"weights": fw, "exp_avg": f1, "exp_avg_sq": f2}
        for name, p in model.named_parameters():
            tensors = {}
            for kind, f in readers.items():
                if name not in f.keys():
                    raise PortableError(f"{files[kind]}: no tensor {name!r} (the model has it)")
                t = f.get_tensor(name).float()
                if name in styles and tp_size > 1:
                    t = shard_tensor(t, styles[name], tp_rank, tp_size)
                want = getattr(p, "ds_shape", p.shape)
                if tuple(t.shape) != tuple(want):
                    raise PortableError(f"{files[kind]}: {name!r} has shape {tuple(t.shape)} for TP rank "
                                        f"{tp_rank}/{tp_size}, the model expects {tuple(want)}")
                tensors[kind] = t.to(p.device)
            set_full_parameter(opt, base, p, tensors.pop("weights"), tensors)
        for name, buf in model.named_buffers():
            if name in fw.keys():
                got = tuple(fw.get_slice(name).get_shape())
                if got != tuple(buf.shape):  # copy_ would broadcast a smaller one without a word
                    raise PortableError(f"{files['weights']}: buffer {name!r} has shape {got}, the model expects "
                                        f"{tuple(buf.shape)}")
                buf.copy_(fw.get_tensor(name).to(buf.dtype))
    restore_engine_info(engine, base, info)
    return meta
