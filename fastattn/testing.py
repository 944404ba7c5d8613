"""Independent reference attention, the accuracy rule, and FLOP counts.

The reference is written from the definition, on purpose separately from the
backends' code, so that tests compare the kernels against something that does
not share their mistakes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def reference_attention(q, k, v, *, scale: Optional[float] = None, mask=None, causal: bool = False,
                        lower_right: bool = False, window=(-1, -1), softcap: float = 0.0,
                        alibi_slopes=None, sinks=None, dropout_keep=None, dropout_p: float = 0.0,
                        compute_dtype: Optional[torch.dtype] = torch.float64):
    """Attention by its definition, in ``(B, H, L, E)`` layout.

    ``compute_dtype=None`` computes in the inputs' own dtype (the "same math in
    the input dtype" of the accuracy rule); otherwise everything is upcast.
    Positions follow flash-attn when ``lower_right`` (query i lines up with key
    i + S - L) and SDPA otherwise. ``window=(left, right)``, -1 = unbounded;
    ``causal`` means right = 0. ``dropout_keep``: a bool (B, H, L, S) keep-mask
    applied to the probabilities (scaled by 1 / (1 - dropout_p)) after the softmax.
    Returns ``(out, lse)``; rows with no visible key give out = 0 and lse = +inf.
    """
    dtype = compute_dtype or q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    k = k.repeat_interleave(H // Hk, dim=1)
    v = v.repeat_interleave(H // Hk, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    s = s.to(torch.float64) if compute_dtype == torch.float64 else s.float()

    offset = S - L if lower_right else 0
    i = torch.arange(L, device=q.device).view(L, 1)
    j = torch.arange(S, device=q.device).view(1, S)
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        visible &= j <= i + offset + right
    if left >= 0:
        visible &= j >= i + offset - left
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).reshape(-1, H, 1, 1)
        s = s - slopes * (i + offset - j).abs().to(s.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    logits = s
    if sinks is not None:  # one extra logit per head, with no value
        sink_col = sinks.to(s.dtype).view(1, H, 1, 1).expand(B, H, L, 1)
        logits = torch.cat([s, sink_col], dim=-1)
    none_visible = torch.isneginf(logits).all(dim=-1)
    # logsumexp over a row of -inf has a NaN gradient (exp(-inf - -inf)), which an additive
    # -inf mask would carry into q and k: such rows take a finite stand-in (their p is 0 anyway).
    lse = torch.logsumexp(logits.masked_fill(none_visible.unsqueeze(-1), 0.0), dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_keep is not None:
        p = p * dropout_keep.to(p.dtype) / (1.0 - dropout_p)
    out = p.to(v.dtype) @ v
    return out, lse.masked_fill(none_visible, float("inf"))


GRADIENT_FACTOR = 3.0  # flash-attn's rule for gradients: 3x the error of the same math in the input dtype


def reference_gradients(q, k, v, do, *, dlse=None, compute_dtype: Optional[torch.dtype] = torch.float64, **kwargs):
    """Gradients of :func:`reference_attention` by autograd, for ``out.backward(do)``
    (and ``lse.backward(dlse)`` when ``dlse`` is given; rows that see no key pass none).

    Returns ``(dq, dk, dv, dsinks)``: fp64 with the default ``compute_dtype``, in the
    inputs' dtypes with ``compute_dtype=None`` (the "same math in the input dtype");
    dk/dv have k/v's heads (GQA groups summed by the autograd of repeat_interleave);
    dsinks is None without ``sinks``."""
    dtype = compute_dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    sinks = kwargs.pop("sinks", None)
    if sinks is not None:
        sinks = sinks.detach().to(compute_dtype or torch.float32).requires_grad_()
    out, lse = reference_attention(*leaves, sinks=sinks, compute_dtype=compute_dtype, **kwargs)
    outputs, output_grads = [out], [do.to(out.dtype)]
    if dlse is not None:
        outputs.append(lse)
        output_grads.append(dlse.to(lse.dtype))
    torch.autograd.backward(outputs, output_grads)
    grads = [t.grad for t in leaves]
    return (*grads, None if sinks is None else sinks.grad)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(out: torch.Tensor, ref: torch.Tensor, ref_lowp: torch.Tensor, *, factor: float = 2.0,
                         what: str = "output") -> None:
    """flash-attn's accuracy rule: the kernel's max error against the high-precision
    reference is at most ``factor`` times the error of the same math done in the
    input dtype, plus a tiny floor (1e-5 at the reference's scale)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    err = max_error(out, ref)
    err_lowp = max_error(ref_lowp, ref)
    floor = 1e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    bound = factor * err_lowp + floor
    assert err <= bound, (f"{what}: max error {err:.3e} vs reference exceeds {factor} x {err_lowp:.3e} "
                          f"(same math in {out.dtype}) + {floor:.1e}")


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, head_dim_v: Optional[int] = None,
                    causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs by flash-attn's convention: 2·B·H·L·S·(E + Ev) forward (4·B·H·L·S·D when
    E = Ev), halved for causal, ×2.5 for backward."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    flops = 2.0 * batch * heads * seqlen_q * seqlen_k * (head_dim + head_dim_v)
    if causal:
        flops *= 0.5
    return flops * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
