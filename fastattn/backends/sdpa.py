"""The fallback: torch's own scaled_dot_product_attention, plus exact math for
what SDPA cannot express (softcap, attention sinks, the log-sum-exp). It never refuses."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..inputs import AttentionCall, Features
from .base import Backend

# Saved at import: fastattn.patch(torch_sdpa=True) may later replace the public
# function with ours, and the fallback must not call itself.
torch_sdpa = F.scaled_dot_product_attention


def positional_bias(call: AttentionCall) -> Optional[torch.Tensor]:
    """The causal/window/ALiBi part of the call as one mask broadcastable to
    (B, Hq, L, S): bool (True = attend) when there is no ALiBi, else additive float32."""
    L, S = call.seqlen_q, call.seqlen_k
    left, right = call.key_bounds
    device = call.q.device
    rel = None
    keep = None
    if left >= 0 or right >= 0 or call.alibi_slopes is not None:
        i = torch.arange(L, device=device).unsqueeze(1)
        j = torch.arange(S, device=device).unsqueeze(0)
        rel = j - (i + call.diag_offset)  # key position relative to the query's diagonal
    if right >= 0:
        keep = rel <= right
    if left >= 0:
        keep = rel >= -left if keep is None else keep & (rel >= -left)
    if call.alibi_slopes is None:
        return keep
    slopes = call.alibi_slopes.to(device=device, dtype=torch.float32)[:, :, None, None]
    bias = -slopes * rel.abs().to(torch.float32)
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


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
    if call.sinks is not None:
        sinks = call.sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, sinks], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0).unsqueeze(-1))
    if call.dropout_p > 0:
        p = F.dropout(p, call.dropout_p)
    out = torch.matmul(p, v).to(call.q.dtype)
    lse = lse.masked_fill(empty, float("inf"))
    return (out, lse, p.to(call.q.dtype)) if return_probs else (out, lse)


PACK_MIN_KEYS = 64  # see SDPABackend.as_is_runner


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (any device and dtype); exact math for softcap and sinks"

    def not_supported_reasons(self, features: Features) -> list[str]:
        return []

    def runs_as_is(self, f: Features) -> bool:
        """True when :meth:`run` hands the call's own tensors and mask to torch's SDPA unchanged:
        nothing for the exact math, no positions to fold into the mask (at most a top-left causal
        pattern, which is torch's ``is_causal``), a mask torch takes as it is."""
        if f.has_softcap or f.has_sinks or f.want_lse or f.has_alibi or f.mask_dtype not in (None, torch.bool, f.dtype):
            return False
        return f.window == (-1, -1) or (f.window == (-1, 0) and f.positions_fit_torch and f.mask_dtype is None)

    def as_is_runner(self, call: AttentionCall) -> Optional[Callable]:
        """For a call that :meth:`runs_as_is`: torch's SDPA with the call's flags bound, to be given
        ``(q, k, v, attn_mask, dropout_p, scale)`` of this call or of later calls like it (the front
        ends' cached plans, with the caller's own scale: None is torch's default, 1 / sqrt(E),
        which is the call's); None for any other call.

        A decode step of grouped-query attention with a key-padding mask and at least
        ``PACK_MIN_KEYS`` keys runs with each key/value head's query heads packed as rows,
        ``(B, Hkv, Hq / Hkv, E)``, and the mask broadcast over them, as Transformers' own SDPA path
        does: torch has no fused kernel for GQA beside a mask. Measured on the CPU (one thread,
        fp32), packed / unpacked time: 0.83x at 64 keys, 0.54x at 128, 0.65x at 1024 keys hd128;
        but 1.2x at 32 keys or fewer, where the two reshapes cost more than they save."""
        f = call.features
        if not self.runs_as_is(f):
            return None
        causal, gqa = f.window == (-1, 0), f.num_heads_q != f.num_heads_kv
        mask = call.mask
        if (gqa and call.seqlen_q == 1 and call.seqlen_k >= PACK_MIN_KEYS and mask is not None
                and f.window == (-1, -1) and mask.shape[1] == 1):
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
