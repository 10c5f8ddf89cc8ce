"""Training throughput bookkeeping: FLOPs per token and the peak FLOP/s of known devices (MFU).
"""
from __future__ import annotations

# peak dense bf16 FLOP/s per device, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "910B": 313e12}


def model_flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    """6N for the matmuls plus attention (QK^T and AV, forward+backward), per token."""
    return 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * seq_len
