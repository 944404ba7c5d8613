"""``torch.ops.fastattn.triton_fwd`` and ``triton_bwd``: the Triton kernels as custom ops,
with autograd.

The path the triton backend takes in compiled runs and wherever a gradient is needed (eager
inference launches the kernel directly: the op's dispatch costs some 25-35 us of host time a
call, more than a decode step's launch):

- ``triton_fwd`` runs the forward kernel and returns ``out`` and the log-sum-exp
  (always: the backward recomputes the probabilities from it);
- its autograd formula (``register_autograd``) saves q, k, v, out and the lse (never
  the probabilities) and calls ``triton_bwd``, the backward kernel (with the lse's own
  gradient when the caller used the lse, as flash_attn_func's ``return_attn_probs`` returns it);
- both have fake implementations, so ``torch.compile`` (Transformers compiles the
  forward for StaticCache generation) sees their shapes without tracing the launchers
  (Inductor cannot lower the bool-mask reinterpretation, and a kernel launch is no
  graph op anyway), and AOT autograd traces the backward as one more op.

The scalars are plain arguments; gradients are handed back by argument name
(:func:`_backward`), so the formula does not count positions. Dropout takes a seed drawn per
call (:func:`dropout_seed`, a CPU tensor, so compiled graphs draw it as an op too), saved for
the backward, which regenerates the forward's keep-mask from it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.triton.flash_fwd import flash_attn_forward
from .layout import empty_outputs


def dropout_seed() -> torch.Tensor:
    """A fresh seed for one call's dropout keep-mask: a (1,) int64 tensor on the CPU, drawn from
    torch's CPU generator (so ``torch.manual_seed`` reproduces it, and reading it back in the
    kernels' launchers is no device sync). The forward and the backward regenerate the same
    mask from it (kernels/triton/dropout.py); each call draws anew, with offset 0."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor]) -> dict:
    if dropout_p == 0.0:
        return {}
    if seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed (fastattn.ops.triton_fwd.dropout_seed())")
    return {"dropout_p": dropout_p, "dropout_seed": int(seed[0]), "dropout_offset": 0}


def launch_fwd(q, k, v, mask, alibi_slopes, sinks, scale, window_left, window_right, diag_offset, softcap,
               dropout_p=0.0, dropout_seed=None):
    """The body of ``triton_fwd``, the same arguments: what eager inference calls directly."""
    return flash_attn_forward(q, k, v, scale=scale, mask=mask, causal_bounds=(window_left, window_right),
                              diag_offset=diag_offset, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                              **_dropout_args(dropout_p, dropout_seed))


@torch.library.custom_op("fastattn::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], scale: float,
               window_left: int, window_right: int, diag_offset: int, softcap: float,
               dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_fwd(q, k, v, mask, alibi_slopes, sinks, scale, window_left, window_right, diag_offset, softcap,
                      dropout_p, dropout_seed)


@triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, mask, alibi_slopes, sinks, scale, window_left, window_right, diag_offset, softcap,
                     dropout_p=0.0, dropout_seed=None):
    return empty_outputs(q, v.shape[-1])


@torch.library.custom_op("fastattn::triton_bwd", mutates_args=())
def triton_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
               alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], scale: float,
               window_left: int, window_right: int, diag_offset: int, softcap: float,
               dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks), each gradient laid out like its input (``torch.empty_like``'s
    layout: what the fake says); dk/dv with the K/V heads; dsinks (Hq,) float32, or empty (0,)
    without sinks (a custom op cannot return None). ``dlse``: the lse's gradient, None when the
    lse was not used."""
    from ..kernels.triton.flash_bwd import flash_attn_backward

    extra = _dropout_args(dropout_p, dropout_seed)
    if dlse is not None:
        extra["dlse"] = dlse
    dq, dk, dv, dsinks = flash_attn_backward(
        dout, q, k, v, out, lse, scale=scale, mask=mask, causal_bounds=(window_left, window_right),
        diag_offset=diag_offset, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, **extra)
    dsinks = dsinks if dsinks is not None else q.new_empty((0,), dtype=torch.float32)
    return _laid_out_like(dq, q), _laid_out_like(dk, k), _laid_out_like(dv, v), dsinks


def _laid_out_like(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad`` itself when the kernel wrote it in ``empty_like(t)``'s layout, else a copy in it."""
    if grad.stride() == t.stride():  # the common case: the kernel allocated it with empty_like
        return grad
    like = torch.empty_like(t)  # t is not dense (a stride-0 broadcast): a contiguous layout
    return grad if grad.stride() == like.stride() else like.copy_(grad)


@triton_bwd.register_fake
def _triton_bwd_fake(dout, dlse, q, k, v, out, lse, mask, alibi_slopes, sinks, scale, window_left, window_right,
                     diag_offset, softcap, dropout_p=0.0, dropout_seed=None):
    dsinks = q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


# --------------------------------------------------------------------------- autograd

_FWD_ARGS = tuple(a.name for a in torch.ops.fastattn.triton_fwd.default._schema.arguments)
_SCALARS = ("scale", "window_left", "window_right", "diag_offset", "softcap", "dropout_p")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["mask"], args["alibi_slopes"],
                          args["sinks"])
    ctx.scalars = {name: args[name] for name in _SCALARS if name in args}
    ctx.dropout_seed = args.get("dropout_seed")  # the forward's keep-mask, regenerated by the backward
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, alibi_slopes, sinks = ctx.saved_tensors
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = triton_bwd(dout, dlse, q, k, v, out, lse, mask, alibi_slopes, sinks, **ctx.scalars,
                                    dropout_seed=ctx.dropout_seed)
    grads = {"q": dq, "k": dk, "v": dv}
    if sinks is not None and ctx.needs_input_grad[_FWD_ARGS.index("sinks")]:
        grads["sinks"] = dsinks.to(sinks.dtype)
    # Dispatch refuses masks and ALiBi slopes that require grad (the kernel gives them none).
    return tuple(grads.get(name) for name in _FWD_ARGS)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)
