"""The KV-cache step of ``flash_attn_with_kvcache`` and the merge of partial results.

Everything here is plain torch on already validated inputs (``fastattn.inputs``): the
rotary embedding of the query and the new keys, the in-place append of the new keys and
values at each sequence's ``cache_seqlens`` (through its pages when the cache is paged),
and the merge of several (out, lse) results over disjoint key sets into one. Written with
index tensors only, so nothing syncs with the device and ``torch.compile`` traces the
in-place writes as the mutations they are.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["apply_rotary", "append_to_cache", "merge_attention_states"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` channels of ``x`` (B, L, H, E) by the angles of
    ``positions`` (B, L): GPT-NeoX style (halves) when not ``interleaved``, GPT-J style
    (even/odd pairs) when interleaved, in float32, returned in x's dtype. Channels past the
    rotary dim pass through."""
    half = cos.shape[1]
    c = cos.float()[positions].unsqueeze(2)  # (B, L, 1, half)
    s = sin.float()[positions].unsqueeze(2)
    rot = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor] = None,
                    block_table: Optional[torch.Tensor] = None) -> None:
    """Write k/v (B, L_new, Hkv, E) into the caches in place, sequence b's token i at
    position ``cache_seqlens[b] + i``: row ``cache_batch_idx[b]`` (or b) of a dense cache
    (B_cache, S, Hkv, E), or through ``block_table`` into a paged cache (num_pages, page_size, Hkv, E)."""
    B, new_len = k.shape[:2]
    positions = cache_seqlens.long().unsqueeze(1) + torch.arange(new_len, device=k.device)  # (B, L_new)
    if block_table is not None:
        page_size = k_cache.shape[1]
        rows = block_table.long().gather(1, positions // page_size)
        slots = positions % page_size
    else:
        rows = (cache_batch_idx.long() if cache_batch_idx is not None
                else torch.arange(B, device=k.device)).unsqueeze(1).expand(B, new_len)
        slots = positions
    k_cache[rows, slots] = k.to(k_cache.dtype)
    v_cache[rows, slots] = v.to(v_cache.dtype)


def merge_attention_states(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key sets into the result over their union
    (split-KV decoding, context parallelism; flash-attn's combine, xformers' merge_attentions).

    ``outs[i]``: (..., L, H, D) in flash-attn's layout ((batch, seqlen, nheads, headdim), or
    (total, nheads, headdim) for varlen); ``lses[i]``: the matching (..., H, L) natural-log
    log-sum-exp as fastattn and flash-attn return it. A row that saw no key (lse +inf in
    fastattn's convention, or -inf) contributes nothing. Returns (out in outs[0]'s dtype,
    lse float32), +inf where no part saw a key."""
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_attention_states needs as many outs as lses, at least one; got {len(outs)} and "
                         f"{len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or l.shape != lses[0].shape:
            raise ValueError(f"part {i}: out {tuple(o.shape)} and lse {tuple(l.shape)} differ from part 0's "
                             f"{tuple(outs[0].shape)} and {tuple(lses[0].shape)}")
        if tuple(l.transpose(-1, -2).shape) != tuple(o.shape[:-1]):
            raise ValueError(f"part {i}: lse must be (..., nheads, seqlen) for out (..., seqlen, nheads, headdim); "
                             f"got lse {tuple(l.shape)} for out {tuple(o.shape)}")
    lse = torch.stack([l.float() for l in lses])
    lse = lse.masked_fill(torch.isposinf(lse), float("-inf"))  # "saw no key" in either convention
    top = lse.max(dim=0).values
    top_safe = top.masked_fill(torch.isneginf(top), 0.0)
    weights = torch.exp(lse - top_safe)  # (n, ..., H, L)
    total = weights.sum(dim=0)
    empty = total == 0
    weights = weights / total.masked_fill(empty, 1.0)
    out = sum(w.transpose(-1, -2).unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    merged_lse = (top_safe + torch.log(total.masked_fill(empty, 1.0))).masked_fill(empty, float("inf"))
    return out.to(outs[0].dtype), merged_lse
