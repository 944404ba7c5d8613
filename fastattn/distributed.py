"""Context parallelism: ring attention over a ``torch.distributed`` process group.

Each rank holds a slice of the sequence (flash-attn layout ``(batch, seqlen_local,
heads, head_dim)``). K/V slices travel round the ring by point-to-point sends
(``batch_isend_irecv``: NCCL on GPUs, gloo on CPUs; no transport of our own); each rank
runs fastattn's Triton forward kernel on the blocks its queries may see and merges the
partial results with their log-sum-exp. The backward runs the ring again: each rank
recomputes its blocks' gradients with the *final* output and lse, dQ stays home, and
the dK/dV accumulators (float32) travel with their K/V and are sent home at the end.

Sequence layouts (``layout=``), for a total length N split over W ranks:

- ``"zigzag"``: N in 2W chunks (``torch.tensor_split`` sizes); rank r holds chunks r and
  2W-1-r, concatenated. Under a causal mask every rank then does the same work.
- ``"contiguous"``: N in W chunks; rank r holds chunk r (causal: rank W-1 does W times
  the work of rank 0).

:func:`shard_sequence` cuts a full tensor into a rank's slice, :func:`unshard_sequence`
puts gathered slices back in order. Any N works (uneven slices included): the ranks'
lengths are gathered once per call, or given as ``total_seqlen`` (no gather).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._env import interpreting
from .kvcache import merge_attention_states

LAYOUTS = ("zigzag", "contiguous")


# --------------------------------------------------------------------------- layouts


def sequence_slices(total_seqlen: int, world_size: int, rank: int, layout: str = "zigzag") -> List[Tuple[int, int]]:
    """The ``(start, length)`` pieces of the global sequence that ``rank`` holds, in the
    order they are concatenated locally."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} (supported: {', '.join(map(repr, LAYOUTS))})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside a world of {world_size}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    base, extra = divmod(total_seqlen, parts)
    sizes = [base + (i < extra) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    chunks = [rank, parts - 1 - rank] if layout == "zigzag" else [rank]
    return [(starts[c], sizes[c]) for c in chunks]


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, layout: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """``rank``'s slice of the full sequence ``x`` (sequence along ``dim``), a new tensor."""
    pieces = sequence_slices(x.shape[dim], world_size, rank, layout)
    return torch.cat([x.narrow(dim, s, n) for s, n in pieces], dim=dim)


def unshard_sequence(slices: Sequence[torch.Tensor], *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's slice (``slices[r]`` from rank r)."""
    world = len(slices)
    total = sum(s.shape[dim] for s in slices)
    pieces = []
    for r, local in enumerate(slices):
        at = 0
        for start, n in sequence_slices(total, world, r, layout):
            pieces.append((start, local.narrow(dim, at, n)))
            at += n
    return torch.cat([p for _, p in sorted(pieces, key=lambda sp: sp[0])], dim=dim)


# --------------------------------------------------------------------------- blocks


class _Block(tuple):
    """One kernel call of a ring step, in local indices: queries ``q_lo:q_hi`` against
    keys ``k_lo:k_hi`` of the K/V slice in hand, with the kernel's causal arguments."""

    __slots__ = ()

    def __new__(cls, q_lo, q_hi, k_lo, k_hi, causal_bounds, diag_offset):
        return super().__new__(cls, (q_lo, q_hi, k_lo, k_hi, causal_bounds, diag_offset))


def _offsets(pieces):
    at, out = 0, []
    for start, n in pieces:
        out.append((at, start, n))
        at += n
    return out


def ring_blocks(q_pieces, k_pieces, causal: bool) -> List[_Block]:
    """The kernel calls that cover what the local queries see of one K/V slice.

    Under ``causal`` a query piece sees a key piece wholly (all keys at or before its
    first query), on its diagonal (kernel causal mask, diagonal shifted by the pieces'
    global offsets), or not at all (skipped). Adjacent wholly-visible pieces are
    coalesced into one call, across keys and then across queries."""
    per_q = []
    for q_at, qs, qn in _offsets(q_pieces):
        calls = []
        for k_at, ks, kn in _offsets(k_pieces):
            if qn == 0 or kn == 0:
                continue
            if not causal or ks + kn - 1 <= qs:
                if calls and calls[-1][2] == "full" and calls[-1][1] == k_at:
                    calls[-1] = (calls[-1][0], k_at + kn, "full", 0)
                else:
                    calls.append((k_at, k_at + kn, "full", 0))
            elif ks <= qs + qn - 1:
                calls.append((k_at, k_at + kn, "diag", qs - ks))
        per_q.append((q_at, q_at + qn, calls))
    merged: list = []
    for q_lo, q_hi, calls in per_q:
        only_full = all(kind == "full" for _, _, kind, _ in calls)
        if merged and only_full and merged[-1][2] == calls and merged[-1][1] == q_lo and merged[-1][3]:
            merged[-1] = (merged[-1][0], q_hi, calls, True)
        else:
            merged.append((q_lo, q_hi, calls, only_full))
    blocks = []
    for q_lo, q_hi, calls, _ in merged:
        for k_lo, k_hi, kind, diag in calls:
            bounds = (-1, 0) if kind == "diag" else (-1, -1)
            blocks.append(_Block(q_lo, q_hi, k_lo, k_hi, bounds, diag))
    return blocks


# --------------------------------------------------------------------------- the ring


class _Ring:
    """This rank's place in the group and the point-to-point exchange with its neighbours."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else (
            (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else (
            (self.rank - 1) % self.size)

    def exchange(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor]):
        """Send ``send`` to the next rank and receive ``recv`` from the previous one; returns
        the requests to wait on."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs or ():
        r.wait()


def _check_inputs(q, k, v, layout):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen_local, heads, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"ring attention runs float16 or bfloat16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"ring attention runs fastattn's Triton kernels: CUDA tensors, or CPU tensors under the "
                         f"Triton interpreter (TRITON_INTERPRET=1 before triton is imported); got {q.device}")
    B, L, Hq, E = q.shape
    if k.shape[:2] != (B, L) or v.shape[:3] != k.shape[:3] or k.shape[3] != E:
        raise ValueError(f"k, v must be (batch={B}, seqlen_local={L}, kv_heads, head_dim={E}) like q's slice "
                         f"(self-attention over one sequence layout); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of K/V heads ({k.shape[2]})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} (supported: {', '.join(map(repr, LAYOUTS))})")


def _layout_of_ring(ring: _Ring, local: torch.Tensor, total_seqlen: Optional[int], layout: str):
    """Every rank's pieces; checks this rank's slice against them. Without ``total_seqlen``
    the ranks' lengths are gathered (one small all_gather) to find it."""
    local_len = local.shape[1]
    if total_seqlen is None:
        mine = torch.tensor([local_len], dtype=torch.int64, device=local.device)
        gathered = [torch.empty_like(mine) for _ in range(ring.size)]
        dist.all_gather(gathered, mine, group=ring.group)
        held = [int(t.item()) for t in gathered]
        total = sum(held)
    else:
        held, total = None, total_seqlen
    pieces = [sequence_slices(total, ring.size, r, layout) for r in range(ring.size)]
    lengths = [sum(n for _, n in p) for p in pieces]
    if lengths[ring.rank] != local_len or (held is not None and held != lengths):
        raise ValueError(
            f"rank {ring.rank} holds {local_len} tokens (the ranks: {held or 'not gathered'}), but a {layout} split of "
            f"{total} tokens over {ring.size} ranks gives them {lengths}: shard with "
            f"fastattn.distributed.shard_sequence")
    return pieces


def _bhld(x):
    return x.transpose(1, 2)  # flash layout (B, L, H, D) -> the kernels' (B, H, L, D), a view


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, total_seqlen):
        from .kernels.triton.flash_fwd import device_guard, flash_attn_forward

        ring = _Ring(group)
        pieces = _layout_of_ring(ring, q, total_seqlen, layout)
        B, L, Hq, _ = q.shape
        Ev = v.shape[3]
        acc_out = q.new_zeros((B, L, Hq, Ev), dtype=torch.float32)
        acc_lse = q.new_full((B, Hq, L), float("inf"), dtype=torch.float32)  # +inf: no key seen yet
        kv = (k.contiguous(), v.contiguous())
        with device_guard(q.device):
            for step in range(ring.size):
                src = (ring.rank - step) % ring.size
                reqs, incoming = None, None
                if step + 1 < ring.size:
                    n = sum(m for _, m in pieces[(ring.rank - step - 1) % ring.size])
                    incoming = tuple(t.new_empty((B, n) + t.shape[2:]) for t in kv)
                    reqs = ring.exchange(kv, incoming)
                qt, kt, vt = _bhld(q), _bhld(kv[0]), _bhld(kv[1])
                for q_lo, q_hi, k_lo, k_hi, bounds, diag in ring_blocks(pieces[ring.rank], pieces[src], causal):
                    # float32 partials: rounding each to q's dtype before the merge would round twice.
                    part = acc_out.new_empty((B, q_hi - q_lo, Hq, Ev)).transpose(1, 2)
                    _, lse = flash_attn_forward(qt[:, :, q_lo:q_hi], kt[:, :, k_lo:k_hi], vt[:, :, k_lo:k_hi],
                                                scale=scale, causal_bounds=bounds, diag_offset=diag, out=part)
                    merged_out, merged_lse = merge_attention_states(
                        [acc_out[:, q_lo:q_hi], part.transpose(1, 2)], [acc_lse[:, :, q_lo:q_hi], lse])
                    acc_out[:, q_lo:q_hi] = merged_out
                    acc_lse[:, :, q_lo:q_hi] = merged_lse
                _wait(reqs)
                if incoming is not None:
                    kv = incoming
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.ring, ctx.pieces, ctx.scale, ctx.causal = ring, pieces, scale, causal
        ctx.mark_non_differentiable(acc_lse)
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .kernels.triton.flash_bwd import flash_attn_backward
        from .kernels.triton.flash_fwd import device_guard

        q, k, v, out, lse = ctx.saved_tensors
        ring, pieces = ctx.ring, ctx.pieces
        B = q.shape[0]
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = (k.contiguous(), v.contiguous())
        dkv = (torch.zeros_like(kv[0], dtype=torch.float32), torch.zeros_like(kv[1], dtype=torch.float32))
        qt, ot, dot = _bhld(q), _bhld(out), _bhld(dout)
        with device_guard(q.device):
            for step in range(ring.size):
                src = (ring.rank - step) % ring.size
                reqs, incoming = None, None
                if step + 1 < ring.size:  # K/V for the next step travel while this one computes
                    n = sum(m for _, m in pieces[(ring.rank - step - 1) % ring.size])
                    incoming = tuple(t.new_empty((B, n) + t.shape[2:]) for t in kv)
                    reqs = ring.exchange(kv, incoming)
                kt, vt = _bhld(kv[0]), _bhld(kv[1])
                dkt, dvt = _bhld(dkv[0]), _bhld(dkv[1])
                for q_lo, q_hi, k_lo, k_hi, bounds, diag in ring_blocks(pieces[ring.rank], pieces[src], ctx.causal):
                    dq_b, dk_b, dv_b, _ = flash_attn_backward(
                        dot[:, :, q_lo:q_hi], qt[:, :, q_lo:q_hi], kt[:, :, k_lo:k_hi], vt[:, :, k_lo:k_hi],
                        ot[:, :, q_lo:q_hi], lse[:, :, q_lo:q_hi].contiguous(),
                        scale=ctx.scale, causal_bounds=bounds, diag_offset=diag)
                    dq[:, q_lo:q_hi] += dq_b.transpose(1, 2)
                    dkt[:, :, k_lo:k_hi] += dk_b
                    dvt[:, :, k_lo:k_hi] += dv_b
                _wait(reqs)
                # The accumulators move on with their K/V; after the last step they go home
                # (the accumulator in hand then belongs to the next rank, ours comes from the previous).
                if ring.size > 1:
                    n = incoming[0].shape[1] if incoming is not None else k.shape[1]
                    arriving = tuple(t.new_empty((B, n) + t.shape[2:]) for t in dkv)
                    _wait(ring.exchange(dkv, arriving))
                    dkv = arriving
                if incoming is not None:
                    kv = incoming
        dk, dv = dkv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
                         causal: bool = False, *, group=None, layout: str = "zigzag",
                         total_seqlen: Optional[int] = None, return_lse: bool = False):
    """Attention over a sequence split across the ranks of ``group`` (context parallelism).

    q: (batch, seqlen_local, nheads, headdim), k, v: (batch, seqlen_local, nheads_k, headdim)
    on every rank, each rank's slice of one sequence in ``layout`` (see the module's
    docstring and :func:`shard_sequence`); float16 or bfloat16, CUDA (NCCL) or CPU under
    the Triton interpreter (gloo). nheads a multiple of nheads_k (GQA). ``causal``: each
    query sees the keys at or before its global position. ``total_seqlen``: the global
    length (None: gathered from the ranks' slice lengths by one small all_gather per call).
    Every rank of the group must call it with the same arguments.
    Returns this rank's out (batch, seqlen_local, nheads, headdim), equal to its rows of
    one process attending over the whole sequence; with ``return_lse`` also the lse
    (batch, nheads, seqlen_local) float32 (no gradient flows through it).
    Differentiable in q, k, v: the backward runs the ring again (same group and layout).
    """
    _check_inputs(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = _RingAttention.apply(q, k, v, scale, bool(causal), group, layout, total_seqlen)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- Transformers

TRANSFORMERS_NAME = "fastattn_ring"
_context: contextvars.ContextVar = contextvars.ContextVar("fastattn_context_parallel", default=None)


@contextlib.contextmanager
def context_parallel(group=None, *, layout: str = "zigzag", total_seqlen: Optional[int] = None):
    """Inside the block, a model loaded with ``attn_implementation="fastattn_ring"`` (see
    :func:`register_transformers`) attends over the whole sequence, split across ``group``'s
    ranks in ``layout``: give each rank its slice of ``input_ids`` *and* of the global
    ``position_ids`` (``shard_sequence`` of both), no padding mask, no KV cache."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} (supported: {', '.join(map(repr, LAYOUTS))})")
    token = _context.set((group, layout, total_seqlen))
    try:
        yield
    finally:
        _context.reset(token)


def transformers_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """Transformers' attention-function interface over the ring: query (B, Hq, L_local, D),
    key/value (B, Hkv, L_local, D) -> ((B, L_local, Hq, D), None)."""
    state = _context.get()
    if state is None:
        raise RuntimeError(f'attn_implementation="{TRANSFORMERS_NAME}" runs only inside '
                           f"fastattn.distributed.context_parallel(group)")
    unsupported = [f"{n}={kwargs[n]!r}" for n in ("sliding_window", "softcap", "s_aux")
                   if kwargs.get(n) is not None]
    if dropout:
        unsupported.append(f"dropout={dropout}")
    if attention_mask is not None:
        unsupported.append("an attention mask (padding)")
    if unsupported:
        raise ValueError(f"ring attention in Transformers does not support {', '.join(unsupported)} "
                         f"(it runs causal or full attention over unpadded sequences)")
    group, layout, total = state
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    out = ring_flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling, causal,
                               group=group, layout=layout, total_seqlen=total)
    return out, None


def _no_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
    """The ring applies causality by global positions; a padding mask cannot be split with it."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f'attn_implementation="{TRANSFORMERS_NAME}" runs unpadded sequences only; got a padding '
                         f"mask with zeros")
    return None


def register_transformers() -> None:
    """Register ``attn_implementation="fastattn_ring"`` with Transformers (imports it)."""
    from transformers import masking_utils, modeling_utils

    modeling_utils.AttentionInterface.register(TRANSFORMERS_NAME, transformers_attention)
    masking_utils.AttentionMaskInterface.register(TRANSFORMERS_NAME, _no_mask)


__all__ = ["LAYOUTS", "TRANSFORMERS_NAME", "context_parallel", "register_transformers", "ring_blocks",
           "ring_flash_attn_func", "sequence_slices", "shard_sequence", "transformers_attention", "unshard_sequence"]
