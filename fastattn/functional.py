"""The public front ends: SDPA-compatible and flash-attn-compatible."""
from __future__ import annotations

import torch

from . import dispatch
from .inputs import (AttentionCall, check_sdpa_args, flash_call, flash_signature, from_flash_args, from_sdpa_args,
                     holds_as_is, sdpa_call, sdpa_signature)


_compiling = torch.compiler.is_compiling


def _run(call: AttentionCall):
    return dispatch.select(call).run(call)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Same arguments, same result: query ``(..., L, E)``, key ``(..., S, E)``,
    value ``(..., S, Ev)`` -> ``(..., L, Ev)``. ``is_causal`` is top-left aligned
    (query i sees keys j <= i); ``attn_mask`` is bool (True = attend) or
    additive float, broadcastable to ``(..., L, S)``; rows that see no key give
    zeros. With ``enable_gqa=True`` key/value may have fewer heads (dim -3) than
    query. Runs the best fastattn kernel for the inputs and falls back to torch's
    SDPA where none applies; ``fastattn.explain`` says which and why.
    """
    # A call like an earlier one (same signature: shapes, strides, dtypes, devices, flags) in the
    # same dispatch state reuses its checks and decision; see inputs.sdpa_signature, dispatch.Plan.
    signature = None if _compiling() else sdpa_signature(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    plan = dispatch.cached_plan(signature)
    if plan is None:
        call, layout = check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        plan = dispatch.plan(call, signature, layout, as_is=holds_as_is(call, query, key, value, attn_mask))
    elif plan.as_is is not None:
        return plan.as_is(query, key, value, attn_mask, dropout_p, scale)
    else:
        layout = plan.layout
        call = sdpa_call(query, key, value, attn_mask, layout, dropout_p=dropout_p, causal=is_causal,
                         features=plan.features)
    out, _ = plan.backend.run(call)
    if len(layout.lead) == 2:
        return out  # (B, H, L, Ev) already
    return out.reshape(*layout.lead, call.seqlen_q, call.v.shape[-1])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_func``: change the import and nothing else.

    q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
    v: ``(batch, seqlen_k, nheads_k, headdim_v)``, with nheads % nheads_k == 0 (MQA/GQA).
    ``causal`` and ``window_size=(left, right)`` are aligned to the bottom-right
    corner: query i sees keys j with ``i + S - L - left <= j <= i + S - L (+ right)``.
    ``softcap > 0`` applies ``softcap * tanh(scores / softcap)``; ``alibi_slopes``
    is ``(nheads,)`` or ``(batch, nheads)`` float32 and adds ``-slope * |i + S - L - j|``.

    Returns ``out`` ``(batch, seqlen_q, nheads, headdim_v)``; with
    ``return_attn_probs=True``, ``(out, softmax_lse, None)`` where softmax_lse is
    ``(batch, nheads, seqlen_q)`` float32 (``+inf`` on rows with no visible key).
    Forward only: gradients and dropout run on torch's SDPA / exact math.
    ``deterministic`` is accepted for compatibility (the forward is deterministic).
    """
    signature = None if _compiling() else flash_signature(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)
    plan = dispatch.cached_plan(signature)
    if plan is None:
        call = from_flash_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               return_lse=return_attn_probs)
        plan = dispatch.plan(call, signature, layout=call.scale, as_is=True)
    elif plan.as_is is not None:  # torch's SDPA on the (B, H, L, E) views, as the sdpa backend would call it
        out = plan.as_is(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p, softmax_scale)
        return out.transpose(1, 2).contiguous()
    else:
        call = flash_call(q, k, v, dropout_p, plan.layout, causal, window_size, softcap, alibi_slopes,
                          return_attn_probs, features=plan.features)
    out, lse = plan.backend.run(call)
    out = out.transpose(1, 2).contiguous()  # a no-op for the kernels, which write in q's layout
    if return_attn_probs:
        return out, lse, None
    return out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> dispatch.Explanation:
    """Which backend would run this SDPA call, and every backend's reasons.
    ``print(fastattn.explain(q, k, v, ...))`` reads as a short report."""
    call, _ = from_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return dispatch.explain_call(call)


def explain_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None, return_attn_probs=False) -> dispatch.Explanation:
    """:func:`explain` for :func:`flash_attn_func` arguments."""
    call = from_flash_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           return_lse=return_attn_probs)
    return dispatch.explain_call(call)


def attention(call: AttentionCall):
    """Run an already validated :class:`AttentionCall` (for integrations); returns (out, lse or None)."""
    return _run(call)


__all__ = ["scaled_dot_product_attention", "flash_attn_func", "explain", "explain_flash", "attention"]
