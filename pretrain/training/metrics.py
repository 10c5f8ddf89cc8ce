"""Training throughput bookkeeping: the FLOPs of a step and the peak FLOP/s of known devices (MFU).

The attention term counts the (query, key) pairs the attention rule allows
(pretrain/model/attention.py `attention_rule`), not a dense L x L square: the
next-clip layout is mostly causal, so a dense count would overstate the work
by about 2x and flatter the MFU. The pairs are counted in closed form from a
row's clip sizes (python ints on the host), so logging them costs no device
sync and no mask.

FLOPs of one training step (forward + backward, backward = 2 x forward):
  dense matmuls  6 N per token (2 per parameter forward, 4 backward)
  attention      12 x layers x hidden per allowed pair: QK^T and AV are each a
                 hidden-long dot product per pair (2 x hidden FLOPs, multiply and
                 add), so 4 x hidden forward, 8 x hidden backward.
Both count useful work only: a kernel that also computes masked-out pairs
(padding, masked blocks) does not earn FLOPs for them.
"""
from __future__ import annotations

import torch

from jobconfig.plan import DEVICES, device_by_name

# peak dense bf16 FLOP/s per device name, for MFU: the one device table (jobconfig/plan.py), which the
# memory plan reads too
PEAK_FLOPS = {d.match: d.peak_flops for d in DEVICES.values() if d.match}

ATTENTION_FLOPS_PER_PAIR_PER_HIDDEN = 12


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one `device` (a torch.device), or None when it is not one we know."""
    if device.type != "cuda":
        return None
    spec = device_by_name(torch.cuda.get_device_name(device))
    return spec.peak_flops if spec else None


def allowed_attention_pairs(clips_row, patches: int) -> int:
    """(query, key) pairs the attention rule allows in one row (a list of samples, each a list of
    clip sizes; pretrain/model/sequence.py), padding excluded. Closed form per clip: O(clips).

    Every frame copy has L = P + 2 tokens. Samples never see each other. In a sample:
      noisy clip k (n frames, F clean frames before it): every token sees the F*L clean tokens
        before the clip; within the clip, markers see the n markers, time tokens the n markers
        and n times, patches all n*L noisy tokens. Sum: n*L*F*L + n*n*(1 + 2 + P*L).
      clean frame j (0-based in the sample; frames of clips 1..K-1): its L tokens see the j*L
        clean tokens of earlier frames; within the frame <img> sees 1, each patch P+1, </img> L.
        Sum over the F_K clean frames: L*L*F_K*(F_K-1)/2 + F_K*(1 + P*(P+1) + L).
    """
    P = int(patches)
    L = P + 2
    total = 0
    for sample in clips_row:
        before = 0  # clean frames before the current clip
        for size in sample:
            n = int(size)
            total += n * L * before * L + n * n * (3 + P * L)
            before += n
        clean = before - int(sample[-1]) if sample else 0  # the last clip has no clean copy
        total += L * L * clean * (clean - 1) // 2 + clean * (1 + P * (P + 1) + L)
    return total


def train_flops(cfg, n_params: int, tokens, attention_pairs):
    """FLOPs of training on `tokens` tokens whose attention allows `attention_pairs` pairs
    (forward + backward; see the module docstring). `cfg`: the ModelConfig. Numbers, or numpy arrays
    of per-row counts (the sweep planner)."""
    return 6.0 * n_params * tokens + ATTENTION_FLOPS_PER_PAIR_PER_HIDDEN * cfg.num_layers * cfg.hidden_size * \
        (attention_pairs * 1.0)
