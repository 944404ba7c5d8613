"""Hugging Face Transformers integration: the one module that touches Transformers internals.

Three ways in, all ending in :func:`attention_forward`, which turns Transformers'
arguments into a validated :class:`~fastattn.inputs.AttentionCall` and runs it
through fastattn's dispatcher (the Triton kernel where it applies, else an exact
fallback):

- ``from_pretrained(..., attn_implementation="fastattn")`` (also ``from_config``
  and ``model.set_attn_implementation("fastattn")``): ``import fastattn``
  registers the name with ``AttentionInterface`` *and* ``AttentionMaskInterface``
  (a name without a mask function silently gets ``attention_mask=None``).
- ``fastattn.patch()`` / ``import fastattn.auto``: every model using Transformers'
  ``"sdpa"`` attention runs through fastattn, loaded models included;
  ``fastattn.unpatch()`` puts the original back.
- ``fastattn.patch(model)``: switch one loaded model.

Continuous batching (``model.generate_batch``) on a "fastattn" model runs each packed batch
as one varlen call (see the "continuous batching" section below for what it relies on).

Semantics follow Transformers' own SDPA path (``integrations/sdpa_attention.py``)
so that outputs match it: the same causality rule, the same treatment of
``position_bias``, and masks produced by the same mask functions. What SDPA
ignores or rejects (``softcap``, ``s_aux`` sinks, ``output_attentions``) is
computed exactly, never dropped.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .. import dispatch
from .._env import interpreting
from ..backends.sdpa import math_attention
from ..inputs import (HALF_DTYPES, AttentionCall, check_sdpa_args, from_varlen_args, holds_as_is, mask_dtypes,
                      sdpa_call, sdpa_signature, with_extras)
from ..testing import MODEL_TOLERANCES
from .masks import CausalPaddingMask

__all__ = [
    "NAME",
    "attention_forward",
    "mask_function",
    "register",
    "register_continuous_batching",
    "paged_attention_forward",
    "patch",
    "unpatch",
    "is_patched",
    "set_attn_implementation",
    "check",
    "record_backends",
    "CallRecord",
]

NAME = "fastattn"  # no "flash", "sdpa" or "/": Transformers gives those names special meanings

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------- which backend ran


@dataclass(frozen=True)
class CallRecord:
    """One attention call as run by :func:`attention_forward`."""

    module: str  # e.g. "LlamaAttention[layer 0]"
    backend: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # (B, Hq, L, S)
    why_not_triton: tuple[str, ...]  # the triton backend's reasons when it did not run
    backward: Optional[str] = None  # the backend whose backward differentiates the call (None: no grad needed)
    layout: str = "dense"  # the call's K/V layout: "dense", "varlen" or "paged"


_records: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("fastattn_hf_records", default=None)
# Recorders opened with all_threads=True: a thread starts with a fresh context, so calls made on
# another thread (continuous batching's generation loop) reach these alone.
_all_thread_records: list[list] = []


@contextlib.contextmanager
def record_backends(all_threads: bool = False) -> Iterator[list[CallRecord]]:
    """Collect a :class:`CallRecord` for every attention call made inside the block: the calls
    of this thread (and of the tasks it starts, which copy its context), or with
    ``all_threads=True`` those of every thread while the block runs, e.g. the background
    thread in which ``model.generate_batch(...)`` runs the model."""
    records: list[CallRecord] = []
    token = _records.set(records)
    if all_threads:
        _all_thread_records.append(records)
    try:
        yield records
    finally:
        _records.reset(token)
        if all_threads:
            _all_thread_records.remove(records)


WEIGHTS_REASON = "output_attentions=True: the attention weights come from exact eager math"


def _record(module, call: AttentionCall, with_weights: bool = False) -> None:
    records = _records.get()
    if records is None and not _all_thread_records:
        return
    layer = getattr(module, "layer_idx", None)
    name = type(module).__name__ + (f"[layer {layer}]" if layer is not None else "")
    if with_weights:  # no backend is asked: only the eager math returns the weights
        backend, triton_reasons = "sdpa", (WEIGHTS_REASON,)
    else:
        decision = dispatch.explain_call(call)
        backend = decision.chosen or "none"
        triton_reasons = () if backend == "triton" else dict(decision.verdicts).get("triton", ("not registered",))
    backward = backend if call.features.needs_grad else None  # one backend runs both directions
    record = CallRecord(name, backend, call.q.dtype, (call.q.shape[0], call.q.shape[1], call.seqlen_q, call.seqlen_k),
                        tuple(triton_reasons), backward, call.layout)
    if records is not None:
        records.append(record)
    for other in tuple(_all_thread_records):  # list.append is atomic: safe from any thread
        if other is not records:
            other.append(record)


# --------------------------------------------------------------------------- dtypes


def _as_dtype(value) -> Optional[torch.dtype]:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def _device_type(t: torch.Tensor) -> str:
    """``t.device.type``, without making a device object for the two usual ones (a quarter of a
    microsecond a call)."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


def _compute_dtype(module, device_type: str) -> Optional[torch.dtype]:
    """The half-precision dtype fp32 activations should run in, or None to keep fp32.

    Autocast first (what the user asked for), then a quantized model's compute
    dtype / model dtype (PEFT k-bit training upcasts norms and adapters to fp32,
    so the module's own parameters say nothing there), else the dtype of the
    module's floating-point parameters.
    """
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in HALF_DTYPES else None
    config = getattr(module, "config", None)
    quant = _quantization_config(module, config)
    if quant is not None:
        compute = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else getattr(quant, "bnb_4bit_compute_dtype", None)
        for candidate in (_as_dtype(compute), _as_dtype(getattr(config, "dtype", None))):
            if candidate in HALF_DTYPES:
                return candidate
        return None
    param = _first_float_parameter(module)
    if param is not None:
        return param.dtype if param.dtype in HALF_DTYPES else None
    dtype = _as_dtype(getattr(config, "dtype", None))
    return dtype if dtype in HALF_DTYPES else None


_QUANT = "_fastattn_quantization_config"  # (config, its quantization_config), in the module's __dict__


def _quantization_config(module, config):
    """``config.quantization_config``, read once per config object: an attribute a Transformers
    config does not have costs microseconds to miss, on every attention call."""
    cached = module.__dict__.get(_QUANT)
    if cached is None or cached[0] is not config:
        cached = module.__dict__[_QUANT] = (config, getattr(config, "quantization_config", None))
    return cached[1]


_PROBE = "_fastattn_dtype_probe"  # (owner module, parameter name, parameter) or None, in the module's __dict__


def _first_float_parameter(module) -> Optional[torch.nn.Parameter]:
    """The module's first floating-point parameter, found once per module (a walk over its
    submodules costs microseconds per attention call) and read again each call: ``.to()`` and
    ``.half()`` change a parameter's dtype in place, and a parameter replaced by another is
    noticed (the owner no longer holds it) and looked up afresh."""
    probe = module.__dict__.get(_PROBE)
    if probe is not None and probe[0]._parameters.get(probe[1]) is probe[2]:
        return probe[2]
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None and param.is_floating_point():
                module.__dict__[_PROBE] = (owner, name, param)
                return param
    module.__dict__.pop(_PROBE, None)
    return None


# --------------------------------------------------------------------------- the attention function


def _positions(module, L: int, mask, compact, kwargs) -> tuple[bool, tuple[int, int]]:
    """(causal, window) of a call, with the semantics of Transformers' SDPA path."""
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As Transformers' SDPA path: causal only with no mask (a mask already holds the
    # causal pattern) and never for one query (decoding sees every cached key). With
    # no mask and more keys than queries (prefill into an empty static cache) the
    # alignment stays top-left, as SDPA's: the keys past the queries are not filled yet.
    causal = bool(is_causal) and L > 1 and mask is None
    # top-left: key j visible when j <= i + diag (a diag past the last key, as in every decode
    # step, bounds nothing: AttentionCall.key_bounds drops it)
    window = (compact[2], compact[1]) if compact is not None else (-1, -1)
    sliding_window = kwargs.get("sliding_window")
    if causal and sliding_window is not None and sliding_window > 0:
        # Transformers' window includes the current token: kv_idx > q_idx - W, i.e. W - 1 keys to the left.
        # With a mask, the mask function has already applied it (in absolute positions).
        window = (int(sliding_window) - 1, 0)
    return causal, window


def _build_call(module, query, key, value, attention_mask, dropout, scaling, kwargs) -> AttentionCall:
    """Transformers' arguments -> one validated AttentionCall, with the semantics of
    Transformers' SDPA path (``sdpa_attention_forward``)."""
    return _build_call_and_layout(module, query, key, value, attention_mask, dropout, scaling, kwargs)[0]


def _build_call_and_layout(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """:func:`_build_call`, and the call's ``inputs.SDPALayout`` (None for a packed batch run as varlen)."""
    L, S = query.shape[2], key.shape[2]
    mask = attention_mask
    compact = None if kwargs.get("position_bias") is not None else _compact_causal_padding(mask, query.shape[0], L, S)
    if compact is not None:  # the same visibility as the full mask; the kernel skips what causal rules out
        mask = compact[0]
    else:
        mask = _plain_mask(mask)
    causal, window = _positions(module, L, mask, compact, kwargs)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if mask is None and cu_q is not None and query.shape[0] == 1 and (cu_q.numel() > 2 or S != L):
        # Padding-free batch handed over without a mask: each packed sequence to itself, as varlen.
        # One sequence with more keys than queries too (continuous batching: a chunk of a prompt, a
        # decode step): its keys are all real, cached ones first, so its diagonal is bottom-right.
        if kwargs.get("block_table") is not None:
            raise NotImplementedError(_BLOCK_TABLE_PATH)
        return _packed_call(module, query, key, value, cu_q, cu_k if cu_k is not None else cu_q,
                            kwargs.get("max_length_q"), kwargs.get("max_length_k"), dropout, scaling, kwargs), None
    if (mask is None and query.shape[0] == 1 and L == S and L > 1 and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions")):
        # No mask but position_ids that restart (a padding-free batch whose mask was skipped,
        # e.g. a model that made a cache in training): separate sequences, as flash-attn's path does.
        packed = _packed_from_position_ids(kwargs.get("position_ids"), L)
        if packed is not None:
            cu, longest = packed
            return _packed_call(module, query, key, value, cu, cu, longest, longest, dropout, scaling, kwargs), None
    keys = _unpadded_keys(query, key, value, mask, dropout, kwargs, query.dtype)
    if keys is not None:
        planned = _unpadded_call(query, key, value, keys, scaling, kwargs)
        if planned is not None:
            return planned
    packed = _packed_sequences(mask, query.shape[0], L, S)
    if packed is not None and kwargs.get("position_bias") is None:  # packed position_ids: the mask's own varlen form
        cu, longest, window = packed
        return _packed_call(module, query, key, value, cu, cu, longest, longest, dropout, scaling, kwargs,
                            window=window), None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style additive bias, combined as Transformers does
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, torch.finfo(position_bias.dtype).min)
        else:
            mask = position_bias + mask
    # A mask built here (cu_seq_lens, position_bias) keeps causal and the window beside it:
    # both backends apply them together, top-left as Transformers' masks do, and the
    # kernel skips the key blocks they rule out.
    if mask is not None and mask.dtype not in mask_dtypes(query.dtype):
        mask = mask.float()

    call, layout = check_sdpa_args(query, key, value, attn_mask=mask, dropout_p=float(dropout or 0.0),
                                   is_causal=False, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    call = with_extras(call, causal=causal, window=window, softcap=kwargs.get("softcap") or 0.0,
                       sinks=kwargs.get("s_aux"))
    return call, layout


def _signature(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """(signature, mask, causal, window) of a call the fast path takes: the signature is everything
    :func:`_build_call` and the checks read (see ``inputs.sdpa_signature``), ``mask`` the one the
    call runs with; (None, ...) for what only the full path handles (position_bias, cu_seq_lens,
    output_attentions, arguments of unusual types)."""
    get = kwargs.get
    softcap, sinks, sliding_window = get("softcap"), get("s_aux"), get("sliding_window")
    if (get("output_attentions") or get("position_bias") is not None or get("cu_seq_lens_q") is not None
            or type(dropout) is not float or (softcap is not None and type(softcap) is not float)
            or (sliding_window is not None and type(sliding_window) is not int)
            or (sinks is not None and type(sinks) not in (torch.Tensor, torch.nn.Parameter))
            or type(query) is not torch.Tensor or type(key) is not torch.Tensor or query.dim() != 4 or key.dim() != 4):
        return None, None, False, (-1, -1)
    B, Hq, L, _ = query.shape  # (each .shape makes a new torch.Size: read once)
    if (getattr(attention_mask, _PACKED, None) is not None
            or (attention_mask is None and B == 1 and L > 1 and get("position_ids") is not None)):
        return None, None, False, (-1, -1)  # packed sequences, perhaps: the full path tells (and runs varlen)
    dtype = query.dtype
    target = _compute_dtype(module, _device_type(query)) if dtype is torch.float32 else None
    if _unpadded_keys(query, key, value, attention_mask, dropout, kwargs, target or dtype) is not None:
        return None, None, False, (-1, -1)  # a padded encoder batch run unpadded: the full path builds its call
    _, Hkv, S, _ = key.shape
    compact = None if attention_mask is None else _compact_causal_padding(attention_mask, B, L, S)
    mask = _plain_mask(attention_mask) if compact is None else compact[0]
    if mask is not None and mask.dtype not in mask_dtypes(target or dtype):
        return None, None, False, (-1, -1)  # made float32 on the full path
    causal, window = _positions(module, L, mask, compact, kwargs)
    tensors = sdpa_signature(query, key, value, mask, dropout, False, scaling, Hq != Hkv)
    if tensors is None:
        return None, None, False, (-1, -1)
    extras = (softcap, None if sinks is None else (sinks.shape, sinks.dtype, sinks.device,
                                                   sinks.requires_grad and torch.is_grad_enabled()))
    return ("transformers", tensors, target, causal, window, extras), mask, causal, window


def _packed_call(module, query, key, value, cu_q, cu_k, max_q, max_k, dropout, scaling, kwargs,
                 window: Optional[tuple[int, int]] = None) -> AttentionCall:
    """A padding-free batch (one row of packed sequences) as a varlen call: no (L, S) mask,
    each sequence causal on its own, the kernel never visits another sequence's keys.
    ``window``: the causal window the model's mask applies (packed position_ids), else
    causality and the window come from the module and kwargs as on the dense path."""
    if window is not None:
        causal = True
    else:
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        window = (-1, -1)
        sliding_window = kwargs.get("sliding_window")
        if causal and sliding_window is not None and sliding_window > 0:
            window = (int(sliding_window) - 1, 0)  # Transformers' window includes the current token
    L, S = query.shape[2], key.shape[2]
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    return from_varlen_args(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
        L if max_q is None else max_q, S if max_k is None else max_k,  # the row's length bounds every sequence
        float(dropout or 0.0), scaling, causal, window, kwargs.get("softcap") or 0.0, sinks=kwargs.get("s_aux"))


# --------------------------------------------------------------------------- padded encoder batches, unpadded

# The padding fraction (of the keys) from which a padded batch with a bidirectional padding mask
# (BERT-style encoders) runs as varlen, each sequence against its own keys only, instead of the
# masked kernel over all keys. NOT YET MEASURED ON A GPU: a guess until the GPU check's `unpadded`
# stage (benchmarks/unpadded.py) shows where the varlen kernel starts to win.
UNPADDED_MIN_PADDING = 0.25
# Calls with this many queries or fewer (a decoder's cross-attention while generating: a new mask
# every step) keep the masked call: its cached plan costs less host time than the varlen call's
# set-up (and one device read per mask), which would dominate so little compute.
UNPADDED_MIN_QUERIES = 16

# The bidirectional padding mask mask_function builds (a stride-0 view of the (B, S) padding)
# carries that padding, and once read, its varlen form: every layer gets the same mask object,
# so the key lengths and the gather index are worked out once per forward.
_KEY_PADDING = "_fastattn_key_padding"
_UNPADDED = "_fastattn_unpadded"  # (padding's version, (fraction, cu_seqlens_q, cu_seqlens_k, seqused_k, key index))


def _key_layout(mask: torch.Tensor):
    """(padding fraction, cu_seqlens_q, cu_seqlens_k, seqused_k, key index) of a key-padding mask,
    worked out once per mask: one device read (two when the valid keys are not each row's prefix).
    Queries: every row of every batch (padded query rows attend to their batch's keys, as in the
    masked computation). Keys: right padding (each row's valid keys a prefix, as tokenizers pad)
    keeps K/V where they are, each sequence using its first ``seqused_k`` keys; any other padding
    gathers the valid keys (``key index`` into the (B * S) rows). Worked out afresh after a write
    into the mask (the padding's version counter, which the mask view shares, tells)."""
    padding = getattr(mask, _KEY_PADDING)
    found = getattr(mask, _UNPADDED, None)
    if found is None or found[0] != padding._version:
        B, S = padding.shape
        L = mask.shape[2]
        lengths = padding.sum(-1, dtype=torch.int32)
        prefix = (padding == (torch.arange(S, device=padding.device) < lengths[:, None])).all()
        valid, is_prefix = torch.stack([lengths.sum(), prefix.to(lengths.dtype)]).tolist()  # one device read
        steps = torch.arange(B + 1, dtype=torch.int32, device=padding.device)
        if is_prefix:
            cu_k, seqused, index = steps * S, lengths, None
        else:
            cu_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            seqused, index = None, padding.reshape(-1).nonzero().squeeze(1)
        found = (padding._version, (1.0 - valid / (B * S), steps * L, cu_k, seqused, index))
        setattr(mask, _UNPADDED, found)
    return found[1]


def _unpadded_keys(query, key, value, mask, dropout, kwargs, dtype):
    """The mask's varlen form (see :func:`_key_layout`) when this call runs unpadded: a
    bidirectional key-padding mask of :func:`mask_function` with at least UNPADDED_MIN_PADDING of
    the keys padded, more than UNPADDED_MIN_QUERIES queries, half precision for the kernel, no
    dropout, no gradient (training keeps the masked kernel: the unpadded path's gradients through
    the key gather are not tested yet); else None."""
    if mask is None or getattr(mask, _KEY_PADDING, None) is None or torch.compiler.is_compiling():
        return None
    if (dtype not in HALF_DTYPES or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions") or (query.device.type != "cuda" and not interpreting())):
        return None
    sinks = kwargs.get("s_aux")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                    or (isinstance(sinks, torch.Tensor) and sinks.requires_grad)):
        return None
    if mask.shape != (query.shape[0], 1, query.shape[2], key.shape[2]) or mask.shape[3] == 0:
        return None
    if query.shape[2] <= UNPADDED_MIN_QUERIES:
        return None
    keys = _key_layout(mask)
    return keys if keys[0] >= UNPADDED_MIN_PADDING else None


@dataclass(frozen=True)
class _Unpadded:
    """The layout of a padded batch run unpadded (varlen): its plan, made when it was chosen."""

    plan: dispatch.Plan


def _unpadded_call(query, key, value, keys, scaling, kwargs) -> Optional[tuple[AttentionCall, _Unpadded]]:
    """A padded batch with a key-padding mask as a varlen call, and its layout (None when no
    kernel would run it: the masked call is then the better one). Query rows stay in
    place, so the output is (B, L, Hq, Dv) as the masked call's; no compute goes to padded keys."""
    _, cu_q, cu_k, seqused_k, index = keys
    B, Hq, L, E = query.shape
    S = key.shape[2]
    q = query.transpose(1, 2).reshape(B * L, Hq, E)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], E)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], value.shape[3])
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    sinks = kwargs.get("s_aux")
    call = from_varlen_args(q, k, v, cu_q, cu_k, L, S, 0.0, scaling, False, (-1, -1), kwargs.get("softcap") or 0.0,
                            seqused_k=seqused_k, sinks=None if sinks is None else sinks.to(query.device))
    plan = dispatch.plan(call, None)
    # A kernel reads each sequence's lengths; the exact fallback would run sequence by sequence.
    return (call, _Unpadded(plan)) if plan.backend.name != "sdpa" else None


def _eager_with_weights(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention spelled out in fp32, returning the probabilities too (output_attentions)."""
    out, _, probs = math_attention(call, return_probs=True)
    return out, probs


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Transformers' attention-function interface.

    query ``(B, Hq, L, D)``, key/value ``(B, Hkv, S, D/Dv)`` (often non-contiguous
    views), ``attention_mask`` as made by :func:`mask_function` (or Transformers'
    ``sdpa_mask`` when patched in as ``"sdpa"``): None, bool (True = attend) or
    additive float, broadcastable to ``(B, Hq, L, S)``. Returns
    ``((B, L, Hq, Dv) contiguous, None)``; with ``output_attentions=True`` the
    second item is the attention probabilities (computed by exact eager math).

    Keyword arguments real models pass: ``is_causal``, ``sliding_window``,
    ``softcap`` (Gemma2), ``s_aux`` (GPT-OSS sinks), ``position_bias`` (T5),
    ``cu_seq_lens_q/k`` (padding-free batches); the rest are ignored as SDPA does.
    """
    in_dtype = query.dtype
    # A call like an earlier one (same shapes, strides, dtypes, devices, flags, mask kind) in the
    # same dispatch state reuses its checks and decision (dispatch.Plan).
    signature, mask, causal, window = (None, None, False, (-1, -1)) if torch.compiler.is_compiling() else _signature(
        module, query, key, value, attention_mask, dropout, scaling, kwargs)
    plan = dispatch.cached_plan(signature)
    if plan is None:
        return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, signature, mask)
    target = signature[2]
    if target is not None:  # the upcast of fp32 activations in a half model (warned about on the first call)
        query, key, value = query.to(target), key.to(target), value.to(target)
    if plan.as_is is not None and _records.get() is None and not _all_thread_records:
        out = plan.as_is(query, key, value, mask, dropout, scaling)
    else:
        sinks = kwargs.get("s_aux")
        call = sdpa_call(query, key, value, mask, plan.layout, dropout_p=dropout, causal=causal, window=window,
                         softcap=kwargs.get("softcap") or 0.0, sinks=None if sinks is None else sinks.to(query.device),
                         features=plan.features)
        _record(module, call)
        out, _ = plan.backend.run(call)
    out = out.transpose(1, 2).contiguous()
    if out.dtype != in_dtype:
        out = out.to(in_dtype)
    return out, None


def _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, signature, mask):
    """:func:`attention_forward`'s full path: every check, then a plan for the calls like this one
    (``signature`` and ``mask`` as :func:`_signature` gives them)."""
    in_dtype = query.dtype
    if in_dtype == torch.float32:
        target = _compute_dtype(module, query.device.type)
        if target is not None:
            _warn_once(f"upcast-{target}",
                       f"fastattn: float32 activations reached the attention of a {target} model "
                       "(norms upcast for k-bit training?); attention runs in " f"{target} and returns float32")
            query, key, value = query.to(target), key.to(target), value.to(target)
    call, layout = _build_call_and_layout(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    # Device maps need no device switch here: each backend launches on the tensors' own device
    # and its current stream (the Triton launcher's device guard, the CUDA op's CUDAGuard, torch).
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions",
                   "fastattn: output_attentions=True computes attention with eager math (slower) to return the weights")
        _record(module, call, with_weights=True)
        out, weights = _eager_with_weights(call)
    else:
        _record(module, call)
        if type(layout) is _Unpadded:  # planned when it was chosen over the masked call
            plan = layout.plan
        else:
            if layout is None:  # a packed batch run as varlen: nothing to keep for later calls
                signature = None
            plan = dispatch.plan(call, signature, layout, as_is=layout is not None and holds_as_is(call, query, key,
                                                                                                  value, mask))
        out, _ = plan.backend.run(call)
        weights = None
    out = out.transpose(1, 2).contiguous()
    if layout is None or type(layout) is _Unpadded:  # varlen: (1, total_q, Hq, Dv), every batch's L rows
        out = out.view(query.shape[0], query.shape[2], *out.shape[2:])
    if out.dtype != in_dtype:
        out = out.to(in_dtype)
    return out, weights


# --------------------------------------------------------------------------- the mask function


# A causal mask with padding (prefill, q_length > 1) is a CausalPaddingMask: (B, 1, L, S) to every
# reader, held as the (B, S) key padding and the diagonal. attention_forward runs that form
# (causal in the kernel, which skips the blocks above the diagonal, and one mask row per batch);
# nothing of size L x S is built unless another reader asks for the values (a copy, a partial
# slice, a comparison, torch's SDPA), which then get sdpa_mask's exactly.


def _padding_row(attention_mask: torch.Tensor, kv_offset: int, kv_length: int, device) -> torch.Tensor:
    """(B, kv_length) bool: the 2-D padding mask for keys kv_offset.., padded with False."""
    padding = attention_mask.to(device=device, dtype=torch.bool)
    short = kv_offset + kv_length - padding.shape[-1]
    if short > 0:
        padding = torch.nn.functional.pad(padding, (0, short))
    padding = padding[:, kv_offset:kv_offset + kv_length]
    # A snapshot: the caller's 2-D mask may be edited in place later (the 4-D mask is a copy too).
    shared = padding.untyped_storage().data_ptr() == attention_mask.untyped_storage().data_ptr()
    return padding.clone() if shared else padding


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size=None,
                  allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                  use_vmap: bool = False, device="cpu", **kwargs):
    """The mask for ``attn_implementation="fastattn"``: exactly Transformers' ``sdpa_mask``
    (None where SDPA would use ``is_causal``, else a (B, 1, L, S) bool mask), except that a
    plain bidirectional padding mask is returned as a stride-0 view of the (B, S) padding
    instead of a materialized (B, 1, L, S) tensor (same values; the kernel reads it as is),
    and a plain causal mask with padding (q_length > 1) is a :class:`~fastattn.integrations.masks.CausalPaddingMask`,
    the same values held as the padding and the diagonal."""
    masking_utils = _masking_utils()
    factory = masking_utils.causal_mask_function if mask_function is None else mask_function
    plain = (not use_vmap and local_size is None and attention_mask is not None and attention_mask.dim() == 2
             and not torch.compiler.is_compiling())
    if plain and factory is masking_utils.bidirectional_mask_function:
        padding = _padding_row(attention_mask, kv_offset, kv_length, device)
        if allow_is_bidirectional_skip and bool(padding.all()):
            return None
        mask = padding[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
        if padding.shape[0] == batch_size:
            setattr(mask, _KEY_PADDING, padding)  # its varlen form, for attention_forward
        return mask
    offsets_known = isinstance(q_offset, numbers.Integral) and isinstance(kv_offset, numbers.Integral)  # StaticCache: tensors
    if (plain and q_length == 1 and offsets_known and factory is masking_utils.causal_mask_function
            and kv_offset + kv_length - 1 <= q_offset):
        # A decode step that sees every key causally: the mask is the padding row, which is what
        # sdpa_mask computes here (None when nothing is padded and skipping is allowed) at a
        # fraction of its cost, a (B, 1, 1, S) view instead of a new tensor.
        padding = _padding_row(attention_mask, kv_offset, kv_length, device)
        if allow_is_causal_skip and bool(padding.all()):
            return None
        padding = padding[:, None, None, :]
        return padding if padding.shape[0] == batch_size else padding.expand(batch_size, 1, 1, kv_length)
    # Causal or sliding-window causal ((W - 1, 0)), with padding, prefill: no (B, 1, L, S) tensor.
    window = _causal_window(factory, masking_utils) if q_length > 1 and offsets_known else None
    if (window is not None and not use_vmap and attention_mask is not None and attention_mask.dim() == 2
            and attention_mask.dtype == torch.bool and attention_mask.shape[0] == batch_size
            and 0 <= q_offset - kv_offset <= (window[0] if window[0] >= 0 else q_offset - kv_offset)
            and not torch.compiler.is_compiling()):
        # sdpa_mask's None cases, by its own helpers (they read the padding: one device sync, as there)
        padded = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if allow_is_causal_skip and masking_utils._ignore_causal_mask_sdpa(padded, q_length, kv_length, q_offset,
                                                                          kv_offset, local_size):
            return None
        if allow_is_bidirectional_skip and masking_utils._ignore_bidirectional_mask_sdpa(padded, kv_length,
                                                                                         local_size):
            return None
        # sdpa_mask's causal rule: key kv_offset + j is visible to query q_offset + i when
        # kv_offset + j <= q_offset + i, i.e. j <= i + (q_offset - kv_offset); a sliding window of
        # W also needs kv_offset + j > q_offset + i - W, i.e. j >= i + (q_offset - kv_offset) - (W - 1).
        # (A diagonal past the window's width, W - 1, would need a left bound the kernel has no
        # spelling for: that mask is built in full below.)
        padding = _padding_row(attention_mask, kv_offset, kv_length, device)
        return CausalPaddingMask(padding, int(q_offset) - int(kv_offset), q_length, window[0])
    mask = masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, mask_function=factory, attention_mask=attention_mask,
                                   local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                                   allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                                   device=device, **kwargs)
    if (mask is not None and attention_mask is None and batch_size == 1 and q_length == kv_length
            and not torch.compiler.is_compiling() and not use_vmap):
        found = _packed_sequence_ids(factory, masking_utils)
        if found is not None and tuple(found[0].shape) == (1, q_length):  # cumulative sums: non-decreasing
            setattr(mask, _PACKED, (*_packed_boundaries(found[0].to(mask.device)), found[1]))
    return mask


# A causal mask over packed sequences (position_ids that restart, no attention_mask: Transformers'
# padding-free training, e.g. DataCollatorWithFlattening without flash kwargs) also carries the
# sequences' boundaries: (cu_seqlens int32, longest length). attention_forward runs it as varlen.
_PACKED = "_fastattn_packed"


def _closure(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells))) if hasattr(fn, "__code__") else {}


def _and_parts(fn) -> Optional[tuple]:
    """The mask functions of Transformers' ``and_masks(...)``, or None."""
    if getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(fn).get("mask_functions")
    return parts if isinstance(parts, tuple) else None


def _causal_window(fn, masking_utils) -> Optional[tuple[int, int]]:
    """(left, right) key bounds when ``fn`` is ``causal_mask_function`` (-1, 0) or
    ``sliding_window_causal_mask_function(W)`` (W - 1, 0); None for anything else."""
    if fn is masking_utils.causal_mask_function:
        return (-1, 0)
    parts = _and_parts(fn)
    if parts is None or len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return None
    overlay = parts[0]
    width = _closure(overlay).get("sliding_window")
    if (getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask"
            or not isinstance(width, int) or width <= 0):
        return None
    return (width - 1, 0)  # kv_idx > q_idx - W: W - 1 keys to the left


def _packed_sequence_ids(factory, masking_utils) -> Optional[tuple[torch.Tensor, tuple[int, int]]]:
    """The (B, L) sequence ids and the causal window when ``factory`` is what Transformers'
    create_causal_mask / create_sliding_window_causal_mask build for packed position_ids:
    ``and_masks(remap_positions_for_packed_sequence(<causal or sliding causal>, ...),
    packed_sequence_mask_function(ids))`` (5.24), or ``and_masks(<causal or sliding causal>,
    packed_sequence_mask_function(ids))`` without the remapping (5.17: causality and the window
    in absolute positions, the same as per-sequence ones within a sequence); None for anything
    else (which keeps its mask)."""
    parts = _and_parts(factory)
    if parts is None or len(parts) != 2:
        return None
    positional, packed = parts
    if getattr(packed, "__qualname__", "") != "packed_sequence_mask_function.<locals>.inner_mask":
        return None
    if getattr(positional, "__qualname__", "") == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        positional = _closure(positional).get("mask_function")
    window = _causal_window(positional, masking_utils)
    ids = _closure(packed).get("packed_sequence_mask")
    if window is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return ids, window


def _packed_boundaries(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest sequence of one row of non-decreasing sequence ids.
    The longest length is read once per forward (one small device read, shared by every layer)."""
    lengths = torch.bincount(ids[0] - ids[0, 0])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max())


_last_position_ids: list = []  # [(weakref to the position_ids tensor, its version, result)]: one per forward


def _packed_from_position_ids(position_ids, L: int):
    """(cu_seqlens, longest) when one row of ``position_ids`` restarts (Transformers' rule:
    a new sequence wherever the position does not grow by 1), else None. Worked out once
    per tensor: every layer of a forward gets the same position_ids (one device read)."""
    if not isinstance(position_ids, torch.Tensor) or torch.compiler.is_compiling():
        return None
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        row = position_ids[0]
    elif position_ids.dim() == 1:
        row = position_ids
    else:
        return None
    if row.shape[0] != L:
        return None
    if _last_position_ids:
        ref, version, result = _last_position_ids[0]
        if ref() is position_ids and version == position_ids._version:
            return result
    starts = torch.diff(row, prepend=row[:1] - 1) != 1
    ids = starts.cumsum(0)
    result = _packed_boundaries(ids[None]) if bool(ids[-1] > 0) else None
    import weakref

    _last_position_ids[:] = [(weakref.ref(position_ids), position_ids._version, result)]
    return result


def _packed_sequences(mask: Optional[torch.Tensor], B: int, L: int, S: int):
    """(cu_seqlens, longest) when ``mask`` is one that :func:`mask_function` built for packed
    sequences of these sizes, else None."""
    if mask is None or B != 1 or torch.compiler.is_compiling():
        return None
    packed = getattr(mask, _PACKED, None)
    if packed is None or tuple(mask.shape[-2:]) != (L, S) or L != S or packed[0].device != mask.device:
        return None
    return packed


_transformers_masking: list = []


def _masking_utils():
    """transformers.masking_utils, imported once (an import statement costs a microsecond a call)."""
    if not _transformers_masking:
        from transformers import masking_utils

        _transformers_masking.append(masking_utils)
    return _transformers_masking[0]


def _compact_causal_padding(mask: Optional[torch.Tensor], B: int, L: int, S: int):
    """(key padding (B, 1, 1, S), diagonal) when ``mask`` is a :class:`CausalPaddingMask` of these
    sizes whose values were not written, else None (diagonal >= 0: the mask function makes no other)."""
    if type(mask) is not CausalPaddingMask or torch.compiler.is_compiling():
        return None
    return mask.compact((B, L, S))


def _plain_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``mask`` as a plain tensor: a :class:`CausalPaddingMask` not run in its compact form is read
    as its materialized values (the kernels take a plain tensor's pointer and strides)."""
    if type(mask) is CausalPaddingMask and not torch.compiler.is_compiling():
        return mask.dense()
    return mask


# --------------------------------------------------------------------------- continuous batching
#
# ``model.generate_batch(...)`` / ``init_continuous_batching()`` run the model on one row of packed
# sequences (``cu_seq_lens_q/k``, ``max_length_q/k`` or, in older versions, ``max_seqlen_q/k``) whose
# keys and values Transformers' PagedAttentionCache gathers from its pages. fastattn runs each such
# call as one varlen call (each sequence causal from its own bottom-right corner; windows, softcap
# and sinks as the model passes them): no mask is built. Two Transformers contracts:
#
# - 5.24 (the model calls ``cache.update(k, v, layer_idx, kwargs=kwargs)`` itself, then the
#   attention function with the gathered keys and the layer's ``cu_seq_lens_k``): the model stays
#   on "fastattn" and attention_forward runs it; masking_utils skips the mask for a paged cache.
# - 5.17 (continuous batching switches the model to ``"paged|<name>"``, a function that writes and
#   reads the cache through ``read_index``/``write_index``; a name with no mask function gets no
#   mask): "paged|fastattn" is paged_attention_forward, registered for attention only.
#
# What Transformers' own check would do with "fastattn" (5.24 refuses any name that is not
# "sdpa", "paged|eager" or contains "flash"; 5.17 switches to flash attention where the
# flash-attn package or `kernels` is installed) is replaced, for models on "fastattn" alone,
# by switch_to_cb_friendly_attn below.

PAGED_NAME = "paged|" + NAME
_BLOCK_TABLE_PATH = (
    "fastattn got continuous batching's block-table decode path (k_cache/v_cache/block_table), which Transformers "
    "enables only for flash-attention names; fastattn runs continuous batching through its read/write-index "
    "(varlen) path: set ContinuousBatchingConfig(max_blocks_per_request=0)")
_OURS = "_fastattn_continuous_batching"


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, **kwargs):
    """``attn_implementation="paged|fastattn"``, which continuous batching switches a "fastattn"
    model to in Transformers versions whose paged attention functions update the cache
    themselves (5.17): write the new keys/values into the paged cache at ``write_index``, read
    every sequence's back at ``read_index`` and run :func:`attention_forward` on the packed row
    with this layer's ``cu_seq_lens_k`` (full or sliding attention)."""
    cache = kwargs.pop("cache", None)
    if cache is None:
        raise ValueError(f"attn_implementation={PAGED_NAME!r} needs continuous batching's paged cache (the `cache` "
                         f"keyword); use {NAME!r} for a standard forward")
    if kwargs.get("block_table") is not None:  # before the cache is written
        raise NotImplementedError(_BLOCK_TABLE_PATH)
    # (1, Hkv, new tokens, D) -> (keys read, Hkv, D) -> (1, Hkv, keys read, D)
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs.pop("read_index"), write_index=kwargs.pop("write_index"))
    key, value = key.transpose(0, 1).unsqueeze(0), value.transpose(0, 1).unsqueeze(0)
    sliding_window = getattr(module, "sliding_window", None)
    layer_type = "sliding_attention" if sliding_window else "full_attention"  # as Transformers' paged functions
    cu_k, max_k = kwargs.pop("cu_seq_lens_k"), kwargs.pop("max_seqlen_k", None)
    if isinstance(cu_k, dict):
        cu_k, max_k = cu_k[layer_type], max_k[layer_type]
    kwargs.setdefault("sliding_window", sliding_window)
    kwargs.update(cu_seq_lens_k=cu_k, max_length_k=max_k, is_causal=True,
                  max_length_q=kwargs.pop("max_seqlen_q", kwargs.get("max_length_q")))
    return attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)


def _attention_updates_cache() -> bool:
    """True where continuous batching's attention function writes the paged cache itself
    (Transformers 5.17: ``PagedAttentionCache.update(key_states, value_states, layer_idx,
    read_index, write_index)``), False where the model does it before the call (5.24:
    ``update(key_states, value_states, layer_idx, kwargs)``)."""
    import inspect

    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    return "read_index" in inspect.signature(PagedAttentionCache.update).parameters


def _cb_friendly(original):
    """``ContinuousBatchingManager.switch_to_cb_friendly_attn``, keeping a "fastattn" model on
    fastattn (``PAGED_NAME`` where the attention function updates the cache, else NAME itself);
    every other model goes to Transformers' own method."""

    @functools.wraps(original)
    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        current = model.config._attn_implementation
        if current not in (NAME, PAGED_NAME):
            return original(self, model, *args, **kwargs)
        target = PAGED_NAME if _attention_updates_cache() else NAME
        if target != current:
            model.set_attn_implementation(target)
            self._original_attn_impl = current  # what stop() puts back, as Transformers' own method records it
        return None

    setattr(switch_to_cb_friendly_attn, _OURS, original)
    return switch_to_cb_friendly_attn


def register_continuous_batching(continuous_api) -> None:
    """Let ``generate_batch`` / ``init_continuous_batching`` run a "fastattn" model on fastattn
    (idempotent; ``continuous_api``: ``transformers.generation.continuous_batching.continuous_api``)."""
    manager = getattr(continuous_api, "ContinuousBatchingManager", None)
    method = getattr(manager, "switch_to_cb_friendly_attn", None)
    if method is None or hasattr(method, _OURS):
        return
    manager.switch_to_cb_friendly_attn = _cb_friendly(method)


# --------------------------------------------------------------------------- registration


def register_attention(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(NAME, attention_forward)
    # No mask function for it: Transformers then builds no mask, as continuous batching needs.
    modeling_utils.AttentionInterface.register(PAGED_NAME, paged_attention_forward)


def register_mask(masking_utils) -> None:
    masking_utils.AttentionMaskInterface.register(NAME, mask_function)


def register() -> None:
    """Register ``"fastattn"`` with Transformers (imports Transformers)."""
    from transformers import masking_utils, modeling_utils

    register_attention(modeling_utils)
    register_mask(masking_utils)
    try:
        from transformers.generation.continuous_batching import continuous_api
    except ImportError:  # a Transformers without continuous batching
        return
    register_continuous_batching(continuous_api)


# --------------------------------------------------------------------------- patch / unpatch

_originals: dict[str, Any] = {}  # what patch() replaced, to put back exactly
_PREVIOUS_ATTR = "_fastattn_previous_attn_implementation"


def _sdpa_drop_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` routed through fastattn
    (its fallback calls torch's saved original, so this never recurses)."""
    from ..functional import scaled_dot_product_attention

    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def set_attn_implementation(model, name: str):
    """``model.set_attn_implementation(name)``, also reaching the copies of the model's config
    that some Transformers versions leave behind: 5.17 skips sub-models whose config has the
    model's own class, so T5's encoder and decoder stacks (deep copies of its config) kept
    their attention. Configs of other classes (a vision tower's, say) are Transformers' to set."""
    model.set_attn_implementation(name)
    for module in model.modules():
        config = getattr(module, "config", None)
        if (config is not None and config is not model.config and type(config) is type(model.config)
                and config._attn_implementation != name):
            config._attn_implementation = name
    return model


def is_patched() -> bool:
    return "sdpa" in _originals


def patch(model=None, *, torch_sdpa: bool = False):
    """Route Transformers' ``"sdpa"`` attention through fastattn (idempotent).

    ``patch()`` affects every model, already loaded ones included (models look the
    function up at each forward). ``patch(model)`` instead switches one loaded model
    to ``attn_implementation="fastattn"`` and returns it. ``torch_sdpa=True`` also
    replaces ``torch.nn.functional.scaled_dot_product_attention`` itself.
    """
    register()
    if model is not None:
        if not hasattr(model, _PREVIOUS_ATTR):
            setattr(model, _PREVIOUS_ATTR, model.config._attn_implementation)
        return set_attn_implementation(model, NAME)
    from transformers import modeling_utils

    mapping = modeling_utils.AttentionInterface._global_mapping
    if "sdpa" not in _originals:
        _originals["sdpa"] = mapping["sdpa"]
        mapping["sdpa"] = attention_forward
        if "paged|sdpa" in mapping:  # continuous batching's "sdpa" in Transformers 5.17 (updates the cache itself)
            _originals["paged|sdpa"] = mapping["paged|sdpa"]
            mapping["paged|sdpa"] = paged_attention_forward
    if torch_sdpa and "torch_sdpa" not in _originals:
        _originals["torch_sdpa"] = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _sdpa_drop_in
    return None


def unpatch(model=None):
    """Undo :func:`patch` exactly (idempotent); ``unpatch(model)`` restores that
    model's previous attention implementation and returns it."""
    if model is not None:
        previous = getattr(model, _PREVIOUS_ATTR, None)
        if previous is not None:
            set_attn_implementation(model, previous)
            delattr(model, _PREVIOUS_ATTR)
        return model
    if "sdpa" in _originals:
        from transformers import modeling_utils

        modeling_utils.AttentionInterface._global_mapping["sdpa"] = _originals.pop("sdpa")
        if "paged|sdpa" in _originals:
            modeling_utils.AttentionInterface._global_mapping["paged|sdpa"] = _originals.pop("paged|sdpa")
    if "torch_sdpa" in _originals:
        torch.nn.functional.scaled_dot_product_attention = _originals.pop("torch_sdpa")
    return None


# --------------------------------------------------------------------------- check


TOLERANCES = MODEL_TOLERANCES  # (atol, rtol x max |reference|), kept in fastattn.testing


@dataclass
class CheckReport:
    """Largest differences between fastattn and a reference attention, per layer output."""

    reference: str
    dtype: torch.dtype
    atol: float
    rtol: float
    layers: list[tuple[str, float, float]]  # (name, max abs diff, allowed)
    backends: dict[str, int]

    @property
    def ok(self) -> bool:
        return all(diff <= allowed for _, diff, allowed in self.layers)

    @property
    def max_diff(self) -> float:
        return max((d for _, d, _ in self.layers), default=0.0)

    def __str__(self) -> str:
        lines = [f"fastattn vs {self.reference} ({self.dtype}, non-padded positions; "
                 f"allowed atol {self.atol:g} + rtol {self.rtol:g} x |reference|)"]
        for name, diff, allowed in self.layers:
            lines.append(f"  {name:<24} max |diff| {diff:.3e}  (allowed {allowed:.1e})  {'ok' if diff <= allowed else 'FAIL'}")
        lines.append("  backends used: " + (", ".join(f"{k} x{v}" for k, v in self.backends.items()) or "none"))
        lines.append("  result: " + ("ok" if self.ok else "MISMATCH"))
        return "\n".join(lines)


def _layer_outputs(model, inputs) -> list[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    named = []
    for key in ("encoder_hidden_states", "decoder_hidden_states", "hidden_states"):
        if key == "hidden_states" and named:
            break
        named += [(f"{key}[{i}]", t) for i, t in enumerate(out.get(key) or ())]
    for key in ("last_hidden_state", "logits"):
        if out.get(key) is not None:
            named.append((key, out[key]))
    return named


def reference_implementation(model) -> str:
    """Transformers' own attention to compare fastattn with: "sdpa" where the model
    supports it, else "eager" (Gemma2's softcap, GPT-OSS's sinks)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def check(model, inputs: dict, reference: str = "eager") -> CheckReport:
    """Run ``model(**inputs)`` with fastattn and with Transformers' ``reference`` attention
    and report the largest difference of every layer output on non-padded positions
    (``inputs["attention_mask"]``), against the tolerance for the model's dtype.
    The model's attention implementation is restored afterwards."""
    register()
    previous = model.config._attn_implementation
    try:
        set_attn_implementation(model, reference)
        ref = _layer_outputs(model, inputs)
        set_attn_implementation(model, NAME)
        with record_backends() as records:
            got = _layer_outputs(model, inputs)
    finally:
        set_attn_implementation(model, previous)
    keep = inputs.get("attention_mask")
    dtype = ref[0][1].dtype if ref else torch.float32
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    layers = []
    for (name, a), (_, b) in zip(got, ref):
        if keep is not None and a.dim() >= 2 and a.shape[:2] == keep.shape:
            sel = keep.to(a.device).bool()
            a, b = a[sel], b[sel]
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        allowed = atol + rtol * (b.double().abs().max().item() if b.numel() else 0.0)
        layers.append((name, diff, allowed))
    backends: dict[str, int] = {}
    for r in records:
        backends[r.backend] = backends.get(r.backend, 0) + 1
    return CheckReport(reference, dtype, atol, rtol, layers, backends)
