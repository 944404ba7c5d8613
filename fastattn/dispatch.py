"""Which backend runs a call: the priority list, forcing, strictness, and the
error that lists every backend's reasons. No other module makes this decision."""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import _device
from ._env import constant_while_tracing, decision_environment, decoded
from .backends.base import BACKWARD, Backend
from .backends.sdpa import SDPABackend
from .backends.triton import TritonBackend
from .inputs import HALF_DTYPES, AttentionCall, Features

__all__ = ["UnsupportedError", "Explanation", "Plan", "use_backend", "select", "explain_call", "plan", "cached_plan",
           "registered_backends", "register_backend"]


class UnsupportedError(RuntimeError):
    """A forced (or strict) backend choice that cannot run the call; lists every backend's reasons."""


_REGISTRY: dict[str, Backend] = {}
_plans: dict[tuple, "Plan"] = {}  # (signature, state) -> Plan; see plan()
MAX_PLANS = 4096  # then start afresh: decode with a growing cache makes a new signature per step


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _backends[:] = _REGISTRY.values()
    clear_cache()


def clear_cache() -> None:
    """Forget cached decisions and plans (the registry changed). Nothing else needs this: what
    a decision reads (backends' availability included) is part of its cache key."""
    _decide.cache_clear()
    _plans.clear()


def registered_backends() -> dict[str, Backend]:
    """The registered backends by name."""
    return dict(_REGISTRY)



def torch_fused_fits(f: Features) -> bool:
    """True when torch's own fused SDPA kernels (cuDNN, flash) run the call as it is:
    CUDA fp16/bf16, no mask (but a bool key-padding mask in decode, which cuDNN reads),
    no window beyond causal, no softcap/ALiBi/sinks, the causal mask top-left (or L == S,
    where the alignments coincide), E == Ev."""
    mask_fits = f.mask_dtype is None or (f.short_queries and f.mask_dtype == torch.bool and f.mask_key_padding)
    return (f.device_type == "cuda" and f.layout == "dense" and f.dtype in HALF_DTYPES and mask_fits and f.positions_fit_torch
            and not (f.has_softcap or f.has_alibi or f.has_sinks or f.want_lse or f.dropout or f.empty)
            and f.head_dim == f.head_dim_v and f.head_dim % 8 == 0 and f.head_dim <= 256)


def priority(features: Features) -> list[str]:
    """Backends to try, best first.

    Measured (benchmarks/results/, H100, torch 2.11, triton 3.6, bf16 hd128): on
    calls that torch's fused kernels take as they are, torch SDPA (cuDNN) ran at
    482-605 TFLOP/s against 349-484 for our Triton kernel; decode with 64k keys at
    101% of copy bandwidth against 98%. So on Hopper (sm_90+) such plain calls go
    to ``sdpa`` first; everything else (masks read in-kernel, windows, softcap,
    ALiBi, sinks, bottom-right causal with L != S, the log-sum-exp) goes to ``triton``,
    which torch would run on slower paths or not at all. Decode with a bool key-padding
    mask counts as plain: torch read the keys at 99% of copy bandwidth against 95% and 93%
    for triton in two runs (b909d5d, e52d2bb: 64k keys, half of them padding). Prefill
    with padding is not measured against torch yet and stays with ``triton``. Older GPUs
    are not measured yet: ``triton`` first there.

    Between the two kernels (the same H100 run, e52d2bb, bf16 prefill at 4k, TFLOP/s triton /
    cuda): head dim 64 323 / 227 full and 283 / 186 causal, head dim 128 340-463 / 191-250,
    decode 96% / 49% of copy bandwidth, but head dim 256 174 / 204 full and 153 / 169 causal.
    So on Hopper ``cuda`` (FlashAttention-2's design, mma.sync) goes before ``triton`` above
    head dim 128 (Gemma-2's 256 with softcap and windows, which torch runs slowly), after it
    otherwise; older GPUs keep ``triton`` first until measured.

    ``sdpa`` last otherwise: it runs everything, so a call never fails for lack of a kernel.
    """
    hopper = (features.device_type == "cuda" and torch.cuda.is_available()
              and _device.capability(features.device_index) >= (9, 0))
    wide = max(features.head_dim, features.head_dim_v) > 128  # what the CUDA kernel pads to
    kernels = ("cuda", "triton") if hopper and wide else ("triton", "cuda")
    order = [name for name in kernels if name in _REGISTRY]
    order += [name for name in _REGISTRY if name not in order and name != "sdpa"]
    if hopper and torch_fused_fits(features):
        return ["sdpa"] + order
    return order + ["sdpa"]


# --------------------------------------------------------------------------- forcing

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastattn_forced_backend", default=None)
_forced_get = _forced.get  # for the plan key


def _check_name(name: str, source: str) -> str:
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (or ``"auto"``) inside the block, for this thread/task only.

    A forced backend that cannot run a call raises :class:`UnsupportedError`
    listing every backend's reasons; it never falls back silently.
    """
    token = _forced.set(_check_name(name, "use_backend"))
    if name != "auto":
        _prepare(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _prepare(name: str) -> None:
    """A forced backend may get ready first (the cuda backend builds its extension). What that
    changes shows in its availability, which the cached decisions are keyed on."""
    _REGISTRY[name].prepare()


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is None:
        name = _check_name(_environment()[0], "FASTATTN_BACKEND")
    return None if name == "auto" else name


def _environment() -> tuple[str, bool, bool]:
    """What the environment says to a decision, parsed: FASTATTN_BACKEND's name ("auto" when
    unset; not checked here, as it counts only where nothing was forced in code),
    FASTATTN_STRICT and TRITON_INTERPRET."""
    return _parse_environment(decision_environment())


@functools.lru_cache(maxsize=64)
def _parse_environment(raw: tuple) -> tuple[str, bool, bool]:
    # Parsed once per raw value (reading the three through os.environ costs 2-3 us a call).
    backend, strict, interpret = (decoded(value) for value in raw)
    return ((backend or "auto").strip().lower() or "auto", (strict or "0").strip().lower() in ("1", "true", "yes"),
            interpret == "1")


# torch.backends.cuda's getters call these; called directly they cost a quarter (the plan key reads them)
_SDP_FLAGS = tuple(
    (name, getattr(torch._C, private, None) or getattr(torch.backends.cuda, public))
    for name, private, public in (
        ("FLASH_ATTENTION", "_get_flash_sdp_enabled", "flash_sdp_enabled"),
        ("EFFICIENT_ATTENTION", "_get_mem_efficient_sdp_enabled", "mem_efficient_sdp_enabled"),
        ("MATH", "_get_math_sdp_enabled", "math_sdp_enabled"),
        ("CUDNN_ATTENTION", "_get_cudnn_sdp_enabled", "cudnn_sdp_enabled"),
    )
)


@constant_while_tracing  # read while tracing (torch.compile cannot trace the flag getters)
def torch_restriction() -> tuple[str, ...]:
    """The SDPA backends torch was told not to use (``torch.nn.attention.sdpa_kernel``)."""
    return tuple(name for name, enabled in _SDP_FLAGS if not enabled())


_flash_sdp, _efficient_sdp, _math_sdp, _cudnn_sdp = (enabled for _, enabled in _SDP_FLAGS)  # for _key()


@constant_while_tracing  # the backends' own checks import and lock
def availability() -> tuple[tuple[str, ...], ...]:
    """Every registered backend's :meth:`Backend.availability`, in registry order. Part of every
    cached decision's key: an extension built or reset shows here, so no cache needs clearing."""
    return tuple([tuple(backend.availability()) for backend in _backends])


_backends: list[Backend] = []  # _REGISTRY's values, kept by register_backend (a view of a dict costs more)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Explanation:
    """Every backend's verdict on one call, and the one chosen (None if none can run).

    When the call's inputs require grad, a backend's reasons include its backward's
    (each beginning "backward: "): forward and backward run on one backend, so the
    chosen one is the first that can run both."""

    verdicts: tuple[tuple[str, tuple[str, ...]], ...]
    chosen: Optional[str]
    forced: Optional[str] = None
    strict: bool = False
    features: Optional[Features] = None
    note: str = ""  # why the priority order is what it is, when that is not the default

    def reasons(self, name: str) -> tuple[str, ...]:
        return dict(self.verdicts)[name]

    def backward_reasons(self, name: str) -> tuple[str, ...]:
        """Why ``name``'s backward cannot run the call (empty when it can, or when no grad is needed)."""
        return tuple(r[len(BACKWARD):] for r in self.reasons(name) if r.startswith(BACKWARD))

    @property
    def needs_grad(self) -> bool:
        return self.features is not None and self.features.needs_grad

    def __str__(self) -> str:
        lines = []
        if self.features is not None:
            f = self.features
            lines.append(
                f"call: {f.dtype} on {f.device_type}, head_dim={f.head_dim}"
                + (f", head_dim_v={f.head_dim_v}" if f.head_dim_v != f.head_dim else "")
                + f", heads q/kv={f.num_heads_q}/{f.num_heads_kv}"
                + (f", causal ({'bottom-right' if f.lower_right else 'top-left'})" if f.causal else "")
                + (f", key bounds (left, right)={f.window}" if f.window not in ((-1, -1), (-1, 0)) else "")
                + (f", mask={f.mask_dtype}" if f.mask_dtype is not None else "")
                + "".join(f", {name}" for name, present in (
                    ("softcap", f.has_softcap), ("ALiBi", f.has_alibi), ("sinks", f.has_sinks),
                    ("dropout", f.dropout), ("needs grad", f.needs_grad), ("log-sum-exp", f.want_lse)) if present)
            )
        if self.note:
            lines.append(f"priority: {self.note}")
        if self.forced:
            lines.append(f"forced backend: {self.forced}")
        if self.strict:
            lines.append("strict: FASTATTN_STRICT=1 (no fallback to sdpa)")
        if self.needs_grad:
            lines.append("backward: inputs require grad; forward and backward run on one backend that has both")
        for name, reasons in self.verdicts:
            mark = "->" if name == self.chosen else "  "
            if not reasons:
                verdict = "can run (forward and backward)" if self.needs_grad else "can run"
            elif self.needs_grad and len(self.backward_reasons(name)) == len(reasons):
                verdict = "forward can run, backward cannot"
            else:
                verdict = "cannot run"
            lines.append(f"{mark} {name}: {verdict}")
            lines.extend(f"     - {r}" for r in reasons)
        chosen = self.chosen and (f"{self.chosen} (forward and backward)" if self.needs_grad else self.chosen)
        lines.append(f"chosen: {chosen}" if chosen else "chosen: none (UnsupportedError)")
        return "\n".join(lines)


def _verdicts(features: Features, forced: Optional[str], restriction: tuple[str, ...]) -> tuple:
    out = []
    for name in priority(features):
        reasons = list(_REGISTRY[name].not_supported_reasons(features))
        if restriction and name != "sdpa" and forced is None:
            reasons.append(
                f"torch's SDPA backends {', '.join(restriction)} are switched off (torch.nn.attention.sdpa_kernel "
                "or torch.backends.cuda.enable_*_sdp): fastattn leaves the choice to torch's SDPA"
            )
        out.append((name, tuple(reasons)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _decide(features: Features, forced: Optional[str], strict: bool, restriction: tuple[str, ...],
            interpret: bool, available: tuple[tuple[str, ...], ...]) -> Explanation:
    # ``interpret`` and ``available`` are read by the backends' reasons: here they key the cache.
    verdicts = _verdicts(features, forced, restriction)
    if forced is not None:
        chosen = forced if not dict(verdicts)[forced] else None
    else:
        runnable = [name for name, reasons in verdicts if not reasons]
        chosen = runnable[0] if runnable else None
        if strict and runnable == ["sdpa"]:  # nothing but the fallback could run
            chosen = None
    note = ""
    if verdicts and verdicts[0][0] == "sdpa":
        note = ("sdpa first: a plain call on a Hopper GPU, where torch's fused SDPA measured faster "
                "than the triton kernel (benchmarks/results/)")
    return Explanation(verdicts, chosen, forced, strict, features, note)


register_backend(TritonBackend())


def _register_cuda_backend() -> None:
    # The CUDA C++ backend: importing it loads and compiles nothing (the extension is
    # loaded on the first CUDA call), and a broken module must not break `import fastattn`.
    try:
        from .backends.cuda import CudaBackend
    except Exception as exc:  # pragma: no cover - only on a broken checkout
        import logging

        logging.getLogger("fastattn").warning("fastattn: cuda backend not registered: %s", exc)
        return
    register_backend(CudaBackend())


_register_cuda_backend()
register_backend(SDPABackend())


def explain_call(call: AttentionCall) -> Explanation:
    # While torch.compile traces, the decision is worked out afresh (and baked into the graph):
    # Dynamo ignores lru_cache, and warns when it meets one.
    tracing = torch.compiler.is_compiling()
    raw = decision_environment()
    env_backend, strict, interpret = _parse_environment.__wrapped__(raw) if tracing else _parse_environment(raw)
    forced = _forced.get()
    if forced is None:  # use_backend wins inside its block, whatever FASTATTN_BACKEND says
        forced = _check_name(env_backend, "FASTATTN_BACKEND")
        if forced != "auto":
            _prepare(forced)
    forced = None if forced == "auto" else forced
    decide = _decide.__wrapped__ if tracing else _decide
    return decide(call.features, forced, strict, torch_restriction(), interpret, availability())


def select(call: AttentionCall) -> Backend:
    """The backend that runs ``call``; raises :class:`UnsupportedError` when a forced
    or strict choice cannot be honoured."""
    return _REGISTRY[_chosen(explain_call(call))]


def _chosen(decision: Explanation) -> str:
    if decision.chosen is None:
        what = f"backend {decision.forced!r} was forced" if decision.forced else "FASTATTN_STRICT=1 forbids falling back to sdpa"
        raise UnsupportedError(f"{what} but cannot run this call.\n{decision}")
    return decision.chosen


# --------------------------------------------------------------------------- plans (the host's fast path)


@dataclass(frozen=True)
class Plan:
    """What a front end worked out for one call, kept for the calls with the same signature
    (``inputs.sdpa_signature``...) in the same state (see :func:`_key`): the backend, the call's
    features, the front end's own ``layout``, and -- where the sdpa backend would hand the
    tensors to torch's SDPA unchanged -- a function that does so (``as_is``).

    ``relies_on``: the backends whose availability the choice rests on, with what it was: the
    chosen one, and any ahead of it that nothing but its availability kept out, less those that
    are always available (the sdpa backend: its plans read no availability at all). Whenever one
    of them says otherwise the plan is not used (no cache is cleared from outside: the
    availability is part of what the plan depends on). Reading it for these few instead of every
    backend saves most of a microsecond per call."""

    backend: Backend
    features: Features
    layout: object = None
    as_is: Optional[Callable] = None
    relies_on: tuple = ()  # ((backend, its availability() list), ...)


def _key(signature: tuple) -> tuple:
    """A plan's key: the call's signature and the rest of what a decision reads but backends'
    availability (see Plan.relies_on) -- the forced backend, the environment (FASTATTN_BACKEND,
    FASTATTN_STRICT, TRITON_INTERPRET) and torch's four SDPA switches."""
    return (signature, _forced_get(), decision_environment(), _flash_sdp(), _efficient_sdp(), _math_sdp(),
            _cudnn_sdp())


def cached_plan(signature: Optional[tuple]) -> Optional[Plan]:
    """The plan made for an earlier call with this signature in the present state, or None."""
    if signature is None:
        return None
    plan = _plans.get(_key(signature))
    if plan is not None and plan.relies_on:
        for backend, available in plan.relies_on:
            if backend.availability() != available:
                return None
    return plan


def plan(call: AttentionCall, signature: Optional[tuple], layout: object = None, as_is: bool = False) -> Plan:
    """Choose the backend for a validated ``call`` (raising as :func:`select` does) and keep the
    choice for later calls with the same ``signature`` (None: keep nothing). ``as_is``: the call's
    tensors are the front end's arguments themselves, so torch's SDPA may be given those."""
    decision = explain_call(call)
    backend = _REGISTRY[_chosen(decision)]
    runner = backend.as_is_runner(call) if as_is and isinstance(backend, SDPABackend) else None
    if signature is None or torch.compiler.is_compiling():
        return Plan(backend, call.features, layout, runner)
    relies_on = []
    for name, reasons in decision.verdicts:
        candidate = _REGISTRY[name]
        available = candidate.availability()
        relied_on = name == decision.chosen or all(reason in available for reason in reasons)
        if relied_on and not candidate.always_available():
            relies_on.append((candidate, available))
        if name == decision.chosen:
            break
    made = Plan(backend, call.features, layout, runner, tuple(relies_on))
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[_key(signature)] = made
    return made
