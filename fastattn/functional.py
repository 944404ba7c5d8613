"""The public front ends: SDPA-compatible and flash-attn-compatible."""
from __future__ import annotations

import torch

from . import dispatch
from dataclasses import replace

from .inputs import (AttentionCall, check_sdpa_args, flash_call, flash_signature, from_flash_args, from_kvcache_args,
                     from_sdpa_args, from_varlen_args, holds_as_is, sdpa_call, sdpa_signature)


# Dynamo's tracing is what the front ends' cached plans must stay out of (it would guard on the
# plan dict); other tracers hand over tensor subclasses, which no signature takes. The dynamo
# test costs half of torch.compiler.is_compiling, which asks TorchScript first.
_compiling = torch.compiler.is_dynamo_compiling


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
    Differentiable: where the Triton kernel runs the forward, its backward runs the backward
    (dq, dk, dv; the lse's gradient too; dropout with the forward's own keep-mask, drawn per
    call from torch's generator); what it cannot differentiate (ALiBi slopes that require grad)
    runs both directions on torch's SDPA / exact math (``explain_flash`` says why).
    ``deterministic`` is accepted for compatibility: both kernels are deterministic.
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


# --------------------------------------------------------------------------- flash-attn's other families


def _one_of(name_a: str, a, name_b: str, b):
    """Two spellings of one argument (flash-attn 2 / 3-4): at most one may be given."""
    if a is not None and b is not None:
        raise TypeError(f"pass {name_a} or {name_b}, not both (they are two names for one argument)")
    return a if a is not None else b


def _run_per_sequence(call: AttentionCall, num_splits: int = 0):
    backend = dispatch.select(call)
    if num_splits and backend.name == "triton":
        return backend.run(call, num_splits=num_splits)
    return backend.run(call)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, seqused_q=None,
                           seqused_k=None, page_table=None, learnable_sink=None, s_aux=None, return_lse=False):
    """flash-attn 2's ``flash_attn_varlen_func`` (plus flash-attn 3/4's keywords): a packed
    batch of sequences of different lengths, no padding.

    q: ``(total_q, nheads, headdim)``, sequence b at rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``;
    k/v: ``(total_k, nheads_k, headdim[_v])`` likewise with ``cu_seqlens_k``, or, with
    ``block_table`` (alias ``page_table``) ``(batch, pages_per_seq)`` int32, a paged cache
    ``(num_pages, page_size, nheads_k, headdim)`` (page size any multiple of 16) where
    sequence b's key j is row ``j % page_size`` of page ``block_table[b, j // page_size]``.
    cu_seqlens_* are int32 ``(batch + 1,)``. ``seqused_q/k`` (int32 ``(batch,)``): each sequence
    uses only its first seqused tokens (unused query rows give 0, lse +inf).
    ``max_seqlen_q/k`` (int, or a 0-d tensor: never read on a GPU, see
    :func:`fastattn.inputs.from_varlen_args`) size the launch only. ``causal`` and
    ``window_size`` are aligned to each sequence's own bottom-right corner.
    ``learnable_sink`` (alias ``s_aux``) ``(nheads,)``: attention-sink logits.

    Returns ``out`` ``(total_q, nheads, headdim_v)``; ``(out, softmax_lse, None)`` with
    ``return_attn_probs`` and ``(out, softmax_lse)`` with ``return_lse``, softmax_lse
    ``(nheads, total_q)`` float32 (+inf on rows with no visible key). Differentiable (q, k, v,
    the sinks, and the lse when returned); on the triton kernel's backward for packed layouts,
    on the fallback for paged caches and dropout."""
    call = from_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                            causal, window_size, softcap, alibi_slopes, seqused_q=seqused_q, seqused_k=seqused_k,
                            block_table=_one_of("block_table", block_table, "page_table", page_table),
                            sinks=_one_of("learnable_sink", learnable_sink, "s_aux", s_aux),
                            return_lse=return_attn_probs or return_lse)
    out, lse = _run_per_sequence(call)
    out = out[0].transpose(0, 1)  # (total_q, nheads, headdim_v): the kernels write in q's layout
    if return_attn_probs:
        return out, lse[0], None
    if return_lse:
        return out, lse[0]
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            learnable_sink=None, s_aux=None):
    """flash-attn 2's ``flash_attn_with_kvcache``: attention of new queries against a KV cache,
    appending the new keys/values first (decoding).

    q: ``(batch, seqlen_q, nheads, headdim)``. k_cache/v_cache: ``(batch_cache, seqlen_cache,
    nheads_k, headdim[_v])``, or with ``block_table`` ``(batch, pages_per_seq)`` int32 a paged
    cache ``(num_pages, page_size, nheads_k, headdim)`` (page size any multiple of 16).
    k/v (optional) ``(batch, seqlen_new, nheads_k, headdim)``: written **in place** into the
    cache at positions ``cache_seqlens[b] ..`` (``cache_seqlens``: an int or int32 ``(batch,)``,
    each sequence's length before the append); the attention then covers keys up to
    ``cache_seqlens + seqlen_new``. Nothing is written when the append is refused.
    ``rotary_cos/sin`` ``(seqlen_ro, rotary_dim / 2)``: rotary embedding of q and the new k
    (GPT-J pairs when ``rotary_interleaved``, else GPT-NeoX halves) at positions from
    ``cache_seqlens`` (cache indices: left padding counts, as in flash-attn); with causal or a
    window q's row i is at that position + i,
    otherwise every row is at it (as in flash-attn). ``cache_batch_idx`` int32 ``(batch,)``:
    the cache entry of each sequence; ``cache_leftpad`` int32 ``(batch,)``: each sequence's
    first valid cache position (dense caches). ``num_splits``: split-KV factor (0 = choose).
    ``causal``/``window_size`` are aligned to each sequence's bottom-right corner.

    Returns ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, and with ``return_softmax_lse``
    ``(out, softmax_lse)`` with softmax_lse ``(batch, nheads, seqlen_q)`` float32."""
    from .kvcache import append_to_cache, apply_rotary

    call, append = from_kvcache_args(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
        _one_of("learnable_sink", learnable_sink, "s_aux", s_aux), return_softmax_lse)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise TypeError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
    new_k = append.k
    if append.rotary_cos is not None:
        start = append.cache_seqlens.long()  # the cache index, left padding included (as flash-attn)
        rows = torch.arange(q.shape[1], device=q.device) if append.rotary_per_row else torch.zeros(
            q.shape[1], dtype=torch.long, device=q.device)
        q_rot = apply_rotary(q, append.rotary_cos, append.rotary_sin, start[:, None] + rows, append.rotary_interleaved)
        call = replace(call, q=q_rot.transpose(1, 2))
        if new_k is not None:
            new_pos = start[:, None] + torch.arange(new_k.shape[1], device=q.device)
            new_k = apply_rotary(new_k, append.rotary_cos, append.rotary_sin, new_pos, append.rotary_interleaved)
    if new_k is not None and new_k.shape[1]:
        append_to_cache(k_cache, v_cache, new_k, append.v, append.cache_seqlens, cache_batch_idx, block_table)
    out, lse = _run_per_sequence(call, num_splits) if call.layout != "dense" else _run(call)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with q, k, v stacked: qkv ``(batch, seqlen, 3, nheads, headdim)``."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with k, v stacked: kv ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with q, k, v stacked: qkv ``(total, 3, nheads, headdim)``."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with k, v stacked: kv ``(total_k, 2, nheads_k, headdim)``."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def explain_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs) -> dispatch.Explanation:
    """:func:`explain` for :func:`flash_attn_varlen_func` arguments."""
    window = kwargs.pop("window_size", (-1, -1))
    call = from_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size=window,
                            **kwargs)
    return dispatch.explain_call(call)


__all__ += ["flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
            "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "explain_varlen"]
