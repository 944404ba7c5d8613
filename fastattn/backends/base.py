"""What every backend declares: its name, what it runs in each direction, and how to run it.

A backend declares, per direction, the dtypes, head dims and features it runs
(:class:`Support`); the generic refusals ("dtype torch.float32 is not supported
(supported: float16, bfloat16)", "head_dim=320 is too large (supported: <= 256)")
are worded here, once, from those declarations. A backend adds only its special
cases (devices, builds, mask layouts) in :meth:`Backend.extra_reasons` and
:meth:`Backend.extra_backward_reasons`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from ..inputs import AttentionCall, Features

# The optional features a call may use: name -> (how a refusal names it, whether the call uses it).
FEATURES: dict[str, tuple[str, Callable[[Features], bool]]] = {
    "mask": ("an attn_mask is", lambda f: f.mask_dtype is not None),
    "softcap": ("softcap is", lambda f: f.has_softcap),
    "alibi": ("ALiBi slopes are", lambda f: f.has_alibi),
    "sinks": ("attention sinks are", lambda f: f.has_sinks),
    "dropout": ("dropout_p > 0 is", lambda f: f.dropout),
}
ALL_FEATURES = frozenset(FEATURES)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def head_dim_reason(head_dim: int, max_head_dim: int) -> str:
    return f"head_dim={head_dim} is too large (supported: <= {max_head_dim})"


@dataclass(frozen=True)
class Support:
    """What one direction (forward or backward) of a backend runs.

    ``dtypes``: the query dtypes (empty = any); ``max_head_dim``: the largest E and Ev
    (None = any); ``features``: the names in :data:`FEATURES` it runs."""

    dtypes: tuple[torch.dtype, ...] = ()
    max_head_dim: Optional[int] = None
    features: frozenset = ALL_FEATURES

    def reasons(self, f: Features) -> list[str]:
        """One sentence per declared limit the call exceeds (all of them, not only the first)."""
        reasons = []
        if self.dtypes and f.dtype not in self.dtypes:
            reasons.append(f"dtype {f.dtype} is not supported (supported: "
                           f"{', '.join(map(_dtype_name, self.dtypes))})")
        head_dim = max(f.head_dim, f.head_dim_v)
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(head_dim_reason(head_dim, self.max_head_dim))
        for name, (phrase, used) in FEATURES.items():
            if name not in self.features and used(f):
                reasons.append(f"{phrase} not supported")
        return reasons


BACKWARD = "backward: "  # how a backward reason begins in explain's report


class Backend:
    """A kernel family.

    Subclasses declare ``forward`` and ``backward`` (None = forward only) as
    :class:`Support` (shown by ``fastattn.explain`` and ``python -m fastattn``), add
    their special cases in :meth:`extra_reasons` / :meth:`extra_backward_reasons`,
    and implement :meth:`run`. Reasons depend on :class:`Features` only, so the
    dispatcher can cache them. A call whose inputs require grad runs forward and
    backward on one backend: :meth:`run` returns outputs that autograd
    differentiates with that backend's own backward.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    forward: ClassVar[Support] = Support()
    backward: ClassVar[Optional[Support]] = None

    def extra_reasons(self, f: Features) -> list[str]:
        """What the declarations cannot say (devices, builds, layouts); forward and backward."""
        return []

    def extra_backward_reasons(self, f: Features) -> list[str]:
        """The backward's own special cases (e.g. an input whose gradient it does not compute)."""
        return []

    def forward_reasons(self, f: Features) -> list[str]:
        return self.extra_reasons(f) + self.forward.reasons(f)

    def backward_reasons(self, f: Features) -> list[str]:
        """Why the backward cannot run the call (asked only when its inputs require grad)."""
        if self.backward is None:
            return [f"inputs require grad and the {self.name} kernel is forward-only (no backward)"]
        return self.backward.reasons(f) + self.extra_backward_reasons(f)

    def not_supported_reasons(self, f: Features) -> list[str]:
        """Every reason this backend cannot run the call: the forward's, then, when the
        inputs require grad, the backward's (prefixed "backward: ", repeats left out)."""
        reasons = self.forward_reasons(f)
        if f.needs_grad:
            reasons += [BACKWARD + r for r in self.backward_reasons(f) if r not in reasons]
        return reasons

    def run(self, call: AttentionCall) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``out`` of shape (B, Hq, L, Ev) in the input dtype and, when
        ``call.want_lse``, the natural-log log-sum-exp (B, Hq, L) in float32
        (``+inf`` on rows with no key to attend to)."""
        raise NotImplementedError

    def prepare(self) -> bool:
        """Get ready to run when forced (e.g. build compiled code); True if that changed
        what :meth:`availability` says. Never called while choosing a backend."""
        return False

    def availability(self) -> list[str]:
        """Reasons this backend cannot run anything in this process (empty = available)."""
        return []

    @classmethod
    def always_available(cls) -> bool:
        """True when :meth:`availability` is this class's, which never has a reason: the plans
        that rest on such a backend need not ask it again (see dispatch.Plan.relies_on)."""
        return cls.availability is Backend.availability

    def __repr__(self) -> str:
        return f"<fastattn backend {self.name!r}>"
