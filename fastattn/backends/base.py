"""What every backend declares: its name, what it can run, and how to run it."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch

from ..inputs import AttentionCall, Features


def forward_only_reasons(f: Features) -> list[str]:
    """What a forward-only kernel without dropout refuses (shared by the compiled kernels)."""
    reasons = []
    if f.dropout:
        reasons.append("dropout_p > 0 is not supported yet (the kernel has no dropout)")
    if f.needs_grad:
        reasons.append("inputs require grad and the kernel is forward-only (no backward yet)")
    return reasons


class Backend:
    """A kernel family.

    Subclasses declare what they support as class attributes (shown by
    ``fastattn.explain`` and ``python -m fastattn``) and implement
    :meth:`not_supported_reasons`, one sentence per reason naming the offending
    value and what is supported. Reasons depend on :class:`Features` only, so the
    dispatcher can cache them.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def not_supported_reasons(self, features: Features) -> list[str]:
        raise NotImplementedError

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

    def __repr__(self) -> str:
        return f"<fastattn backend {self.name!r}>"
