"""``torch.ops.fastattn.fwd``: the CUDA extension's forward op (schema in csrc/flash_api.cpp).

The op itself is defined in C++ (``TORCH_LIBRARY(fastattn, ...)``); this module adds
its fake implementation, so ``torch.compile`` can trace through it without running
it, and a thin call wrapper. Nothing here compiles or loads the extension: that is
``fastattn._extension``'s job, and it calls :func:`register_fake_impl` once the
library is loaded.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .layout import empty_outputs

OP_NAME = "fastattn::fwd"

_registered = False
_lock = threading.Lock()


def fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_left: int = -1,
             window_right: int = -1, lower_right: bool = False, softcap: float = 0.0,
             seqused_k: Optional[torch.Tensor] = None, num_splits: int = 0,
             key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and layouts of the C++ op's results: ``out`` (B, Hq, L, D) in q's memory
    layout (a transposed (B, L, Hq, D) buffer when q is one), ``lse`` (B, Hq, L) float32."""
    return empty_outputs(q, q.shape[-1])


def register_fake_impl() -> None:
    """Register :func:`fwd_fake` for the loaded op (idempotent)."""
    global _registered
    with _lock:
        if not _registered:
            torch.library.register_fake(OP_NAME)(fwd_fake)
            _registered = True


def fwd(q, k, v, scale, window_left=-1, window_right=-1, lower_right=False, softcap=0.0, seqused_k=None,
        num_splits=0, key_mask=None):
    """Call the op (see csrc/flash_api.cpp for the argument contract)."""
    return torch.ops.fastattn.fwd(q, k, v, scale, window_left, window_right, lower_right, softcap, seqused_k,
                                  num_splits, key_mask)
