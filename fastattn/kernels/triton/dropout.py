"""Attention dropout's keep-mask, regenerated wherever it is needed.

The mask is never stored: element (b, h, i, j) of a (B, Hq, L, S) score matrix is
kept when Philox (``tl.rand``) at counter ``offset + ((b * Hq + h) * L + i) * S + j``
(64-bit) under ``seed`` draws at least ``dropout_p``. The draw depends on the
element's position alone, not on block sizes or launch order, so the forward, the
backward (with its different tiling) and the test-only materialization below agree
bit for bit. A caller advances ``offset`` by B * Hq * L * S per call to get a fresh
mask with the same seed, as torch's Philox generator state does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed, offset, off_bh, rows, cols, seqlen_q, seqlen_k, dropout_p):
    """Keep (True) or drop each element of a tile; ``rows`` and ``cols`` broadcast
    against each other as in the kernels ((M, 1) x (1, N) or (1, M) x (N, 1))."""
    counter = offset + (off_bh.to(tl.int64) * seqlen_q + rows.to(tl.int64)) * seqlen_k + cols.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _keep_mask_kernel(Keep, seed, offset, seqlen_q, seqlen_k, dropout_p,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, offset, off_bh, rows[:, None], cols[None, :], seqlen_q, seqlen_k, dropout_p)
    ok = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    ptrs = Keep + off_bh.to(tl.int64) * seqlen_q * seqlen_k + rows.to(tl.int64)[:, None] * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=ok)


def dropout_keep_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, *, dropout_p: float, seed: int,
                      offset: int = 0, device="cpu") -> torch.Tensor:
    """The keep-mask the kernels use, materialized as a (B, Hq, L, S) bool tensor: for
    tests, and for ``return_attn_probs`` style debugging. Not for the training path."""
    from .flash_fwd import device_guard  # here, not at the top: the forward will import this module

    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    if keep.numel():
        grid = (triton.cdiv(seqlen_q, 64), triton.cdiv(seqlen_k, 64), batch * heads)
        with device_guard(keep.device):
            _keep_mask_kernel[grid](keep, seed, offset, seqlen_q, seqlen_k, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return keep.view(torch.bool)
