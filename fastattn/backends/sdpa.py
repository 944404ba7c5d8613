"""The fallback: torch's own scaled_dot_product_attention, plus exact math for
what SDPA cannot express (softcap, attention sinks, the log-sum-exp). It never refuses."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..inputs import AttentionCall, Features
from ..ops.layout import empty_outputs
from .base import Backend, Support

# Saved at import: fastattn.patch(torch_sdpa=True) may later replace the public
# function with ours, and the fallback must not call itself.
torch_sdpa = F.scaled_dot_product_attention


_POSITION_MASKS: dict[tuple, torch.Tensor] = {}  # (L, S, left, right, diag, device) -> (L, S) bool
MAX_POSITION_MASKS = 64


def positional_bias(call: AttentionCall) -> Optional[torch.Tensor]:
    """The causal/window/ALiBi part of the call as one mask broadcastable to
    (B, Hq, L, S): bool (True = attend) when there is no ALiBi, else additive float32.

    Without ALiBi the mask depends on sizes and bounds alone and is kept for the next call with
    the same (every layer of a model's decode step asks for the same one): on the CPU building
    it costs several times torch's SDPA call on a decode step. Not kept while torch.compile
    traces or a CUDA graph captures (the tensor would belong to the graph)."""
    L, S = call.seqlen_q, call.seqlen_k
    left, right = call.key_bounds
    device = call.q.device
    if call.alibi_slopes is None and (left >= 0 or right >= 0):
        if torch.compiler.is_compiling():
            return _position_mask(L, S, left, right, call.diag_offset, device)
        key = (L, S, left, right, call.diag_offset, device)
        keep = _POSITION_MASKS.get(key)
        if keep is not None:
            return keep
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _position_mask(L, S, left, right, call.diag_offset, device)
        if len(_POSITION_MASKS) >= MAX_POSITION_MASKS:
            _POSITION_MASKS.clear()
        keep = _POSITION_MASKS[key] = _position_mask(L, S, left, right, call.diag_offset, device)
        return keep
    if call.alibi_slopes is None:
        return None
    rel = _relative_positions(L, S, call.diag_offset, device)
    keep = _bounds(rel, left, right)
    slopes = call.alibi_slopes.to(device=device, dtype=torch.float32)[:, :, None, None]
    bias = -slopes * rel.abs().to(torch.float32)
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


def _relative_positions(L: int, S: int, diag: int, device) -> torch.Tensor:
    """(L, S): each key's position relative to the query's diagonal."""
    return torch.arange(S, device=device)[None, :] - (torch.arange(L, device=device)[:, None] + diag)


def _bounds(rel: torch.Tensor, left: int, right: int) -> Optional[torch.Tensor]:
    """Where ``-left <= rel <= right`` (a bound of -1 is none); None when there is no bound."""
    keep = rel <= right if right >= 0 else None
    if left >= 0:
        keep = rel >= -left if keep is None else keep & (rel >= -left)
    return keep


def _position_mask(L: int, S: int, left: int, right: int, diag: int, device) -> torch.Tensor:
    return _bounds(_relative_positions(L, S, diag, device), left, right)


def combine_masks(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return b if a is None else a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    if a.dtype == torch.bool:
        a, b = b, a
    if b.dtype == torch.bool:
        return a.float().masked_fill(~b, float("-inf"))
    return a.float() + b.float()


def math_attention(call: AttentionCall, return_probs: bool = False):
    """Attention spelled out in float32 (GQA, softcap, masks, sinks, dropout); returns
    (out, lse), and the probabilities after dropout in the input dtype when
    ``return_probs`` (Transformers' ``output_attentions``)."""
    q, k, v = call.q.float(), call.k.float(), call.v.float()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-2, -1)) * call.scale
    if call.softcap > 0:
        s = call.softcap * torch.tanh(s / call.softcap)
    mask = combine_masks(call.mask, positional_bias(call))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    logits = s
    if call.sinks is not None:
        logits = torch.cat([s, call.sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    # A row with no visible logit has no softmax: its output is 0 and its lse +inf. Its scores
    # are replaced before logsumexp, whose gradient over an all -inf row is NaN (which an
    # additive ALiBi bias or the softcap's tanh would carry into q and k).
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # (also a row with no key at all)
    lse = torch.logsumexp(logits.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s.masked_fill(empty, 0.0) - lse).masked_fill(empty, 0.0)
    if call.dropout_p > 0:
        p = F.dropout(p, call.dropout_p)
    out = torch.matmul(p, v).to(call.q.dtype)
    lse = lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("inf"))
    return (out, lse, p.to(call.q.dtype)) if return_probs else (out, lse)


def sequence_calls(call: AttentionCall):
    """A per-sequence call (varlen, paged, indexed cache) as dense calls, one per sequence:
    yields (b, query rows of the output it fills, the dense call). Reads the index tensors
    on the host (a sync on a GPU: this is the fallback, not a kernel)."""
    B = call.num_seqs
    host = {name: None if t is None else t.tolist() for name, t in (
        ("cu_q", call.cu_seqlens_q), ("cu_k", call.cu_seqlens_k), ("used_q", call.seqused_q),
        ("used_k", call.seqused_k), ("leftpad", call.cache_leftpad), ("batch_idx", call.cache_batch_idx),
        ("pages", call.block_table))}
    for b in range(B):
        if host["cu_q"] is not None:
            q_lo, q_hi = host["cu_q"][b], host["cu_q"][b + 1]
            q = call.q[:, :, q_lo:q_hi]
        else:
            q_lo, q_hi = 0, call.q.shape[2]
            q = call.q[b:b + 1]
        if host["used_q"] is not None:
            q_hi = q_lo + host["used_q"][b]
            q = q[:, :, :host["used_q"][b]]
        if host["pages"] is not None:
            page = call.k.shape[2]
            n = host["used_k"][b]
            used = host["pages"][b][:-(-n // page)]
            index = torch.tensor(used, dtype=torch.long, device=call.k.device)
            k, v = (t.index_select(0, index).transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3])[:, :, :n]
                    for t in (call.k, call.v))
        else:
            if host["cu_k"] is not None:
                k_lo, k_hi = host["cu_k"][b], host["cu_k"][b + 1]
                entry = 0
            else:
                k_lo, k_hi = 0, call.k.shape[2]
                entry = host["batch_idx"][b] if host["batch_idx"] is not None else b
            if host["used_k"] is not None:
                k_hi = k_lo + host["used_k"][b]
            if host["leftpad"] is not None:
                k_lo = host["leftpad"][b]
            k, v = (t[entry:entry + 1, :, k_lo:k_hi] for t in (call.k, call.v))
        slopes = call.alibi_slopes
        if slopes is not None and slopes.shape[0] > 1:
            slopes = slopes[b:b + 1]
        dense = replace(call, q=q, k=k, v=v, alibi_slopes=slopes, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, seqused_q=None, seqused_k=None, block_table=None,
                        cache_leftpad=None, cache_batch_idx=None)
        yield b, (q_lo, q_hi), dense


def run_by_sequence(call: AttentionCall, run_dense):
    """Run a per-sequence call as one dense call per sequence (every feature kept: each
    sequence's diagonal, window, softcap, ALiBi, sinks). Rows no sequence uses: 0, lse +inf."""
    out, lse = empty_outputs(call.q, call.v.shape[-1])
    out.zero_()
    lse.fill_(float("inf"))
    packed = call.cu_seqlens_q is not None
    for b, (lo, hi), dense in sequence_calls(call):
        if hi == lo:
            continue
        o, l = run_dense(replace(dense, want_lse=True) if call.want_lse else dense)
        if packed:
            out[:, :, lo:hi] = o
            if l is not None:
                lse[:, :, lo:hi] = l
        else:
            out[b:b + 1, :, lo:hi] = o
            if l is not None:
                lse[b:b + 1, :, lo:hi] = l
    return out, lse if call.want_lse else None


PACK_MIN_KEYS = 64  # see SDPABackend.as_is_runner
PACK_MIN_GROUP = 4  # query heads per key/value head from which short decode steps pack too


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (any device and dtype); exact math for softcap and sinks"

    forward = Support()  # any dtype, head dim and feature
    backward = Support()  # torch's autograd differentiates whatever run() computed

    def runs_as_is(self, f: Features) -> bool:
        """True when :meth:`run` hands the call's own tensors and mask to torch's SDPA unchanged:
        nothing for the exact math, no positions to fold into the mask (at most a top-left causal
        pattern, which is torch's ``is_causal``), a mask torch takes as it is."""
        if (f.layout != "dense" or f.has_softcap or f.has_sinks or f.want_lse or f.has_alibi
                or f.mask_dtype not in (None, torch.bool, f.dtype)):
            return False
        return f.window == (-1, -1) or (f.window == (-1, 0) and f.positions_fit_torch and f.mask_dtype is None)

    def as_is_runner(self, call: AttentionCall) -> Optional[Callable]:
        """For a call that :meth:`runs_as_is`: torch's SDPA with the call's flags bound, to be given
        ``(q, k, v, attn_mask, dropout_p, scale)`` of this call or of later calls like it (the front
        ends' cached plans, with the caller's own scale: None is torch's default, 1 / sqrt(E),
        which is the call's); None for any other call.

        A decode step of grouped-query attention with a key-padding mask, with at least
        ``PACK_MIN_KEYS`` keys or ``PACK_MIN_GROUP`` query heads per key/value head, runs with
        each key/value head's query heads packed as rows, ``(B, Hkv, Hq / Hkv, E)``, and the mask
        broadcast over them, as Transformers' own SDPA path does (always): torch has no fused
        kernel for GQA beside a mask. Measured on the CPU (one thread, fp32), packed / unpacked
        time: 0.83x at 64 keys, 0.54x at 128, 0.65x at 1024 keys hd128; with groups of 4
        (Llama-3's) 0.65-0.92x from 16 to 64 keys (0.76x at Transformers' tiny decode, B4 8/2
        heads hd32 40 keys, where fastattn was 1.4x of Transformers' attention before), 1.00-1.05x
        at worst; but groups of 2 with fewer than 64 keys 1.04-1.6x, where the two reshapes cost
        more than they save."""
        f = call.features
        if not self.runs_as_is(f):
            return None
        causal, gqa = f.window == (-1, 0), f.num_heads_q != f.num_heads_kv
        mask = call.mask
        if (gqa and call.seqlen_q == 1 and mask is not None and f.window == (-1, -1) and mask.shape[1] == 1
                and (call.seqlen_k >= PACK_MIN_KEYS or f.num_heads_q >= PACK_MIN_GROUP * f.num_heads_kv)):
            B, Hkv = call.q.shape[0], f.num_heads_kv
            packed = (B, Hkv, f.num_heads_q // Hkv, f.head_dim)
            unpacked = (B, f.num_heads_q, 1, f.head_dim_v)

            def run_packed(q, k, v, attn_mask, dropout_p, scale):
                return torch_sdpa(q.reshape(packed), k, v, attn_mask, dropout_p, False, scale=scale).reshape(unpacked)

            return run_packed

        def run_as_is(q, k, v, attn_mask, dropout_p, scale):  # positional where torch allows: cheaper to parse
            return torch_sdpa(q, k, v, attn_mask, dropout_p, causal, scale=scale, enable_gqa=gqa)

        return run_as_is

    def run(self, call: AttentionCall):
        if call.layout != "dense":
            return run_by_sequence(call, self.run)
        runner = self.as_is_runner(call)
        if runner is not None:
            return runner(call.q, call.k, call.v, call.mask, call.dropout_p, call.scale), None
        f = call.features
        if call.softcap > 0 or call.sinks is not None or call.want_lse:
            return math_attention(call)
        # torch's is_causal is top-left and refuses an explicit mask beside it; anything
        # else causal goes into the mask.
        plain_causal = (f.positions_fit_torch and f.window == (-1, 0) and call.mask is None
                        and call.alibi_slopes is None)
        mask = call.mask
        if not plain_causal:
            mask = combine_masks(mask, positional_bias(call))
        q, k, v = call.q, call.k, call.v
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            # torch wants the bias in q's dtype. A float32 bias (ALiBi, or a float mask combined
            # with a window) beside half inputs would round ALiBi's distances there: compute in
            # float32 instead. Beside float64 inputs the bias widens exactly.
            if q.element_size() < mask.element_size():
                q, k, v = (t.to(mask.dtype) for t in (q, k, v))
            else:
                mask = mask.to(q.dtype)
        out = torch_sdpa(
            q, k, v,
            attn_mask=mask,
            dropout_p=call.dropout_p,
            is_causal=plain_causal,
            scale=call.scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.to(call.q.dtype), None
