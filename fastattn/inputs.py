"""One attention call, validated and put in canonical form.

Both front ends (SDPA-style and flash-attn-style) turn their arguments into an
:class:`AttentionCall`: q/k/v as ``(B, H, L, E)`` *views* of the caller's tensors
(no copies), the mask as a 4-d view broadcastable to ``(B, Hq, L, S)``, and the
positional features (causal, window, softcap, ALiBi) as plain values. Every
check of whether a call is well formed lives in this module and raises
:class:`InvalidInputError` (a ``ValueError``) or ``TypeError`` before any
backend sees the call.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional

import torch

__all__ = ["AttentionCall", "Features", "InvalidInputError", "from_sdpa_args", "from_flash_args", "with_extras",
           "SDPALayout", "check_sdpa_args", "sdpa_call", "holds_as_is", "flash_call", "sdpa_signature", "flash_signature"]


class InvalidInputError(ValueError, RuntimeError):
    """A malformed call. A ``ValueError``; also a ``RuntimeError``, which is what
    torch's SDPA raises for the same inputs, so existing ``except`` clauses keep working."""


HALF_DTYPES = (torch.float16, torch.bfloat16)


def mask_dtypes(query_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The attn_mask dtypes a call takes: bool (True = attend), or additive in the query's
    dtype or float32."""
    return torch.bool, query_dtype, torch.float32


@dataclass(frozen=True)
class Features:
    """The hashable facts about a call that backends decide on (the dispatch cache key)."""

    device_type: str
    device_index: Optional[int]
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    num_heads_q: int
    num_heads_kv: int
    empty: bool
    equal_lengths: bool  # L == S: both causal alignments coincide
    causal: bool
    lower_right: bool
    window: tuple[int, int]
    has_softcap: bool
    has_alibi: bool
    has_sinks: bool
    mask_dtype: Optional[torch.dtype]
    dropout: bool
    needs_grad: bool
    last_dim_contiguous: bool
    want_lse: bool
    mask_key_padding: bool = False  # the mask varies only with batch and key: one row per sequence
    short_queries: bool = False  # at most 16 query rows (decode): bound by reading K/V

    @property
    def positions_fit_torch(self) -> bool:
        """No positional restriction, or a causal one that torch's ``is_causal`` (top-left)
        expresses: the alignments coincide when L == S."""
        return self.window == (-1, -1) or (self.window == (-1, 0) and (not self.lower_right or self.equal_lengths))


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """A validated call in canonical layout.

    q: (B, Hq, L, E); k: (B, Hkv, S, E); v: (B, Hkv, S, Ev) with Hq % Hkv == 0 and
    query head h reading key/value head h // (Hq // Hkv). Batch dims may be
    stride-0 broadcasts. ``mask``: None, or a bool (True = attend) or float
    (additive) 4-d view broadcastable to (B, Hq, L, S).

    Positions: query i lines up with key ``i + diag_offset`` where
    ``diag_offset = S - L`` if ``lower_right`` (flash-attn) else 0 (SDPA).
    ``causal`` keeps keys ``j <= i + diag_offset``; ``window = (left, right)``
    keeps ``i + diag_offset - left <= j <= i + diag_offset + right`` (-1 = unbounded).
    ALiBi adds ``-slope[b, h] * |i + diag_offset - j|``. ``sinks[h]`` is a logit
    with no value (attention sinks, GPT-OSS): it joins each row's softmax
    denominator, and the log-sum-exp.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    mask: Optional[torch.Tensor] = None
    causal: bool = False
    lower_right: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None  # (B or 1, Hq), float32
    sinks: Optional[torch.Tensor] = None  # (Hq,): one extra logit per head in the softmax denominator
    dropout_p: float = 0.0
    want_lse: bool = False

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[2]

    @property
    def diag_offset(self) -> int:
        return self.seqlen_k - self.seqlen_q if self.lower_right else 0

    @property
    def key_bounds(self) -> tuple[int, int]:
        """(left, right) key bounds around each query's diagonal, causal folded in (-1 = unbounded).

        A bound that rules out no key for any query is dropped: causal in a decode step with
        bottom-right alignment, or a diagonal past the last key. Such calls then look alike
        to dispatch at every step (one cached decision) and run without per-key checks."""
        left, right = self.window
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        diag = self.diag_offset
        if right >= 0 and diag + right >= self.seqlen_k - 1:  # query 0 already sees the last key
            right = -1
        if left >= 0 and self.seqlen_q - 1 + diag - left <= 0:  # the last query still sees key 0
            left = -1
        return left, right

    @property
    def features(self) -> Features:
        """Computed once per call. (Not functools.cached_property: Python 3.11's takes an
        RLock, which torch.compile cannot trace, so every compiled call broke its graph.)"""
        features = self.__dict__.get("_features")
        if features is None:
            features = self.__dict__["_features"] = self._features()
        return features

    def _features(self) -> Features:
        q, k, v = self.q, self.k, self.v
        return Features(
            device_type=q.device.type,
            device_index=q.device.index,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            head_dim_v=v.shape[-1],
            num_heads_q=q.shape[1],
            num_heads_kv=k.shape[1],
            equal_lengths=q.shape[2] == k.shape[2],
            empty=q.numel() == 0 or k.shape[2] == 0 or k.shape[-1] == 0 or v.shape[-1] == 0,
            causal=self.causal,
            lower_right=self.lower_right,
            window=self.key_bounds,
            has_softcap=self.softcap > 0,
            has_alibi=self.alibi_slopes is not None,
            has_sinks=self.sinks is not None,
            mask_dtype=None if self.mask is None else self.mask.dtype,
            dropout=self.dropout_p > 0,
            needs_grad=torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v, self.mask, self.alibi_slopes, self.sinks) if t is not None),
            last_dim_contiguous=all(t.stride(-1) == 1 or t.shape[-1] <= 1 for t in (q, k, v)),
            want_lse=self.want_lse,
            short_queries=q.shape[2] <= 16,
            mask_key_padding=self.mask is not None and all(  # head and query dims absent, size 1 or stride 0
                self.mask.dim() < -d or self.mask.shape[d] == 1 or self.mask.stride(d) == 0 for d in (-3, -2)),
        )


# --------------------------------------------------------------------------- checks


def _check_tensors(names: tuple[str, ...], tensors: tuple) -> None:
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != q.dtype:
            raise InvalidInputError(
                f"{names[0]}, {names[1]} and {names[2]} must have the same dtype; got "
                + ", ".join(f"{n} {x.dtype}" for n, x in zip(names, tensors))
            )
        if t.device != q.device:
            raise InvalidInputError(
                f"{names[0]}, {names[1]} and {names[2]} must be on the same device; got "
                + ", ".join(f"{n} on {x.device}" for n, x in zip(names, tensors))
            )
    if not (q.is_floating_point()):
        raise InvalidInputError(f"{names[0]} must be a floating-point tensor, got {q.dtype}")


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise InvalidInputError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise InvalidInputError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_heads(hq: int, hk: int, hv: int, *, gqa_allowed: bool, hint: str) -> None:
    if hk != hv:
        raise InvalidInputError(f"key and value must have the same number of heads; got {hk} and {hv}")
    if hq == hk:
        return
    if not gqa_allowed:
        raise InvalidInputError(
            f"query has {hq} heads but key/value have {hk}; {hint}"
        )
    if hk == 0 or hq % hk != 0:
        raise InvalidInputError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hk})"
        )


def _broadcast_shape(*shapes) -> Optional[tuple[int, ...]]:
    """numpy-style broadcast of shapes, or None where they do not broadcast (plain
    Python: torch.broadcast_shapes costs several microseconds per call)."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        size = 1
        for s in shapes:
            d = s[i - ndim + len(s)] if i - ndim + len(s) >= 0 else 1
            if d != 1:
                if size != 1 and d != size:
                    return None
                size = d
        out.append(size)
    return tuple(out)


def _broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    if shapes[0] == shapes[1] == shapes[2]:
        return tuple(shapes[0])
    out = _broadcast_shape(*shapes)
    if out is None:
        raise InvalidInputError(f"{what} do not broadcast: " + ", ".join(str(tuple(s)) for s in shapes))
    return out


def _to_4d(t: torch.Tensor, lead: tuple[int, ...], tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast ``t`` to ``lead + tail`` and view it as 4-d (B, H, *tail)."""
    if len(lead) == 2 and t.shape == (*lead, *tail):
        return t
    t = t.expand(*lead, *tail)
    if len(lead) == 2:
        return t
    if len(lead) < 2:
        return t.reshape((1,) * (2 - len(lead)) + tuple(lead) + tuple(tail))
    return t.reshape(-1, lead[-1], *tail)  # a copy only if the leading dims cannot be merged


# --------------------------------------------------------------------------- SDPA front end


def from_sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False) -> tuple[AttentionCall, tuple[int, ...]]:
    """Validate ``torch.nn.functional.scaled_dot_product_attention`` arguments.

    Returns the call and the output's leading shape (the result is
    ``(*lead, L, Ev)``).
    """
    call, layout = check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return call, layout.lead


def check_sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False) -> tuple[AttentionCall, "SDPALayout"]:
    """:func:`from_sdpa_args`, returning the call's whole :class:`SDPALayout`."""
    _check_tensors(("query", "key", "value"), (query, key, value))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise InvalidInputError(f"{name} must have at least 2 dims (..., seq_len, head_dim), got shape {tuple(t.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise InvalidInputError(
            f"query and key must have the same head dim (last dim); got {query.shape[-1]} and {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise InvalidInputError(
            f"key and value must have the same sequence length (dim -2); got {key.shape[-2]} and {value.shape[-2]}"
        )
    dropout_p = _check_dropout(dropout_p)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and attn_mask is not None:
        raise InvalidInputError("attn_mask and is_causal=True cannot be used together (as in torch's SDPA): "
                                "fold the causal mask into attn_mask instead")
    L, S = query.shape[-2], key.shape[-2]

    gqa = bool(enable_gqa) and min(query.dim(), key.dim(), value.dim()) >= 3
    if gqa:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        _check_heads(hq, hk, hv, gqa_allowed=True, hint="")
        batch = _broadcast([query.shape[:-3], key.shape[:-3], value.shape[:-3]], "the batch dims of query, key and value")
        lead = batch + (hq,)
        kv_lead = batch + (hk,)
    else:
        if (query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3]
                and 1 not in (query.shape[-3], key.shape[-3])):  # size-1 heads broadcast, as in torch
            _check_heads(query.shape[-3], key.shape[-3], value.shape[-3], gqa_allowed=False,
                         hint="pass enable_gqa=True for grouped-query attention")
        lead = _broadcast([query.shape[:-2], key.shape[:-2], value.shape[:-2]], "the batch/head dims of query, key and value")
        kv_lead = lead

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in mask_dtypes(query.dtype):
            raise InvalidInputError(
                f"attn_mask must be bool (True = attend) or a float mask of dtype {query.dtype} or torch.float32; "
                f"got {attn_mask.dtype}"
            )
        if attn_mask.dim() < 2:
            raise InvalidInputError(f"attn_mask must have at least 2 dims (L, S), got shape {tuple(attn_mask.shape)}")
        if attn_mask.device != query.device:
            raise InvalidInputError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if _broadcast_shape(attn_mask.shape, (*lead, L, S)) != (*lead, L, S):
            raise InvalidInputError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {(*lead, L, S)}"
            )

    layout = SDPALayout(lead, kv_lead, _check_scale(scale, query.shape[-1]))
    return sdpa_call(query, key, value, attn_mask, layout, dropout_p=dropout_p, causal=is_causal), layout


@dataclass(frozen=True)
class SDPALayout:
    """How SDPA-style tensors of one signature become an AttentionCall's: the broadcast
    leading dims of the query and of key/value, and the scale (the default filled in)."""

    lead: tuple[int, ...]
    kv_lead: tuple[int, ...]
    scale: float


def sdpa_call(query, key, value, attn_mask, layout: SDPALayout, *, dropout_p: float = 0.0, causal: bool = False,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
              features: Optional[Features] = None) -> AttentionCall:
    """The AttentionCall of SDPA-style arguments that have been checked (by :func:`from_sdpa_args`,
    or by a call with the same :func:`sdpa_signature`, whose ``layout`` and ``features`` these are)."""
    L, S = query.shape[-2], key.shape[-2]
    lead, kv_lead = layout.lead, layout.kv_lead
    call = AttentionCall(
        q=_to_4d(query, lead, (L, query.shape[-1])),
        k=_to_4d(key, kv_lead, (S, key.shape[-1])),
        v=_to_4d(value, kv_lead, (S, value.shape[-1])),
        scale=layout.scale,
        mask=None if attn_mask is None else _mask_to_4d(attn_mask, lead, L, S),
        causal=causal,
        window=window,
        softcap=softcap,
        sinks=sinks,
        dropout_p=dropout_p,
    )
    if features is not None:
        call.__dict__["_features"] = features
    return call


def _mask_to_4d(mask: torch.Tensor, lead: tuple[int, ...], L: int, S: int) -> torch.Tensor:
    """A 4-d view of ``mask`` broadcastable to (B, H, L, S), keeping size-1 dims unexpanded."""
    full = (*lead, L, S)
    m = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape)) if mask.dim() < len(full) else mask
    if len(full) == 4:
        return m
    if len(full) < 4:
        return m.reshape((1,) * (4 - len(full)) + tuple(m.shape))
    # More than two leading dims: merge the batch dims (keep the head dim separate).
    batch = full[:-3]
    m = m.expand(*batch, m.shape[-3], L if m.shape[-2] != 1 else 1, S if m.shape[-1] != 1 else 1)
    return m.reshape(-1, *m.shape[-3:])


def holds_as_is(call: AttentionCall, query, key, value, attn_mask) -> bool:
    """True when the call's q, k, v and mask are these tensors themselves (4-d, nothing broadcast
    or reshaped), so that a kernel given the tensors sees what it would see given the call."""
    return call.q is query and call.k is key and call.v is value and call.mask is attn_mask


def with_extras(call: AttentionCall, *, causal: bool = False, window=(-1, -1), softcap=0.0,
                sinks: Optional[torch.Tensor] = None) -> AttentionCall:
    """Add to an SDPA-style call what torch's signature cannot say (Transformers passes
    these as keyword arguments): a top-left causal pattern beside an explicit mask, a
    sliding window ``(left, right)``, softcap, and attention sinks (one logit per query head)."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise InvalidInputError(f"window must be a pair of ints >= -1 (-1 = unbounded), got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise InvalidInputError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point tensor, got {type(sinks).__name__}")
        heads = call.q.shape[1]
        if tuple(sinks.shape) != (heads,):
            raise InvalidInputError(f"sinks must hold one logit per query head, shape ({heads},); "
                                    f"got {tuple(sinks.shape)}")
        sinks = sinks.to(call.q.device)  # a (heads,) parameter: no cost worth a refusal
    return replace(call, causal=causal, window=tuple(window), softcap=float(softcap), sinks=sinks)


# --------------------------------------------------------------------------- flash-attn front end


def from_flash_args(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, return_lse=False) -> AttentionCall:
    """Validate ``flash_attn_func`` arguments: (batch, seqlen, nheads, headdim) layout,
    bottom-right aligned causal mask and window."""
    _check_tensors(("q", "k", "v"), (q, k, v))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(f"{name} must be 4-d (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    B, L, Hq, E = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise InvalidInputError(f"q, k and v must have the same batch size; got {B}, {k.shape[0]} and {v.shape[0]}")
    if k.shape[-1] != E:
        raise InvalidInputError(f"q and k must have the same head dim; got {E} and {k.shape[-1]}")
    if k.shape[1] != v.shape[1]:
        raise InvalidInputError(f"k and v must have the same seqlen; got {k.shape[1]} and {v.shape[1]}")
    _check_heads(Hq, k.shape[2], v.shape[2], gqa_allowed=True, hint="")
    dropout_p = _check_dropout(dropout_p)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise InvalidInputError(f"window_size entries must be >= -1 (-1 = unbounded), got {(left, right)}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise InvalidInputError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise InvalidInputError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise InvalidInputError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise InvalidInputError(
                f"alibi_slopes must have shape (nheads,) = ({Hq},) or (batch, nheads) = ({B}, {Hq}); "
                f"got {tuple(alibi_slopes.shape)}"
            )
    return flash_call(q, k, v, dropout_p, _check_scale(softmax_scale, E), causal, (left, right), float(softcap),
                      alibi_slopes, return_lse)


def flash_call(q, k, v, dropout_p: float, scale: float, causal: bool, window_size: tuple[int, int], softcap: float,
               alibi_slopes: Optional[torch.Tensor], return_lse: bool,
               features: Optional[Features] = None) -> AttentionCall:
    """The AttentionCall of ``flash_attn_func`` arguments that have been checked (by
    :func:`from_flash_args`, or by a call with the same :func:`flash_signature`, whose
    ``features`` these are), with the scale filled in."""
    left, right = window_size
    if causal:  # flash-attn treats causal as window (-1, 0)
        right = 0
    call = AttentionCall(
        q=q.transpose(1, 2),
        k=k.transpose(1, 2),
        v=v.transpose(1, 2),
        scale=scale,
        causal=causal,
        lower_right=True,
        window=(left, right),
        softcap=softcap,
        alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0),
        dropout_p=dropout_p,
        want_lse=return_lse,
    )
    if features is not None:
        call.__dict__["_features"] = features
    return call


# --------------------------------------------------------------------------- signatures
#
# A repeated call should not pay for its checks again. A signature is everything the checks
# above and AttentionCall.features read from a call's arguments, as one hashable tuple: two
# calls with equal signatures pass or fail the same checks and have equal features, so the
# front ends cache what the first one worked out (dispatch.Plan) under its signature. A
# call that fails a check is never cached, so it raises the same error every time.
# A call that certainly fails a check (k's dtype or device differs from q's) gets no signature
# (None), which keeps the tuple short; so do arguments of unusual types (tensor subclasses,
# ints or bools where floats are expected: ``True == 1`` in a dict key, but not to the checks).
# Calls without a signature take the full path. tests/test_hostcost.py holds these functions
# to the checks.

_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled


def sdpa_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[tuple]:
    """The signature of :func:`from_sdpa_args`' arguments, or None."""
    if (type(query) is not _Tensor or type(key) is not _Tensor or type(value) is not _Tensor
            or type(dropout_p) is not float or type(is_causal) is not bool or type(enable_gqa) is not bool
            or (scale is not None and type(scale) is not float)):
        return None
    dtype, device = query.dtype, query.device
    if key.dtype is not dtype or value.dtype is not dtype or key.device != device or value.device != device:
        return None
    if attn_mask is None:
        mask = None
    elif type(attn_mask) is _Tensor and attn_mask.device == device:
        mask = (attn_mask.shape, attn_mask.stride(), attn_mask.dtype)
    else:
        return None
    needs_grad = _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                              or (attn_mask is not None and attn_mask.requires_grad))
    return (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), dtype, device,
            needs_grad, mask, dropout_p, is_causal, scale, enable_gqa)


def flash_signature(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_lse) -> Optional[tuple]:
    """The signature of :func:`from_flash_args`' arguments, or None."""
    if (type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor
            or type(dropout_p) is not float or type(causal) is not bool or type(return_lse) is not bool
            or type(softcap) is not float or (softmax_scale is not None and type(softmax_scale) is not float)
            or type(window_size) is not tuple or len(window_size) != 2
            or type(window_size[0]) is not int or type(window_size[1]) is not int):
        return None
    dtype, device = q.dtype, q.device
    if k.dtype is not dtype or v.dtype is not dtype or k.device != device or v.device != device:
        return None
    if alibi_slopes is None:
        slopes = None
    elif type(alibi_slopes) is _Tensor:
        slopes = (alibi_slopes.shape, alibi_slopes.dtype, alibi_slopes.device)
    else:
        return None
    needs_grad = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                              or (alibi_slopes is not None and alibi_slopes.requires_grad))
    # "flash": the same tensors mean another call than under SDPA's signature (the layouts differ)
    return ("flash", q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), dtype, device, needs_grad,
            slopes, dropout_p, softmax_scale, causal, window_size, softcap, return_lse)
