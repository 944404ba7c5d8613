"""fastattn behind torch's own flash SDPA ops (``torch.nn.attention``'s flash-impl registry).

Torch versions with ``torch.nn.attention.register_flash_attention_impl`` (2.13's documentation
has it, 2.14 here) let a library install kernels behind their flash attention ops::

    import fastattn.torch_sdpa                      # registers "fastattn" (activates nothing)
    torch.nn.attention.activate_flash_attention_impl("fastattn")
    ...  # F.scaled_dot_product_attention on the flash backend now runs fastattn's Triton kernels
    torch.nn.attention.restore_flash_attention_impl()

Activation overrides, for CUDA tensors, ``aten::_scaled_dot_product_flash_attention`` and its
``_backward`` (what ``F.scaled_dot_product_attention`` calls on the flash backend, and what
torch's ``context_parallel`` intercepts), and ``aten::_flash_attention_forward`` /
``_flash_attention_backward`` (flash-attn layout). Calls fastattn's kernels cannot run
(dropout, debug masks, ALiBi, varlen ``cum_seq_*``, paged or ``seqused_k`` calls, other
dtypes or head dims) go to torch's own kernel, fetched with ``torch.library.get_kernel``
before the override; ``_flash_attention_forward_no_dropout_inplace`` is left to torch.
Causal calls with seqlen_q != seqlen_k line the diagonal up bottom-right, as torch's
flash kernel does. :data:`counts` counts, per op, which implementation ran.

Torch without the registry (checked at run time by :func:`missing`; whether the GPU
image's 2.11 has it was not verified): :func:`register` does nothing and returns False, :func:`activate` raises
saying what is needed.
"""
from __future__ import annotations

import collections
from typing import Optional

import torch

NAME = "fastattn"

# (op name, "fastattn" | "torch") -> calls since import: which implementation ran.
counts: collections.Counter = collections.Counter()

_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_flash_attention_forward", "_flash_attention_backward")
_original: dict = {}  # op name -> torch's CUDA kernel, captured at activation


def missing() -> Optional[str]:
    """Why this torch cannot take fastattn behind its flash SDPA ops, or None."""
    attn = torch.nn.attention
    needs = ("register_flash_attention_impl", "activate_flash_attention_impl", "restore_flash_attention_impl")
    if not all(hasattr(attn, n) for n in needs):
        return (f"torch {torch.__version__} has no flash attention impl registry (torch.nn.attention."
                f"register_flash_attention_impl); call fastattn's front ends instead")
    if not hasattr(torch.library, "get_kernel"):
        return (f"torch {torch.__version__} has no torch.library.get_kernel, which fastattn needs to hand the "
                f"calls it cannot run back to torch's own kernel")
    return None


def register() -> bool:
    """Register "fastattn" in torch's registry (idempotent); activates nothing. False when
    this torch has no registry (see :func:`missing`)."""
    if missing() is not None:
        return False
    if NAME not in torch.nn.attention.list_flash_attention_impls():
        torch.nn.attention.register_flash_attention_impl(NAME, register_fn=_install)
    return True


def activate() -> None:
    """``torch.nn.attention.activate_flash_attention_impl("fastattn")``, or a clear error."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    register()
    torch.nn.attention.activate_flash_attention_impl(NAME)


class _Handle:
    """What the registry keeps while fastattn is active; ``remove`` puts torch's kernels back."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None
        _original.clear()


def _install() -> _Handle:
    from torch.library import Library

    for name in _OPS:
        _original[name] = torch.library.get_kernel(getattr(torch.ops.aten, name).default, "CUDA")
    lib = Library("aten", "IMPL", "CUDA")
    for name, impl in ((_OPS[0], sdpa_flash_forward), (_OPS[1], sdpa_flash_backward),
                       (_OPS[2], flash_attention_forward), (_OPS[3], flash_attention_backward)):
        lib.impl(name, impl, "CUDA", with_keyset=True)
    return _Handle(lib)


def _to_torch(name, keyset, *args, **kwargs):
    counts[(name, "torch")] += 1
    if name not in _original:
        raise RuntimeError(f"fastattn cannot run this {name} call and has no torch kernel to hand it to "
                           f"(fastattn is not active)")
    return _original[name].call_boxed(keyset, *args, **kwargs)


# --------------------------------------------------------------------------- what fastattn runs


def _reasons(query, key, value, dropout_p=0.0, return_debug_mask=False, alibi_slopes=None, cum_seq_q=None,
             seqused_k=None, block_table=None) -> list:
    """Why fastattn's kernels cannot run this call (empty: they can). The dtypes and head dims
    are the triton backend's own declarations; the rest is what these ops ask beyond them."""
    from .dispatch import registered_backends

    triton = registered_backends()["triton"]
    supported = triton.forward
    reasons = list(triton.availability())
    if not (query.device == key.device == value.device) or query.device.type not in ("cuda", "cpu"):
        reasons.append(f"tensors on {query.device}, {key.device}, {value.device}")
    if query.device.type == "cpu":
        from ._env import interpreting

        if not interpreting():
            reasons.append("CPU tensors outside the Triton interpreter")
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in supported.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported.dtypes)
        reasons.append(f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (supported: {names})")
    if max(query.shape[-1], value.shape[-1]) > supported.max_head_dim:
        reasons.append(f"head_dim={max(query.shape[-1], value.shape[-1])} (supported: <= {supported.max_head_dim})")
    if dropout_p != 0.0:
        reasons.append(f"dropout_p={dropout_p}")
    if return_debug_mask:
        reasons.append("return_debug_mask")
    if alibi_slopes is not None:
        reasons.append("alibi_slopes")
    if cum_seq_q is not None:
        reasons.append("varlen (cum_seq_q)")
    if seqused_k is not None:
        reasons.append("seqused_k")
    if block_table is not None:
        reasons.append("block_table")
    return reasons


def _bounds(is_causal, window_size_left=None, window_size_right=None):
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _forward_bhld(q, k, v, scale, bounds):
    """The kernel on (B, H, L, E) views; bottom-right diagonal. Returns out (like q), lse (B, H, L)."""
    from .kernels.triton.flash_fwd import flash_attn_forward

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return flash_attn_forward(q, k, v, scale=scale, causal_bounds=bounds, diag_offset=k.shape[2] - q.shape[2])


def _backward_bhld(do, q, k, v, out, lse, scale, bounds):
    from .kernels.triton.flash_bwd import flash_attn_backward

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv, _ = flash_attn_backward(do, q, k, v, out, lse.contiguous(), scale=scale, causal_bounds=bounds,
                                        diag_offset=k.shape[2] - q.shape[2])
    return dq, dk, dv


def _aux(query):
    """rng_state, unused (philox offset), debug mask: what torch's kernel returns without dropout."""
    return (torch.zeros((2,), dtype=torch.uint64, device=query.device),
            torch.zeros((), dtype=torch.uint64, device=query.device),
            torch.empty(0, dtype=query.dtype, device=query.device))


def _flip(*tensors):
    return tuple(t.transpose(1, 2) for t in tensors)


# --------------------------------------------------------------------------- the op implementations
# Each takes the dispatch keyset first (with_keyset=True), then exactly the op's schema.


def sdpa_flash_forward(keyset, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
                       scale=None):
    """aten::_scaled_dot_product_flash_attention: q (B, Hq, L, E), k/v (B, Hkv, S, E) ->
    (output like query, logsumexp (B, Hq, L) float32, cum_seq_q, cum_seq_k (undefined), max_q, max_k,
    rng_state, unused, debug_attn_mask)."""
    name = _OPS[0]
    if _reasons(query, key, value, dropout_p, return_debug_mask):
        return _to_torch(name, keyset, query, key, value, dropout_p, is_causal, return_debug_mask, scale=scale)
    counts[(name, "fastattn")] += 1
    out, lse = _forward_bhld(query, key, value, scale, _bounds(is_causal))
    return (out, lse, None, None, query.shape[2], key.shape[2], *_aux(query))


def sdpa_flash_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                        dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward -> (grad_query, grad_key, grad_value)."""
    name = _OPS[1]
    if _reasons(query, key, value, dropout_p, cum_seq_q=cum_seq_q):
        return _to_torch(name, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                         max_k, dropout_p, is_causal, philox_seed, philox_offset, scale=scale)
    counts[(name, "fastattn")] += 1
    return _backward_bhld(grad_out, query, key, value, out, logsumexp, scale, _bounds(is_causal))


def flash_attention_forward(keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                            return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                            seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    """aten::_flash_attention_forward, flash-attn layout: q (B, L, Hq, E) -> (output (B, L, Hq, Ev),
    softmax_logsumexp (B, Hq, L) float32, rng_state, unused, debug_attn_mask)."""
    name = _OPS[2]
    if _reasons(query, key, value, dropout_p, return_debug_mask, alibi_slopes, cum_seq_q, seqused_k, block_table):
        return _to_torch(name, keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                         return_debug_mask, scale=scale, window_size_left=window_size_left,
                         window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
                         block_table=block_table, num_splits=num_splits)
    counts[(name, "fastattn")] += 1
    out, lse = _forward_bhld(*_flip(query, key, value), scale, _bounds(is_causal, window_size_left, window_size_right))
    return (out.transpose(1, 2), lse, *_aux(query))


def flash_attention_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                             max_k, dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                             window_size_right=None):
    """aten::_flash_attention_backward, flash-attn layout -> (dq, dk, dv) like query, key, value."""
    name = _OPS[3]
    if _reasons(query, key, value, dropout_p, cum_seq_q=cum_seq_q):
        return _to_torch(name, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                         max_k, dropout_p, is_causal, rng_state, unused, scale=scale,
                         window_size_left=window_size_left, window_size_right=window_size_right)
    counts[(name, "fastattn")] += 1
    grads = _backward_bhld(*_flip(grad_out, query, key, value, out), logsumexp, scale,
                           _bounds(is_causal, window_size_left, window_size_right))
    return _flip(*grads)


register()
