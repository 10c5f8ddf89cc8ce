"""The GPU path in one script, under 8 minutes on one H200: prints a table, writes JSON.

  (a) clip attention forward + backward on a stage-4 layout (80 frames at 320x176, 220
      patches per frame, one random clip partition: about 35k tokens) with the real head
      sizes (32 heads x 96), bf16: compiled FlexAttention, block-wise, dense-mask SDPA.
      Useful TFLOP/s: only the (query, key) pairs the attention rule allows count
      (pretrain/training/metrics.py), 4 x head_dim x heads FLOPs per pair forward and twice
      that backward, so a kernel that also computes masked pairs earns nothing for them.
  (b) Video-GPT with the phi3-mini backbone (3.8B), bf16 weights, activation checkpointing,
      per-block torch.compile (train.compile), FlexAttention, fused AdamW, one GPU, at a
      stage-2 (48 frames) and a stage-4 (80 frames) length: step time, tokens/s, MFU
      (pretrain.training.metrics: train_flops over PEAK_FLOPS), peak memory, graphs compiled.
      A plain PyTorch loop, no DeepSpeed: one GPU needs none. Weights and AdamW state are bf16
      (the optimiser step is cheaper than a bf16 engine's float32 master step; the
      forward/backward, which dominate, are the same).
  (c) an SDXL-architecture VAE (random weights, the cost is the architecture's) encoding
      320x176 frames, bf16: frames/s.
  (d) the memory plan on this device: planned (fake-tensor trace, pretrain/training/memory_trace.py)
      over measured (torch.cuda.max_memory_allocated) peak of the 3.8B model's forward + backward at
      the stage-2 and stage-4 lengths of (b), and the stall of an async checkpoint's pinned
      device-to-host copy of its weights over the step time; as ratios.

Every section keeps one clip layout for all its steps (a fixed length), so what is timed is
kernels, not recompiles; each is timed after warm-up with the device synchronised (a bench
may sync, the trainer may not), and the JSON is rewritten after each section, so a run cut
short keeps what it measured. A section that fails records its error and the next runs.

--tiny runs the same four sections end to end on CPU in well under a minute (debug model,
a few frames, the tiny VAE; FlexAttention forward only: it has no CPU backward; no MFU:
no CPU peak): tests/test_bench_gpu.py runs it.

    python bench/gpu.py [--out runs/bench_gpu.json] [--tiny]
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import random_clips  # noqa: E402
from bench.train_step import random_vae, timed  # noqa: E402
from data.batch import Batch, patches_per_frame, sequence_length  # noqa: E402
from jobconfig.loader import load_config  # noqa: E402
from pretrain.model.attention import ClipMeta, blockwise_attention, dense_attention, flex_attention  # noqa: E402
from pretrain.model.sequence import build_sequence  # noqa: E402
from pretrain.model.videogpt import build_model  # noqa: E402
from pretrain.training.metrics import allowed_attention_pairs, peak_flops, train_flops  # noqa: E402
from pretrain.training.objective import next_clip_loss, row_seed  # noqa: E402
from pretrain.training.optimizer import adamw_kwargs  # noqa: E402
from pretrain.training.parallelize import apply_activation_checkpointing, apply_compile  # noqa: E402

# full run: the real sizes; --tiny: the same code on CPU-sized inputs
FULL = dict(latent_hw=(22, 40), frames={"stage2": 48, "stage4": 80}, heads=32, head_dim=96, preset="phi3-mini",
            attention="flex", warmup=3, steps=5, attn_warmup=2, attn_steps=5,
            vae="sdxl", vae_hw=(176, 320), vae_batch=32, vae_steps=5)
TINY = dict(latent_hw=(4, 8), frames={"stage2": 6, "stage4": 10}, heads=2, head_dim=16, preset="debug",
            attention="blockwise", warmup=1, steps=2, attn_warmup=1, attn_steps=2,
            vae="tiny", vae_hw=(32, 64), vae_batch=4, vae_steps=2)
LAYOUT_SEED = 0  # the same stage-4 partition in (a) and (b): flex compiled for it once serves both


def sync(device: torch.device) -> None:
    """Drain the device's queued kernels, so that a wall-clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    """Peak allocated device memory since `reset_peak`; on CPU the process's peak RSS (ru_maxrss, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def graphs_compiled() -> int:
    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------- (a) attention
def bench_attention(p: dict, device: torch.device, tiny: bool) -> dict:
    clips = random_clips(p["frames"]["stage4"], LAYOUT_SEED)
    P = patches_per_frame(p["latent_hw"], 2)
    seq = build_sequence(clips, P, max_tokens=10**7, device=device)
    meta = ClipMeta.of(seq)
    H, D, L = p["heads"], p["head_dim"], seq.seq_len
    pairs = allowed_attention_pairs(clips[0], P)
    if tiny:  # the closed form against the rule itself, where the L x L mask is cheap
        assert pairs == int(meta.dense_mask().sum()), "allowed_attention_pairs disagrees with the attention rule"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(1, H, L, D, device=device, dtype=dtype, generator=g)
    # FlexAttention has no CPU backward (it refuses inputs that require grad): forward only there
    flex_backward = device.type == "cuda"
    fq, fk, fv = (q, k, v) if flex_backward else (q.detach(), k.detach(), v.detach())
    fns = {"flex": lambda: flex_attention(fq, fk, fv, meta),
           "blockwise": lambda: blockwise_attention(q, k, v, meta),
           "dense": lambda: dense_attention(q, k, v, meta, max_tokens=10**9)}
    out = {"tokens": L, "clips": len(clips[0][0]), "heads": H, "head_dim": D, "dtype": str(dtype).split(".")[-1],
           "allowed_pairs": pairs, "density": pairs / L**2, "backends": {}}
    for name, fn in fns.items():
        backward = name != "flex" or flex_backward

        def step(fn=fn, backward=backward):
            o = fn()
            if backward:
                torch.autograd.backward(o, grad)
                q.grad = k.grad = v.grad = None
        graphs = graphs_compiled()
        reset_peak(device)
        try:
            seconds = timed(step, p["attn_steps"], p["attn_warmup"], functools.partial(sync, device))
        except Exception as e:  # e.g. the dense mask out of memory: keep the other backends' figures
            if tiny:
                raise
            traceback.print_exc()
            out["backends"][name] = {"error": f"{type(e).__name__}: {e}"}
            q.grad = k.grad = v.grad = None
            continue
        passes = 3 if backward else 1  # backward = 2 x forward
        out["backends"][name] = {"seconds": seconds, "passes": "fwd+bwd" if backward else "fwd",
                                 "useful_tflops": pairs * 4 * D * H * passes / seconds / 1e12,
                                 "peak_gb": peak_gb(device), "graphs_compiled": graphs_compiled() - graphs}
    return out


# ---------------------------------------------------------------- (b) training step
def bench_model(p: dict, device: torch.device, tiny: bool, compile: bool) -> dict:
    cfg = load_config(None, [f"--model.preset={p['preset']}", f"--model.attention={p['attention']}",
                             "--model.max_tokens=1000000"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg.model, device=device, dtype=dtype)
    apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    n_params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            **adamw_kwargs(device.type))
    peak = peak_flops(device)
    out = {"preset": p["preset"], "params": n_params, "dtype": str(dtype).split(".")[-1],
           "activation_checkpointing": True, "compile": compile, "attention": p["attention"],
           "peak_flops": peak, "stages": {}}
    g = torch.Generator().manual_seed(0)
    P = patches_per_frame(p["latent_hw"], cfg.model.patch_size)
    for stage, frames in p["frames"].items():
        clips = random_clips(frames, LAYOUT_SEED)
        latents = torch.randn(1, frames, cfg.model.latent_channels, *p["latent_hw"], generator=g).to(device)
        batch = Batch(latents, clips)
        tokens = sequence_length(clips[0], P)
        pairs = allowed_attention_pairs(clips[0], P)
        losses = []

        def step():
            loss = next_clip_loss(model, batch, cfg.objective, [row_seed(0, 0)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        graphs = graphs_compiled()
        reset_peak(device)
        t0 = time.perf_counter()
        step()  # the first step compiles: timed on its own
        sync(device)
        first = time.perf_counter() - t0
        seconds = timed(step, p["steps"], p["warmup"] - 1, functools.partial(sync, device))
        flops = train_flops(cfg.model, n_params, tokens, pairs)
        out["stages"][stage] = {
            "frames": frames, "clips": len(clips[0][0]), "tokens": tokens, "step_s": seconds,
            "first_step_s": first, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None, "peak_gb": peak_gb(device),
            "graphs_compiled": graphs_compiled() - graphs, "loss": float(losses[-1])}
    return out


# ---------------------------------------------------------------- (d) the memory plan
def bench_plan(p: dict, device: torch.device, tiny: bool) -> dict:
    """Planned (pretrain/training/memory_trace.py, fake tensors) vs measured peak of forward + backward
    above the resting weights, at the stage-2 and stage-4 lengths of (b), eager (the plan traces eager
    code), activation checkpointing, whole gradients (no ZeRO: one device); and the stall of an async
    checkpoint's device-to-host copy of the weights into pinned host buffers, over the step time.
    Measured: torch.cuda.max_memory_allocated on a GPU; on CPU (--tiny) a tracked allocator
    (bench/plan.py LiveBytes), as the CPU allocator keeps no statistics."""
    from bench.plan import LiveBytes
    from pretrain.training.memory_trace import trace_step

    cfg = load_config(None, [f"--model.preset={p['preset']}", f"--model.attention={p['attention']}",
                             "--model.max_tokens=1000000"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg.model, device=device, dtype=dtype)
    apply_activation_checkpointing(model)
    backend = "flex" if p["attention"] == "flex" else "blockwise"
    out = {"preset": p["preset"], "dtype": str(dtype).split(".")[-1], "stages": {}}
    g = torch.Generator().manual_seed(0)
    for stage, frames in p["frames"].items():
        clips = random_clips(frames, LAYOUT_SEED)
        planned = trace_step(cfg.model, clips, p["latent_hw"], dtype, checkpointing=True, keep_grads=True,
                             backend=backend)
        latents = torch.randn(1, frames, cfg.model.latent_channels, *p["latent_hw"], generator=g).to(device)
        batch = Batch(latents, clips)
        model.zero_grad(set_to_none=True)
        sync(device)
        tracker = LiveBytes().exclude([*model.parameters(), *model.buffers()]) if device.type != "cuda" else None
        if tracker is None:
            reset_peak(device)
            rest = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        if tracker is not None:
            with tracker:
                next_clip_loss(model, batch, cfg.objective, [row_seed(0, 0)]).backward()
            measured = tracker.peak
        else:
            next_clip_loss(model, batch, cfg.objective, [row_seed(0, 0)]).backward()
            sync(device)
            measured = torch.cuda.max_memory_allocated(device) - rest
        step_s = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        plan_bytes = planned.activations + planned.gradients
        out["stages"][stage] = {"frames": frames, "planned_gb": plan_bytes / 2**30, "measured_gb": measured / 2**30,
                                "planned_over_measured": plan_bytes / max(measured, 1), "fwd_bwd_s": step_s}
    # the async checkpoint's stall: the device-to-host copy of the weights into pinned buffers (what the
    # training loop waits for before the writer thread takes over)
    pin = device.type == "cuda"
    host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for n, t in model.state_dict().items()}
    sync(device)
    t0 = time.perf_counter()
    for n, t in model.state_dict().items():
        host[n].copy_(t, non_blocking=pin)
    sync(device)
    stall = time.perf_counter() - t0
    step = out["stages"][list(p["frames"])[-1]]["fwd_bwd_s"]
    out["checkpoint"] = {"bytes": sum(t.numel() * t.element_size() for t in host.values()), "stall_s": stall,
                         "stall_over_step": stall / step, "pinned": pin}
    return out


# ---------------------------------------------------------------- (c) VAE encode
def bench_vae(p: dict, device: torch.device, tiny: bool) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = random_vae(p["vae"]).to(device, dtype)
    H, W = p["vae_hw"]
    frames = torch.rand(p["vae_batch"], 3, H, W, device=device, dtype=dtype) * 2 - 1

    @torch.inference_mode()
    def encode():
        vae.encode(frames).latent_dist.mean

    reset_peak(device)
    seconds = timed(encode, p["vae_steps"], 1, functools.partial(sync, device))
    return {"architecture": p["vae"], "height": H, "width": W, "batch": p["vae_batch"],
            "dtype": str(dtype).split(".")[-1], "seconds_per_batch": seconds,
            "frames_per_s": p["vae_batch"] / seconds, "peak_gb": peak_gb(device)}


# ---------------------------------------------------------------- report
def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    print(f"\ndevice: {res['device']}")
    a = res.get("attention", {})
    if "backends" in a:
        print(f"\n(a) clip attention, stage-4 layout: {a['tokens']} tokens, {a['clips']} clips, "
              f"{a['heads']} heads x {a['head_dim']}, {a['dtype']}, {a['density']:.1%} of pairs allowed")
        print(f"{'backend':10s} {'pass':8s} {'ms':>9s} {'useful TFLOP/s':>15s} {'peak GB':>8s}")
        for name, r in a["backends"].items():
            if "error" in r:
                print(f"{name:10s} FAILED {r['error'][:100]}")
                continue
            print(f"{name:10s} {r['passes']:8s} {r['seconds'] * 1e3:9.2f} {r['useful_tflops']:15.2f} "
                  f"{r['peak_gb']:8.2f}")
    m = res.get("model", {})
    if "stages" in m:
        print(f"\n(b) {m['preset']} ({m['params'] / 1e6:,.1f}M parameters), {m['dtype']}, activation checkpointing, "
              f"compile={m['compile']}, attention {m['attention']}")
        print(f"{'stage':7s} {'tokens':>7s} {'step s':>8s} {'1st s':>7s} {'tokens/s':>9s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'peak GB':>8s} {'graphs':>6s}")
        for stage, r in m["stages"].items():
            print(f"{stage:7s} {r['tokens']:7d} {r['step_s']:8.3f} {r['first_step_s']:7.1f} "
                  f"{r['tokens_per_s']:9.0f} {r['tflops']:8.2f} {fmt(r['mfu'], '6.1%')} {r['peak_gb']:8.2f} "
                  f"{r['graphs_compiled']:6d}")
    v = res.get("vae", {})
    if "frames_per_s" in v:
        print(f"\n(c) VAE ({v['architecture']}) encode {v['width']}x{v['height']}, batch {v['batch']}, "
              f"{v['dtype']}: {v['frames_per_s']:.1f} frames/s")
    pl = res.get("plan", {})
    if "stages" in pl:
        print(f"\n(d) memory plan vs measured, {pl['preset']} {pl['dtype']}, forward + backward above the weights")
        for stage, r in pl["stages"].items():
            print(f"{stage:7s} planned {r['planned_gb']:8.3f} GB  measured {r['measured_gb']:8.3f} GB  "
                  f"ratio {r['planned_over_measured']:.3f}")
        c = pl["checkpoint"]
        print(f"async checkpoint stall: {c['stall_s'] * 1e3:.1f} ms for {c['bytes'] / 2**30:.2f} GB "
              f"({'pinned' if c['pinned'] else 'pageable'}), {c['stall_over_step']:.3f} x the step")
    for name in ("attention", "model", "vae", "plan"):
        if "error" in res.get(name, {}):
            print(f"\n{name}: FAILED {res[name]['error']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_gpu.json")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized end-to-end run (tests)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="(b) without train.compile")
    args = ap.parse_args(argv)
    p = TINY if args.tiny else FULL
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: the full run is for one GPU (use --tiny on CPU)")
    device = torch.device("cpu" if args.tiny else "cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "tiny": args.tiny, "torch": torch.__version__}
    sections = [("attention", lambda: bench_attention(p, device, args.tiny)),
                ("model", lambda: bench_model(p, device, args.tiny, args.compile)),
                ("vae", lambda: bench_vae(p, device, args.tiny)),
                ("plan", lambda: bench_plan(p, device, args.tiny))]
    failed = False
    for name, run in sections:
        t0 = time.perf_counter()
        try:
            res[name] = run()
        except Exception as e:  # keep the other sections' figures; the error goes in the JSON
            traceback.print_exc()
            res[name], failed = {"error": f"{type(e).__name__}: {e}"}, True
        res[name]["section_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(res, indent=2))
        print(f"[{name}] {res[name]['section_s']:.1f} s", flush=True)
    print_table(res)
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
