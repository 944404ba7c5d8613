"""The Triton flash-attention kernel (fastattn/kernels/triton)."""
from __future__ import annotations

import torch

from .. import _device
from .._env import constant_while_tracing, interpreting
from ..inputs import HALF_DTYPES, AttentionCall, Features
from .base import ALL_FEATURES, Backend, Support

MAX_HEAD_DIM = 256


_import_result: list[str | None] = []  # filled once


@constant_while_tracing  # torch.compile reads it while tracing (an import inside)
def _import_error() -> str | None:
    if not _import_result:
        try:
            from ..kernels.triton import flash_fwd  # noqa: F401
            _import_result.append(None)
        except Exception as exc:  # ImportError, or a broken triton install
            _import_result.append(f"{type(exc).__name__}: {exc}")
    return _import_result[0]


class TritonBackend(Backend):
    name = "triton"
    description = ("Triton flash attention, forward and backward: fp16/bf16, head dims <= 256, GQA/MQA, causal "
                   "(both alignments), windows, softcap, ALiBi, bool/additive masks, sinks (with their gradient)")
    forward = Support(dtypes=HALF_DTYPES, max_head_dim=MAX_HEAD_DIM, features=ALL_FEATURES - {"dropout"})
    backward = Support(dtypes=HALF_DTYPES, max_head_dim=MAX_HEAD_DIM, features=ALL_FEATURES - {"dropout"})

    def availability(self) -> list[str]:
        err = _import_error()
        return [f"triton cannot be imported ({err}); install it with `pip install triton`"] if err else []

    def extra_reasons(self, f: Features) -> list[str]:
        reasons = self.availability()
        if f.device_type == "cpu":
            if not interpreting():
                reasons.append("query is on the CPU; the triton kernel needs a CUDA device "
                               "(set TRITON_INTERPRET=1 to run it through the Triton interpreter)")
        elif f.device_type != "cuda":
            reasons.append(f"device type {f.device_type!r} is not supported (supported: cuda)")
        elif not interpreting() and torch.cuda.is_available():
            major, minor = _device.capability(f.device_index)
            need = (8, 0) if f.dtype == torch.bfloat16 else (7, 5)
            if (major, minor) < need:
                reasons.append(f"GPU compute capability {major}.{minor} is too old for {f.dtype} "
                               f"(needs {need[0]}.{need[1]} or newer)")
        if f.empty:
            reasons.append("an empty sequence or head dim: nothing for a kernel to do")
        return reasons

    def extra_backward_reasons(self, f: Features) -> list[str]:
        # The kernel gives no gradient to these; the fallback's autograd does.
        reasons = []
        if f.alibi_needs_grad:
            reasons.append("ALiBi slopes that require grad are not supported (the kernel gives them no gradient)")
        if f.mask_needs_grad:
            reasons.append("an additive attn_mask that requires grad (e.g. a trainable position bias) is not "
                           "supported (the kernel gives the mask no gradient)")
        return reasons

    def run(self, call: AttentionCall):
        # One path, eager and compiled: the custom op, differentiable through its registered
        # backward (fastattn/ops/triton_fwd.py); opaque to torch.compile, with a fake implementation.
        from ..ops.triton_fwd import triton_fwd

        left, right = call.key_bounds
        return triton_fwd(call.q, call.k, call.v, call.mask, call.alibi_slopes, call.sinks, call.scale, left, right,
                          call.diag_offset, call.softcap)
