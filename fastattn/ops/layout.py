"""Output buffers shared by the kernels and their fake (meta) implementations."""
from __future__ import annotations

import torch


def empty_outputs(q: torch.Tensor, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (B, Hq, L, Ev) in q's memory layout (a transposed (B, L, Hq, Ev) buffer
    when q is a view of one, as models and flash-attn pass it, so the caller's
    transpose back is free) and ``lse`` (B, Hq, L) float32. Works on fake tensors."""
    B, Hq, L, _ = q.shape
    if q.stride(1) < q.stride(2):
        out = q.new_empty((B, L, Hq, head_dim_v)).transpose(1, 2)
    else:
        out = q.new_empty((B, Hq, L, head_dim_v))
    return out, q.new_empty((B, Hq, L), dtype=torch.float32)
