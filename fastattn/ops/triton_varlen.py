"""``torch.ops.fastattn.triton_varlen_fwd``: the Triton kernel on per-sequence layouts
(packed variable-length batches, paged or indexed KV caches) as a custom op, so that
``torch.compile`` treats the launch as one opaque node (as ``triton_fwd`` does for dense
calls). Lengths live in tensors: a new batch's lengths cause no recompilation. The
``max_seqlen_*`` ints only size the launch; None means "bounded by the storage".
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import empty_outputs


@torch.library.custom_op("fastattn::triton_varlen_fwd", mutates_args=())
def triton_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                      sinks: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], seqused_q: Optional[torch.Tensor],
                      seqused_k: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
                      cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor], num_seqs: int,
                      max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], scale: float, window_left: int,
                      window_right: int, lower_right: bool, softcap: float,
                      num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.triton.flash_fwd import Sequences, flash_attn_forward

    seqs = Sequences(num_seqs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                     cache_leftpad, cache_batch_idx, block_table, lower_right)
    return flash_attn_forward(q, k, v, scale=scale, causal_bounds=(window_left, window_right), softcap=softcap,
                              alibi_slopes=alibi_slopes, sinks=sinks, num_splits=num_splits or None, seqs=seqs)


@triton_varlen_fwd.register_fake
def _triton_varlen_fwd_fake(q, k, v, *args):
    return empty_outputs(q, v.shape[-1])
