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
from typing import NamedTuple, Optional

import torch

__all__ = ["AttentionCall", "Features", "InvalidInputError", "from_sdpa_args", "from_flash_args", "with_extras",
           "from_varlen_args", "from_kvcache_args", "window_pair",
           "SDPALayout", "check_sdpa_args", "sdpa_call", "holds_as_is", "flash_call", "sdpa_signature", "flash_signature"]


class InvalidInputError(ValueError, RuntimeError):
    """A malformed call. A ``ValueError``; also a ``RuntimeError``, which is what
    torch's SDPA raises for the same inputs, so existing ``except`` clauses keep working."""


HALF_DTYPES = (torch.float16, torch.bfloat16)


def mask_dtypes(query_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The attn_mask dtypes a call takes: bool (True = attend), or additive in the query's
    dtype or float32. (Spelled out, not cached: the Transformers fast path asks every call,
    and torch.compile warns about every lru_cache it traces.)"""
    if query_dtype is torch.float32:
        return torch.bool, torch.float32
    return torch.bool, query_dtype, torch.float32


class Features(NamedTuple):
    """The hashable facts about a call that backends decide on (the dispatch cache key). A named
    tuple, not a frozen dataclass: every call without a cached plan makes one and looks its
    decision up by it, and a tuple is made, hashed and compared in C (0.75 / 0.12 / 0.08 us
    against 3.2 / 0.27 / 0.38 us for the dataclass). ``features._replace(...)`` for a variant."""

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
    layout: str = "dense"  # "dense", "varlen" (per-sequence lengths/offsets) or "paged" (K/V in pages)
    page_size: int = 0  # paged K/V: keys per page
    layout_extras: tuple[str, ...] = ()  # per-sequence parts beyond lengths: "cache_batch_idx", "cache_leftpad", "seqused_q"
    mask_needs_grad: bool = False  # an additive mask that requires grad (e.g. T5's trainable position bias)
    alibi_needs_grad: bool = False  # ALiBi slopes that require grad

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
    # Per-sequence layouts (see :attr:`layout`); all None for a dense call. Index tensors are
    # int32 on q's device. Packed (cu_seqlens_q given): q is (1, Hq, total_q, E) and sequence b
    # holds rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; likewise k/v with cu_seqlens_k. Paged
    # (block_table (B, pages_per_seq)): k/v are (num_pages, Hkv, page_size, E) and sequence b's
    # key j is row j % page_size of page block_table[b, j // page_size]. seqused_q/k (B,): the
    # queries/keys each sequence uses (its cache length when paged or a dense cache);
    # cache_leftpad (B,): the first key of each sequence in a dense cache; cache_batch_idx (B,):
    # the cache entry each sequence reads. With lower_right each sequence has its own diagonal,
    # its key count minus its query count. max_seqlen_q/k: the longest sequence, only to size
    # the launch (None = not known without a device read: the storage bounds the launch).
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None
    seqused_q: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    cache_leftpad: Optional[torch.Tensor] = None
    cache_batch_idx: Optional[torch.Tensor] = None

    @property
    def layout(self) -> str:
        """"dense" (q/k/v as they are), "paged" (block_table) or "varlen" (any other
        per-sequence length or offset)."""
        if self.block_table is not None:
            return "paged"
        if (self.cu_seqlens_q is None and self.cu_seqlens_k is None and self.seqused_q is None
                and self.seqused_k is None and self.cache_leftpad is None and self.cache_batch_idx is None):
            return "dense"
        return "varlen"

    @property
    def num_seqs(self) -> int:
        """The number of sequences (the batch size of a dense call)."""
        return self.q.shape[0] if self.cu_seqlens_q is None else self.cu_seqlens_q.shape[0] - 1

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
        if self.layout != "dense":  # each sequence has its own lengths: keep the bounds
            return left, right
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
        # Built in one go, for dense and per-sequence layouts alike, reading each attribute once.
        q, k, v, mask, slopes, sinks = self.q, self.k, self.v, self.mask, self.alibi_slopes, self.sinks
        q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
        device = q.device
        grad = torch.is_grad_enabled()
        layout = self.layout
        if layout == "dense":
            equal_lengths, page_size, extras = q_shape[2] == k_shape[2], 0, ()
            empty = q.numel() == 0 or k_shape[2] == 0 or k_shape[-1] == 0 or v_shape[-1] == 0
            query_rows = q_shape[2]
        else:  # per-sequence lengths: the storage's sizes say nothing of any one sequence's
            equal_lengths = False
            page_size = k_shape[2] if self.block_table is not None else 0
            extras = tuple(name for name in ("cache_batch_idx", "cache_leftpad", "seqused_q")
                           if getattr(self, name) is not None)
            empty = q.numel() == 0 or k_shape[-1] == 0 or v_shape[-1] == 0
            query_rows = self.max_seqlen_q if self.max_seqlen_q is not None else q_shape[2]
        return Features(
            device_type=device.type,
            device_index=device.index,
            dtype=q.dtype,
            head_dim=q_shape[-1],
            head_dim_v=v_shape[-1],
            num_heads_q=q_shape[1],
            num_heads_kv=k_shape[1],
            equal_lengths=equal_lengths,
            empty=empty,
            causal=self.causal,
            lower_right=self.lower_right,
            window=self.key_bounds,
            has_softcap=self.softcap > 0,
            has_alibi=slopes is not None,
            has_sinks=sinks is not None,
            mask_dtype=None if mask is None else mask.dtype,
            dropout=self.dropout_p > 0,
            needs_grad=grad and (q.requires_grad or k.requires_grad or v.requires_grad
                                 or any(t is not None and t.requires_grad for t in (mask, slopes, sinks))),
            last_dim_contiguous=((q.stride(-1) == 1 or q_shape[-1] <= 1) and (k.stride(-1) == 1 or k_shape[-1] <= 1)
                                 and (v.stride(-1) == 1 or v_shape[-1] <= 1)),
            want_lse=self.want_lse,
            short_queries=query_rows <= 16,
            mask_needs_grad=mask is not None and mask.requires_grad and grad,
            alibi_needs_grad=slopes is not None and slopes.requires_grad and grad,
            mask_key_padding=mask is not None and all(  # head and query dims absent, size 1 or stride 0
                mask.dim() < -d or mask.shape[d] == 1 or mask.stride(d) == 0 for d in (-3, -2)),
            layout=layout,
            page_size=page_size,
            layout_extras=extras,
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
    if type(dropout_p) is float and 0.0 <= dropout_p <= 1.0:  # the common case, without ABC checks
        return dropout_p
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


def _check_softcap(softcap) -> float:
    if type(softcap) is float and 0.0 <= softcap < math.inf:  # the common case, without ABC checks
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise InvalidInputError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


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
            floats = " or ".join(str(d) for d in mask_dtypes(query.dtype)[1:])
            raise InvalidInputError(
                f"attn_mask must be bool (True = attend) or a float mask of dtype {floats}; got {attn_mask.dtype}"
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
    softcap = _check_softcap(softcap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point tensor, got {type(sinks).__name__}")
        heads = call.q.shape[1]
        if tuple(sinks.shape) != (heads,):
            raise InvalidInputError(f"sinks must hold one logit per query head, shape ({heads},); "
                                    f"got {tuple(sinks.shape)}")
        sinks = sinks.to(call.q.device)  # a (heads,) parameter: no cost worth a refusal
    return replace(call, causal=causal, window=tuple(window), softcap=softcap, sinks=sinks)


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
    left, right = window_pair(window_size)
    softcap = _check_softcap(softcap)
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
    return flash_call(q, k, v, dropout_p, _check_scale(softmax_scale, E), causal, (left, right), softcap,
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
    elif type(attn_mask) is _Tensor:  # on another device: another signature, and the checks' error
        mask = (attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device)
    else:
        return None
    # Which inputs need a gradient, each apart: Features tells a mask that needs one from q, k, v that do.
    grads = _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad,
                                 attn_mask is not None and attn_mask.requires_grad)
    return (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), dtype, device,
            grads, mask, dropout_p, is_causal, scale, enable_gqa)


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
    grads = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad,
                                 alibi_slopes is not None and alibi_slopes.requires_grad)
    # "flash": the same tensors mean another call than under SDPA's signature (the layouts differ)
    return ("flash", q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), dtype, device, grads,
            slopes, dropout_p, softmax_scale, causal, window_size, softcap, return_lse)


# --------------------------------------------------------------------------- per-sequence layouts
#
# Index tensors (cu_seqlens, seqused, block tables, cache positions) are checked for dtype,
# shape and device always. Their *values* (increasing offsets, lengths within max_seqlen, pages
# inside the cache, appends within capacity) can only be read back from the device: a host
# sync per call, which flash-attn never pays and a decode loop cannot afford. So values are
# checked when the tensors are on the CPU (free), and on a GPU only when
# FASTATTN_CHECK_VALUES=1 (a debugging switch: one sync per call). Never while torch.compile
# traces (the values are not known then).

import os as _os


def values_checked(t: torch.Tensor) -> bool:
    """Whether the values of index tensor ``t`` are checked (see above)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _os.environ.get("FASTATTN_CHECK_VALUES", "0").strip().lower() in ("1", "true", "yes")


def window_pair(window_size) -> tuple[int, int]:
    """``window_size`` as (left, right) ints: a tuple, a list or a 2-element integer tensor
    (flash-attn's own tests pass ``torch.randint(0, seqlen_k, (2,))``; reading a tensor's two
    values is one small device read)."""
    if isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2 or window_size.is_floating_point() or window_size.is_complex() \
                or window_size.dtype == torch.bool:
            raise TypeError(f"window_size as a tensor must hold 2 integers, got shape {tuple(window_size.shape)} "
                            f"{window_size.dtype}")
        window_size = tuple(int(w) for w in window_size.tolist())
    if type(window_size) is tuple and len(window_size) == 2:  # the common case, without ABC checks
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return left, right
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise InvalidInputError(f"window_size entries must be >= -1 (-1 = unbounded), got {(left, right)}")
    return left, right


def _index_tensor(name: str, t, shape: tuple, device: torch.device, dims: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.int32, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise InvalidInputError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise InvalidInputError(f"{name} must have shape {dims} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise InvalidInputError(f"{name} is on {t.device} but q is on {device}")
    return t


def _max_seqlen(name: str, value, device: torch.device) -> tuple[Optional[int], Optional[torch.Tensor]]:
    """(the value as an int when known for free, the tensor it came from when it is one).

    A Python int is used as given. A 0-d integer tensor on the CPU is read (no sync). One on a
    GPU is not read: the launch is then sized by the storage (total tokens or cache capacity)
    and programs past a sequence's end exit at once; no host sync and, under torch.compile,
    nothing to specialize on. Pass an int for the tightest launch."""
    if type(value) is int and value >= 0:  # the common case, without ABC checks
        return value, None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a 0-d integer tensor, got a {value.dtype} tensor "
                            f"of shape {tuple(value.shape)}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            n = int(value)
        else:
            return None, value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)
    else:
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(value).__name__}")
    if n < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {n}")
    return n, None


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_name: str, max_n: Optional[int],
                      max_t: Optional[torch.Tensor]) -> None:
    """Values of cu_seqlens: 0 first, non-decreasing, ``total`` last, steps within max_seqlen."""
    if not values_checked(cu):
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise InvalidInputError(f"{name} must start at 0, got {name}[0] = {vals[0]}")
    steps = [b - a for a, b in zip(vals, vals[1:])]
    bad = next((i for i, s in enumerate(steps) if s < 0), None)
    if bad is not None:
        raise InvalidInputError(f"{name} must be non-decreasing, got {name}[{bad}] = {vals[bad]} > "
                                f"{name}[{bad + 1}] = {vals[bad + 1]}")
    if vals[-1] != total:
        raise InvalidInputError(f"{name} must end at the number of tokens ({total}), got {name}[-1] = {vals[-1]}")
    limit = max_n if max_n is not None else (int(max_t) if max_t is not None else None)
    longest = max(steps, default=0)
    if limit is not None and longest > limit:
        i = steps.index(longest)
        raise InvalidInputError(f"{max_name}={limit} is smaller than sequence {i}, which has {longest} tokens "
                                f"({name}[{i + 1}] - {name}[{i}])")


def _check_lengths(name: str, t: Optional[torch.Tensor], low, high, what: str) -> None:
    """Values of a per-sequence length/position tensor within [low, high] (ints or per-sequence lists)."""
    if t is None or not values_checked(t):
        return
    vals = t.tolist()
    for i, n in enumerate(vals):
        lo = low[i] if isinstance(low, list) else low
        hi = high[i] if isinstance(high, list) else high
        if n < lo or (hi is not None and n > hi):
            raise InvalidInputError(f"{name}[{i}] = {n} is outside [{lo}, {hi}] ({what})")


def _check_block_table(block_table: torch.Tensor, num_pages: int, page_size: int, keys: list[int]) -> None:
    """Every page a sequence uses (the first ceil(keys[b] / page_size)) lies inside the cache."""
    if not values_checked(block_table):
        return
    rows = block_table.tolist()
    for b, (row, n) in enumerate(zip(rows, keys)):
        used = -(-n // page_size)
        if used > len(row):
            raise InvalidInputError(f"sequence {b} has {n} keys, more than its {len(row)} pages of {page_size} hold")
        for j, page in enumerate(row[:used]):
            if not 0 <= page < num_pages:
                raise InvalidInputError(f"block_table[{b}, {j}] = {page} points outside the cache "
                                        f"(pages 0..{num_pages - 1})")


def _paged_cache(name: str, cache: torch.Tensor, heads_dim: int) -> int:
    """The page size of a (num_pages, page_size, heads, dim) cache, checked."""
    page_size = cache.shape[1]
    if page_size <= 0 or page_size % 16 != 0:
        raise InvalidInputError(f"{name} has pages of {page_size} tokens (dim 1); fastattn's paged kernels take "
                                "page sizes that are a positive multiple of 16 (16, 32, ..., 256, ...)")
    return page_size


def _flash_extras(Hq: int, B: int, device: torch.device, softmax_scale, E: int, causal, window_size, softcap,
                  alibi_slopes, sinks) -> dict:
    """The flash-attn keyword features shared by the per-sequence front ends, as AttentionCall fields."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = window_pair(window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    softcap = _check_softcap(softcap)
    slopes = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise InvalidInputError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != device:
            raise InvalidInputError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise InvalidInputError(f"alibi_slopes must have shape (nheads,) = ({Hq},) or (batch, nheads) = "
                                    f"({B}, {Hq}); got {tuple(alibi_slopes.shape)}")
        slopes = alibi_slopes.reshape(-1, Hq)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"learnable_sink must be a floating-point tensor, got {type(sinks).__name__}")
        if tuple(sinks.shape) != (Hq,):
            raise InvalidInputError(f"learnable_sink must hold one logit per query head, shape ({Hq},); "
                                    f"got {tuple(sinks.shape)}")
        sinks = sinks.to(device)
    return dict(scale=_check_scale(softmax_scale, E), causal=causal, lower_right=True, window=(left, right),
                softcap=softcap, alibi_slopes=slopes, sinks=sinks)


def from_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, *,
                     seqused_q=None, seqused_k=None, block_table=None, sinks=None,
                     return_lse=False) -> AttentionCall:
    """Validate ``flash_attn_varlen_func`` arguments.

    q: (total_q, Hq, E); k/v: (total_k, Hkv, E) packed like q, or with ``block_table``
    (B, pages_per_seq) a paged cache (num_pages, page_size, Hkv, E) where sequence b's
    length is ``seqused_k[b]`` or else ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``."""
    _check_tensors(("q", "k", "v"), (q, k, v))
    paged = block_table is not None
    if q.dim() != 3:
        raise InvalidInputError(f"q must be 3-d (total_q, nheads, headdim), got shape {tuple(q.shape)}")
    want = 4 if paged else 3
    for name, t in (("k", k), ("v", v)):
        if t.dim() != want:
            raise InvalidInputError(
                f"{name} must be " + ("4-d (num_pages, page_size, nheads_k, headdim) with block_table"
                                      if paged else "3-d (total_k, nheads_k, headdim)") + f", got shape {tuple(t.shape)}")
    total_q, Hq, E = q.shape
    if k.shape[-1] != E:
        raise InvalidInputError(f"q and k must have the same head dim; got {E} and {k.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise InvalidInputError(f"k and v must agree in every dim but the last; got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_heads(Hq, k.shape[-2], v.shape[-2], gqa_allowed=True, hint="")
    device = q.device
    if not isinstance(cu_seqlens_q, torch.Tensor):
        raise TypeError(f"cu_seqlens_q must be a torch.Tensor of dtype torch.int32, got {type(cu_seqlens_q).__name__}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise InvalidInputError(f"cu_seqlens_q must be 1-d (batch + 1,), got shape {tuple(cu_seqlens_q.shape)}")
    B = cu_seqlens_q.shape[0] - 1
    _index_tensor("cu_seqlens_q", cu_seqlens_q, (B + 1,), device, "(batch + 1,)")
    if cu_seqlens_k is None:
        if not (paged and seqused_k is not None):
            raise InvalidInputError("cu_seqlens_k is required (it may be None only with block_table and seqused_k)")
    else:
        _index_tensor("cu_seqlens_k", cu_seqlens_k, (B + 1,), device, "(batch + 1,) like cu_seqlens_q")
    for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k)):
        if t is not None:
            _index_tensor(name, t, (B,), device, "(batch,)")
    mq, mq_t = _max_seqlen("max_seqlen_q", max_seqlen_q, device)
    mk, mk_t = _max_seqlen("max_seqlen_k", max_seqlen_k, device)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, "max_seqlen_q", mq, mq_t)
    if paged:
        page_size = _paged_cache("k", k, 2)
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise InvalidInputError("block_table must be a 2-d int32 tensor (batch, pages_per_seq)")
        _index_tensor("block_table", block_table, (B, block_table.shape[1]), device, "(batch, pages_per_seq)")
        capacity = block_table.shape[1] * page_size
        if cu_seqlens_k is not None and values_checked(cu_seqlens_k):
            vals = cu_seqlens_k.tolist()
            steps = [b - a for a, b in zip(vals, vals[1:])]
            if any(s < 0 for s in steps):
                i = next(i for i, s in enumerate(steps) if s < 0)
                raise InvalidInputError(f"cu_seqlens_k must be non-decreasing, got cu_seqlens_k[{i}] = {vals[i]} > "
                                        f"cu_seqlens_k[{i + 1}] = {vals[i + 1]}")
            keys = steps
        else:
            keys = None
        _check_lengths("seqused_k", seqused_k, 0, capacity, f"a sequence holds at most {capacity} keys in its pages")
        if values_checked(block_table):
            keys = seqused_k.tolist() if seqused_k is not None else keys
            limit = mk if mk is not None else (int(mk_t) if mk_t is not None else None)
            if limit is not None and max(keys, default=0) > limit:
                i = keys.index(max(keys))
                raise InvalidInputError(f"max_seqlen_k={limit} is smaller than sequence {i}, which has {keys[i]} keys")
            _check_block_table(block_table, k.shape[0], page_size, keys)
    else:
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", mk, mk_t)
    if cu_seqlens_k is not None and not paged and seqused_k is not None and values_checked(cu_seqlens_k):
        room = [b - a for a, b in zip(cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])]
        _check_lengths("seqused_k", seqused_k, 0, room, "at most the sequence's keys in cu_seqlens_k")
    if seqused_q is not None and values_checked(seqused_q):
        room = [b - a for a, b in zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:])]
        _check_lengths("seqused_q", seqused_q, 0, room, "at most the sequence's queries in cu_seqlens_q")
    extras = _flash_extras(Hq, B, device, softmax_scale, E, causal, window_size, softcap, alibi_slopes, sinks)
    return AttentionCall(
        q=q.transpose(0, 1).unsqueeze(0),
        k=k.transpose(1, 2) if paged else k.transpose(0, 1).unsqueeze(0),
        v=v.transpose(1, 2) if paged else v.transpose(0, 1).unsqueeze(0),
        dropout_p=_check_dropout(dropout_p), want_lse=return_lse,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=None if paged else cu_seqlens_k,
        max_seqlen_q=mq, max_seqlen_k=mk,
        seqused_q=seqused_q,
        # A paged sequence's keys are pages 0.. of its row: its length is all that cu_seqlens_k says.
        seqused_k=seqused_k if seqused_k is not None or not paged else
        (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32),
        block_table=block_table,
        **extras,
    )


@dataclass(frozen=True, eq=False)
class KVCacheAppend:
    """What :func:`from_kvcache_args` checked for the step before attention: the new keys and
    values (B, L_new, Hkv, E) to write at each sequence's ``cache_seqlens`` (rotated first when
    ``rotary_cos`` is given), and the query rotation."""

    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    cache_seqlens: Optional[torch.Tensor]  # (B,) int32, before the append
    rotary_cos: Optional[torch.Tensor]
    rotary_sin: Optional[torch.Tensor]
    rotary_interleaved: bool
    rotary_per_row: bool  # causal/local: query row i at position cache_seqlens + i; else all at cache_seqlens


def from_kvcache_args(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, sinks=None,
                      return_lse=False) -> tuple[AttentionCall, KVCacheAppend]:
    """Validate ``flash_attn_with_kvcache`` arguments, before anything is written.

    q: (B, L, Hq, E); k_cache/v_cache: (B_cache, S, Hkv, E) or, with ``block_table``
    (B, pages_per_seq), (num_pages, page_size, Hkv, E); k/v: (B, L_new, Hkv, E) to append.
    Returns the attention call as it is after the append (each sequence's keys end at
    ``cache_seqlens + L_new``) and what to append."""
    _check_tensors(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise InvalidInputError(f"{name} must be 4-d, got shape {tuple(t.shape)}")
    B, Lq, Hq, E = q.shape
    device = q.device
    paged = block_table is not None
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise InvalidInputError(f"k_cache and v_cache must agree in every dim but the last; got "
                                f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[-1] != E:
        raise InvalidInputError(f"q and k_cache must have the same head dim; got {E} and {k_cache.shape[-1]}")
    Hkv = k_cache.shape[2]
    _check_heads(Hq, Hkv, v_cache.shape[2], gqa_allowed=True, hint="")
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise InvalidInputError("block_table must be a 2-d int32 tensor (batch, pages_per_seq)")
        _index_tensor("block_table", block_table, (B, block_table.shape[1]), device, "(batch, pages_per_seq)")
        page_size = _paged_cache("k_cache", k_cache, 2)
        capacity = block_table.shape[1] * page_size
        if cache_batch_idx is not None:
            raise InvalidInputError("cache_batch_idx cannot be used with block_table (a sequence's pages say where it is)")
        if cache_leftpad is not None:
            raise InvalidInputError("cache_leftpad cannot be used with block_table")
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] != B:
            raise InvalidInputError(f"k_cache has {k_cache.shape[0]} batch entries but q has {B}; pass cache_batch_idx "
                                    "to choose entries")
    if cache_batch_idx is not None:
        _index_tensor("cache_batch_idx", cache_batch_idx, (B,), device, "(batch,)")
        _check_lengths("cache_batch_idx", cache_batch_idx, 0, k_cache.shape[0] - 1, "an entry of k_cache")
    if cache_leftpad is not None:
        _index_tensor("cache_leftpad", cache_leftpad, (B,), device, "(batch,)")
    new_len = 0
    if (k is None) != (v is None):
        raise InvalidInputError("k and v must be given together (the new keys and values to append)")
    if k is not None:
        _check_tensors(("k", "v", "q"), (k, v, q))
        if k.dim() != 4 or tuple(k.shape[:3]) != (B, k.shape[1], Hkv) or k.shape[-1] != E:
            raise InvalidInputError(f"k must be (batch, seqlen_new, nheads_k, headdim) = ({B}, L_new, {Hkv}, {E}), "
                                    f"got {tuple(k.shape)}")
        if v.dim() != 4 or tuple(v.shape) != (*k.shape[:3], v_cache.shape[-1]):
            raise InvalidInputError(f"v must be {(*k.shape[:3], v_cache.shape[-1])} like k, got {tuple(v.shape)}")
        new_len = k.shape[1]
    if cache_seqlens is None:
        seqlens = None
        if new_len:
            raise InvalidInputError("appending k/v needs cache_seqlens (where each sequence's new tokens go)")
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=device)
    else:
        seqlens = _index_tensor("cache_seqlens", cache_seqlens, (B,), device, "(batch,), or an int")
    leftpad_vals = cache_leftpad.tolist() if cache_leftpad is not None and values_checked(cache_leftpad) else 0
    if cache_leftpad is not None:
        _check_lengths("cache_leftpad", cache_leftpad, 0, capacity, f"the cache holds {capacity} tokens")
    _check_lengths("cache_seqlens", seqlens, leftpad_vals, capacity - new_len,
                   f"appending {new_len} tokens to a cache of {capacity} per sequence" if new_len else
                   f"the cache holds {capacity} tokens per sequence")
    rotary_per_row = causal or tuple(window_pair(window_size)) != (-1, -1)
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None:
            raise InvalidInputError("rotary_cos and rotary_sin must be given together")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise InvalidInputError(f"{name} must be a 2-d float tensor (seqlen_ro, rotary_dim / 2)")
            if t.device != device:
                raise InvalidInputError(f"{name} is on {t.device} but q is on {device}")
        if rotary_cos.shape != rotary_sin.shape:
            raise InvalidInputError(f"rotary_cos and rotary_sin must have the same shape; got "
                                    f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if not 0 < 2 * rotary_cos.shape[1] <= E:
            raise InvalidInputError(f"rotary_dim = 2 x rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} must be in "
                                    f"(0, headdim = {E}]")
        if seqlens is None:
            raise InvalidInputError("rotary embedding needs cache_seqlens (the position of the first new token)")
        if values_checked(seqlens):
            start = seqlens.max().item() if B else 0  # rotary positions are cache indices (as flash-attn)
            need = start + max(new_len, Lq if rotary_per_row else 1)
            if need > rotary_cos.shape[0]:
                raise InvalidInputError(f"rotary_cos has {rotary_cos.shape[0]} positions but position {need - 1} "
                                        "is needed")
    extras = _flash_extras(Hq, B, device, softmax_scale, E, causal, window_size, softcap, alibi_slopes, sinks)
    seqused_k = None
    if seqlens is not None:
        seqused_k = seqlens + new_len if new_len else seqlens
    elif paged or cache_leftpad is not None or cache_batch_idx is not None:
        seqused_k = torch.full((B,), capacity, dtype=torch.int32, device=device)
    if paged:
        keys = seqused_k.tolist() if values_checked(block_table) else None
        if keys is not None:
            _check_block_table(block_table, k_cache.shape[0], page_size, keys)
    call = AttentionCall(
        q=q.transpose(1, 2), k=k_cache.transpose(1, 2), v=v_cache.transpose(1, 2),
        want_lse=return_lse, seqused_k=seqused_k, block_table=block_table,
        max_seqlen_q=Lq, max_seqlen_k=capacity if paged else None,
        cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx, **extras)
    append = KVCacheAppend(k, v, seqlens, rotary_cos, rotary_sin, bool(rotary_interleaved), rotary_per_row)
    return call, append
