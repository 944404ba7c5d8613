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


def _ops():
    """(fastattn.ops.triton_fwd, fastattn.ops.triton_varlen), imported on the first launch (they
    import triton and register the custom ops: not at ``import fastattn``) and kept: an import
    statement in the launch path costs a microsecond or so on every call."""
    global _imported_ops
    if _imported_ops is None:
        from ..ops import triton_fwd, triton_varlen

        _imported_ops = (triton_fwd, triton_varlen)
    return _imported_ops


_imported_ops = None


class TritonBackend(Backend):
    name = "triton"
    description = ("Triton flash attention, forward and backward: fp16/bf16, head dims <= 256, GQA/MQA, causal "
                   "(both alignments), windows, softcap, ALiBi, bool/additive masks, sinks (with their gradient), "
                   "dropout, packed variable-length batches; paged and indexed KV caches (forward only)")
    forward = Support(dtypes=HALF_DTYPES, max_head_dim=MAX_HEAD_DIM, features=ALL_FEATURES)
    backward = Support(dtypes=HALF_DTYPES, max_head_dim=MAX_HEAD_DIM, features=ALL_FEATURES)

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
        if f.layout != "dense" and f.mask_dtype is not None:
            reasons.append(f"an attn_mask beside a {f.layout} layout is not supported (per-sequence lengths say "
                           "which keys each sequence has)")
        if f.layout != "dense" and f.dropout:
            reasons.append(f"dropout_p > 0 with a {f.layout} layout is not supported yet (dense calls only)")
        return reasons

    def extra_backward_reasons(self, f: Features) -> list[str]:
        # The kernel gives no gradient to these; the fallback's autograd does.
        reasons = []
        if f.layout == "paged":
            reasons.append("the paged layout has no backward kernel (KV caches are for inference)")
        cache_parts = [name for name in ("cache_leftpad", "cache_batch_idx") if name in f.layout_extras]
        if cache_parts:
            reasons.append(f"the varlen layout with {' and '.join(cache_parts)} has no backward kernel "
                           "(KV caches are for inference)")
        if f.alibi_needs_grad:
            reasons.append("ALiBi slopes that require grad are not supported (the kernel gives them no gradient)")
        if f.mask_needs_grad:
            reasons.append("an additive attn_mask that requires grad (e.g. a trainable position bias) is not "
                           "supported (the kernel gives the mask no gradient)")
        return reasons

    def run(self, call: AttentionCall, *, num_splits: int = 0):
        features = call.features
        left, right = features.window  # the call's key_bounds
        if features.layout != "dense":
            return self._run_per_sequence(call, left, right, num_splits)
        # Training and compiled runs: the custom op, differentiable through its registered backward
        # (fastattn/ops/triton_fwd.py); opaque to torch.compile, with a fake implementation. Eager
        # inference: the op's body itself, sparing the op's dispatch, which costs more host time
        # than the launch on a decode step.
        ops, _ = _ops()
        run = ops.triton_fwd if features.needs_grad or torch.compiler.is_compiling() else ops.launch_fwd
        if call.dropout_p > 0:  # a fresh keep-mask per call, regenerated by the backward from its seed
            return run(call.q, call.k, call.v, call.mask, call.alibi_slopes, call.sinks, call.scale, left, right,
                       call.diag_offset, call.softcap, call.dropout_p, ops.dropout_seed())
        return run(call.q, call.k, call.v, call.mask, call.alibi_slopes, call.sinks, call.scale, left, right,
                   call.diag_offset, call.softcap)

    def _run_per_sequence(self, call: AttentionCall, left: int, right: int, num_splits: int):
        """Varlen and paged calls: the kernel reads each sequence's lengths, offsets and pages.
        Under torch.compile, and whenever the call needs grad, through its own op, whose
        registered backward is the backward kernel (fastattn/ops/triton_varlen.py); an eager
        inference call (decoding) runs the op's body directly, sparing the op's dispatch."""
        _, ops = _ops()
        run = ops.triton_varlen_fwd if torch.compiler.is_compiling() or call.features.needs_grad else \
            ops.launch_varlen_fwd
        return run(call.q, call.k, call.v, call.alibi_slopes, call.sinks, call.cu_seqlens_q, call.cu_seqlens_k,
                   call.seqused_q, call.seqused_k, call.cache_leftpad, call.cache_batch_idx, call.block_table,
                   call.num_seqs, call.max_seqlen_q, call.max_seqlen_k, call.scale, left, right, call.lower_right,
                   call.softcap, num_splits)
