"""``torch.ops.fastattn.triton_varlen_fwd`` and ``triton_varlen_bwd``: the Triton kernels on
per-sequence layouts (packed variable-length batches, paged or indexed KV caches) as custom
ops, so that ``torch.compile`` treats each launch as one opaque node (as ``triton_fwd`` does
for dense calls). Lengths live in tensors: a new batch's lengths cause no recompilation. The
``max_seqlen_*`` ints only size the launch; None means "bounded by the storage".

The forward's autograd formula (``register_autograd``, as for the dense op) saves q, k, v,
out, the lse and the index tensors, and calls ``triton_varlen_bwd``: one autograd path for
eager and compiled training. The backward takes the packed (``cu_seqlens_q/k``) and
``seqused_q/k`` layouts; the KV-cache ones (pages, left padding, batch indices) are for
inference, and dispatch never sends a call that needs grad here with them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.triton.flash_fwd import Sequences, flash_attn_forward
from .layout import empty_outputs
from .triton_fwd import _laid_out_like


def launch_varlen_fwd(q, k, v, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, cache_leftpad,
                      cache_batch_idx, block_table, num_seqs, max_seqlen_q, max_seqlen_k, scale, window_left,
                      window_right, lower_right, softcap, num_splits):
    """The body of ``triton_varlen_fwd``, the same arguments: what eager inference calls directly."""
    seqs = Sequences(num_seqs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                     cache_leftpad, cache_batch_idx, block_table, lower_right)
    return flash_attn_forward(q, k, v, scale=scale, causal_bounds=(window_left, window_right), softcap=softcap,
                              alibi_slopes=alibi_slopes, sinks=sinks, num_splits=num_splits or None, seqs=seqs)


@torch.library.custom_op("fastattn::triton_varlen_fwd", mutates_args=())
def triton_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                      sinks: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], seqused_q: Optional[torch.Tensor],
                      seqused_k: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
                      cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor], num_seqs: int,
                      max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], scale: float, window_left: int,
                      window_right: int, lower_right: bool, softcap: float,
                      num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_varlen_fwd(q, k, v, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                             cache_leftpad, cache_batch_idx, block_table, num_seqs, max_seqlen_q, max_seqlen_k, scale,
                             window_left, window_right, lower_right, softcap, num_splits)


@triton_varlen_fwd.register_fake
def _triton_varlen_fwd_fake(q, k, v, *args):
    return empty_outputs(q, v.shape[-1])


@torch.library.custom_op("fastattn::triton_varlen_bwd", mutates_args=())
def triton_varlen_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                      sinks: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], seqused_q: Optional[torch.Tensor],
                      seqused_k: Optional[torch.Tensor], num_seqs: int, max_seqlen_q: Optional[int],
                      max_seqlen_k: Optional[int], scale: float, window_left: int, window_right: int,
                      lower_right: bool, softcap: float,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks) as ``triton_bwd`` returns them, for ``triton_varlen_fwd``'s
    packed/seqused layouts (each gradient laid out like its input; dsinks (0,) without sinks)."""
    from ..kernels.triton.flash_bwd import flash_attn_backward

    seqs = Sequences(num_seqs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                     lower_right=lower_right)
    dq, dk, dv, dsinks = flash_attn_backward(
        dout, q, k, v, out, lse, scale=scale, causal_bounds=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, dlse=dlse, seqs=seqs)
    dsinks = dsinks if dsinks is not None else q.new_empty((0,), dtype=torch.float32)
    return _laid_out_like(dq, q), _laid_out_like(dk, k), _laid_out_like(dv, v), dsinks


@triton_varlen_bwd.register_fake
def _triton_varlen_bwd_fake(dout, dlse, q, k, v, out, lse, alibi_slopes, sinks, *args):
    dsinks = q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


# --------------------------------------------------------------------------- autograd

_FWD_ARGS = tuple(a.name for a in torch.ops.fastattn.triton_varlen_fwd.default._schema.arguments)
_INDEX = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")
_SCALARS = ("num_seqs", "max_seqlen_q", "max_seqlen_k", "scale", "window_left", "window_right", "lower_right",
            "softcap")
_CACHE_LAYOUTS = ("cache_leftpad", "cache_batch_idx", "block_table")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["alibi_slopes"], args["sinks"],
                          *(args[name] for name in _INDEX))
    ctx.scalars = {name: args[name] for name in _SCALARS}
    ctx.cache_layouts = [name for name in _CACHE_LAYOUTS if args[name] is not None]
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read


def _backward(ctx, dout, dlse):
    if ctx.cache_layouts:
        raise RuntimeError(f"fastattn::triton_varlen_fwd has no backward with {', '.join(ctx.cache_layouts)} "
                           "(KV-cache layouts are for inference; dispatch runs such calls that need grad elsewhere)")
    q, k, v, out, lse, alibi_slopes, sinks, *index = ctx.saved_tensors
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = triton_varlen_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, sinks, *index, **ctx.scalars)
    grads = {"q": dq, "k": dk, "v": dv}
    if sinks is not None and ctx.needs_input_grad[_FWD_ARGS.index("sinks")]:
        grads["sinks"] = dsinks.to(sinks.dtype)
    # Dispatch refuses ALiBi slopes that require grad (the kernel gives them none).
    return tuple(grads.get(name) for name in _FWD_ARGS)


triton_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
