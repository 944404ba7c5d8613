"""The Triton flash-attention kernel (fastattn/kernels/triton)."""
from __future__ import annotations

import torch

from .. import _device
from .._env import constant_while_tracing, interpreting
from ..inputs import HALF_DTYPES, AttentionCall, Features
from .base import Backend, forward_only_reasons

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
    description = ("Triton flash-attention forward: fp16/bf16, head dims <= 256, GQA/MQA, causal (both alignments), "
                   "windows, softcap, ALiBi, bool/additive masks")
    dtypes = HALF_DTYPES
    max_head_dim = MAX_HEAD_DIM

    def availability(self) -> list[str]:
        err = _import_error()
        return [f"triton cannot be imported ({err}); install it with `pip install triton`"] if err else []

    def not_supported_reasons(self, f: Features) -> list[str]:
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
        if f.dtype not in self.dtypes:
            reasons.append(f"dtype {f.dtype} is not supported (supported: float16, bfloat16)")
        if f.head_dim > MAX_HEAD_DIM or f.head_dim_v > MAX_HEAD_DIM:
            reasons.append(f"head_dim={max(f.head_dim, f.head_dim_v)} is too large (supported: <= {MAX_HEAD_DIM})")
        if f.empty:
            reasons.append("an empty sequence or head dim: nothing for a kernel to do")
        if f.layout != "dense" and f.mask_dtype is not None:
            reasons.append(f"an attn_mask beside a {f.layout} layout is not supported (per-sequence lengths say "
                           "which keys each sequence has)")
        if f.layout != "dense" and f.needs_grad:
            reasons.append(f"inputs require grad and the {f.layout} layout has no backward kernel yet")
        return reasons + forward_only_reasons(f)

    def run(self, call: AttentionCall, *, num_splits: int = 0):
        left, right = call.key_bounds
        if call.layout != "dense":
            return self._run_per_sequence(call, left, right, num_splits)
        if torch.compiler.is_compiling():
            # Opaque to the compiler, with a fake implementation (fastattn/ops/triton_fwd.py).
            from ..ops.triton_fwd import triton_fwd

            return triton_fwd(call.q, call.k, call.v, call.mask, call.alibi_slopes, call.sinks, call.scale,
                              left, right, call.diag_offset, call.softcap)
        from ..kernels.triton.flash_fwd import flash_attn_forward

        return flash_attn_forward(
            call.q, call.k, call.v,
            scale=call.scale,
            mask=call.mask,
            causal_bounds=(left, right),
            diag_offset=call.diag_offset,
            softcap=call.softcap,
            alibi_slopes=call.alibi_slopes,
            sinks=call.sinks,
        )

    def _run_per_sequence(self, call: AttentionCall, left: int, right: int, num_splits: int):
        """Varlen and paged calls: the kernel reads each sequence's lengths, offsets and pages."""
        if torch.compiler.is_compiling():
            from ..ops.triton_varlen import triton_varlen_fwd

            return triton_varlen_fwd(
                call.q, call.k, call.v, call.alibi_slopes, call.sinks, call.cu_seqlens_q, call.cu_seqlens_k,
                call.seqused_q, call.seqused_k, call.cache_leftpad, call.cache_batch_idx, call.block_table,
                call.num_seqs, call.max_seqlen_q, call.max_seqlen_k, call.scale, left, right, call.lower_right,
                call.softcap, num_splits)
        from ..kernels.triton.flash_fwd import Sequences, flash_attn_forward

        seqs = Sequences(call.num_seqs, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
                         call.seqused_q, call.seqused_k, call.cache_leftpad, call.cache_batch_idx, call.block_table,
                         call.lower_right)
        return flash_attn_forward(call.q, call.k, call.v, scale=call.scale, causal_bounds=(left, right),
                                  softcap=call.softcap, alibi_slopes=call.alibi_slopes, sinks=call.sinks,
                                  num_splits=num_splits or None, seqs=seqs)
