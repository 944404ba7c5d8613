"""The CUDA C++ flash-attention kernel (csrc/, built by fastattn/_extension.py).

Reasons are sentences shared with the C++ op's TORCH_CHECKs (csrc/flash_api.cpp says
the same thing for the same input; tests/test_cuda_backend.py holds the two together).
Head dims are compiled for 64, 96, 128 and 256; any other head dim (and a value head
dim different from the query's) is zero-padded up to the next compiled one, which
changes neither the scores nor the kept output columns.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _device, _extension
from .._env import constant_while_tracing
from ..inputs import HALF_DTYPES, AttentionCall, Features
from .base import ALL_FEATURES, Backend, Support, head_dim_reason

MIN_CAPABILITY = _extension.MIN_ARCH  # what the extension is compiled for

# One sentence per reason; the C++ op's messages contain the same text. The dtype and head-dim
# sentences are worded by backends/base.py for every backend (tests/test_cuda_backend.py checks
# the whole sentences, tests/test_cuda_build.py the C++ side).
MSG_DEVICE = "the cuda backend needs tensors on a CUDA device"
MSG_DTYPE = "is not supported (supported: float16, bfloat16)"
MSG_LAST_DIM = "the last dim of q, k and v must be contiguous (stride 1)"
MSG_HEAD_DIM = "is too large (supported: <= {max})"  # as base.head_dim_reason words it
MSG_CAPABILITY = "is too old (the cuda backend needs 8.0 or newer)"
SHARED_WITH_CPP = (MSG_DEVICE, MSG_DTYPE, MSG_LAST_DIM, MSG_HEAD_DIM.split("{")[0], MSG_CAPABILITY)


def padded_head_dim(head_dim: int, compiled: tuple[int, ...]) -> Optional[int]:
    """The smallest compiled head dim >= head_dim (None if there is none)."""
    return next((d for d in sorted(compiled) if d >= head_dim), None)


def _kernel_ready(t: torch.Tensor, head_dim: int) -> bool:
    """What the kernel reads directly: the compiled head dim, last dim contiguous, 16-byte
    aligned start and batch/head/row strides in multiples of 8 elements (16-byte copies).
    While torch.compile traces there is no data pointer to read: the start is assumed aligned,
    as model activations and KV caches are (the op checks the real pointer and says so if not)."""
    aligned = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return t.shape[-1] == head_dim and t.stride(-1) == 1 and aligned and all(t.stride(i) % 8 == 0 for i in range(3))


@constant_while_tracing  # torch.compile reads it while tracing (a lock and file checks inside)
def _extension_state() -> tuple[bool, str, tuple[int, ...]]:
    """(loaded, reason, compiled head dims) of the CUDA extension, as :func:`_extension.load` says."""
    status = _extension.load()
    return status.loaded, status.reason or "", tuple(status.head_dims) if status.loaded else ()


def prepare(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``t`` itself when the kernel can read it, else a zero-padded / aligned copy."""
    if _kernel_ready(t, head_dim):
        return t
    t = F.pad(t, (0, head_dim - t.shape[-1])) if t.shape[-1] != head_dim else t
    return t if _kernel_ready(t, head_dim) else t.clone(memory_format=torch.contiguous_format)  # fresh, aligned


class CudaBackend(Backend):
    name = "cuda"
    description = ("CUDA C++ flash-attention forward (csrc/, CuTe tensor-core MMA, sm80+): fp16/bf16, head dims "
                   "<= 256 (compiled 64/96/128/256, others padded), GQA/MQA, causal (both alignments), windows, "
                   "softcap, key-padding masks, split-KV decode")
    forward = Support(dtypes=HALF_DTYPES, features=ALL_FEATURES - {"alibi", "sinks", "dropout"})
    backward = None  # forward only

    def prepare(self) -> bool:
        before = _extension.load()
        return not before.loaded and _extension.load(build=True).loaded

    def availability(self) -> list[str]:
        loaded, reason, _ = _extension_state()
        return [] if loaded else [f"the CUDA extension is not available: {reason}"]

    def compiled_head_dims(self) -> tuple[int, ...]:
        loaded, _, head_dims = _extension_state()
        return head_dims if loaded else _extension.ALL_HEAD_DIMS

    def extra_reasons(self, f: Features) -> list[str]:
        reasons = []
        if f.device_type != "cuda":
            reasons.append(f"query is on {f.device_type}; {MSG_DEVICE}")
        else:
            reasons += self.availability()
            major, minor = _device.capability(f.device_index)
            if (major, minor) < MIN_CAPABILITY:
                reasons.append(f"GPU compute capability {major}.{minor} {MSG_CAPABILITY}")
        # Head dims: what this build compiled (padded up to), not a fixed limit.
        compiled = self.compiled_head_dims() if f.device_type == "cuda" else _extension.ALL_HEAD_DIMS
        head_dim = max(f.head_dim, f.head_dim_v)
        if padded_head_dim(head_dim, compiled) is None:
            reasons.append(head_dim_reason(head_dim, max(compiled)) + f" (compiled: {', '.join(map(str, compiled))})")
        if f.empty:
            reasons.append("an empty sequence or head dim: nothing for a kernel to do")
        if not f.last_dim_contiguous:
            reasons.append(MSG_LAST_DIM)
        if f.mask_dtype is not None and not (f.mask_dtype == torch.bool and f.mask_key_padding):
            reasons.append(f"an attn_mask ({f.mask_dtype}) that varies over heads or query rows, or is not bool, is "
                           "not supported; the cuda kernel takes a bool key-padding mask (one row per sequence), "
                           "causal, windows and per-batch key lengths")
        if f.layout != "dense":
            reasons.append(f"a {f.layout} layout (per-sequence lengths, offsets or pages) is not supported by the "
                           "cuda kernel yet; the triton kernel runs it")
        return reasons

    def run(self, call: AttentionCall, *, seqused_k: Optional[torch.Tensor] = None, num_splits: int = 0):
        from ..ops.cuda_fwd import fwd

        head_dim_v = call.v.shape[-1]
        head_dim = padded_head_dim(max(call.q.shape[-1], head_dim_v), self.compiled_head_dims())
        q, k, v = (prepare(t, head_dim) for t in (call.q, call.k, call.v))
        left, right = call.key_bounds
        key_mask = None
        if call.mask is not None:  # (B or 1, 1, 1, S) up to broadcast dims: the (B or 1, S) row
            m = call.mask.reshape((1,) * (4 - call.mask.dim()) + tuple(call.mask.shape))
            key_mask = m[:, 0, 0, :].expand(m.shape[0], call.seqlen_k).contiguous()
        out, lse = fwd(q, k, v, call.scale, left, right, call.lower_right, call.softcap, seqused_k, num_splits,
                       key_mask)
        return out[..., :head_dim_v], lse
