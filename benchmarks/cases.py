"""Benchmark cases: the grids, and the inputs one case is run on.

Shapes follow the field's usual attention benchmark: a hidden size of 2048
(heads = 2048 / head_dim) and batch x seqlen = 16k tokens, so every point of a
grid does comparable work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastattn.testing import attention_flops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = 16 * 1024
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class Case:
    """One attention call to time. ``seqlen_q == 1`` is a decode step against a
    KV cache of ``seqlen_k`` keys; ``padded`` gives each sequence of the batch a
    key-padding mask with about half of its keys masked (an encoder batch)."""

    grid: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool = False
    padded: bool = False
    mode: str = "fwd"  # "fwd" or "bwd"
    layout: str = "bshd"  # storage of q/k/v: (B, S, H, D) as a model produces it, or (B, H, S, D)

    @property
    def decode(self) -> bool:
        return self.seqlen_q == 1

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        heads = f"h{self.heads_q}" + (f"/{self.heads_kv}" if self.gqa else "")
        if self.decode:
            pad = " pad50%" if self.padded else ""
            return f"{self.dtype} d{self.head_dim} {heads} B{self.batch} KV{_k(self.seqlen_k)} decode{pad}"
        parts = [self.dtype, f"d{self.head_dim}", heads, f"B{self.batch}", f"L{_k(self.seqlen_q)}"]
        if self.seqlen_k != self.seqlen_q:
            parts.append(f"S{_k(self.seqlen_k)}")
        parts.append("causal" if self.causal else "full")
        if self.padded:
            parts.append("pad50%")
        if self.mode != "fwd":
            parts.append(self.mode)
        return " ".join(parts)

    def flops(self) -> float:
        """flash-attn's convention: 4·B·H·L·S·D forward, x0.5 causal, x2.5 backward
        (a padded batch counts its full padded shape)."""
        return attention_flops(self.batch, self.heads_q, self.seqlen_q, self.seqlen_k, self.head_dim,
                               causal=self.causal, mode=self.mode)

    def bytes_moved(self) -> float:
        """Minimum global-memory traffic of a forward: read q, k, v once, write out."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        kv = 2 * self.batch * self.heads_kv * self.seqlen_k * self.head_dim
        qo = 2 * self.batch * self.heads_q * self.seqlen_q * self.head_dim
        return float((kv + qo) * elem)

    def as_row(self) -> dict:
        return dict(grid=self.grid, mode=self.mode, case=self.label, dtype=self.dtype, batch=self.batch,
                    heads_q=self.heads_q, heads_kv=self.heads_kv, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k,
                    head_dim=self.head_dim, causal=int(self.causal), padded=int(self.padded), layout=self.layout)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# --------------------------------------------------------------------------- grids


def standard(mode: str = "fwd") -> list[Case]:
    """bf16/fp16 x head dim 64/128/256 x seqlen 512..16k x causal/full, 16k tokens per batch."""
    return [Case("standard", dtype, TOKENS // L, HIDDEN // d, HIDDEN // d, L, L, d, causal, mode=mode)
            for dtype in ("bf16", "fp16") for d in (64, 128, 256) for causal in (False, True) for L in SEQLENS]


def gqa(mode: str = "fwd") -> list[Case]:
    """Llama-3-8B attention: 32 query heads sharing 8 key/value heads, head dim 128."""
    return [Case("gqa", "bf16", TOKENS // L, 32, 8, L, L, 128, causal, mode=mode)
            for causal in (False, True) for L in SEQLENS]


def padded(mode: str = "fwd") -> list[Case]:
    """An encoder batch: key-padding mask, about half the positions padding."""
    return [Case("padded", "bf16", TOKENS // L, HIDDEN // d, HIDDEN // d, L, L, d, False, True, mode=mode)
            for d in (64, 128) for L in (512, 1024, 2048, 4096)]


DECODE_MAX_TOKENS = 2 * 1024 * 1024  # batch x KV length cap: K+V of 8 kv heads x 128 = 8 GiB in bf16


def decode(mode: str = "fwd") -> list[Case]:
    """One query token per sequence against a KV cache (Llama-3-8B heads), KV 1k..128k, batch 1..64.
    Pairs with batch x KV above DECODE_MAX_TOKENS are left out."""
    return [Case("decode", "bf16", b, 32, 8, 1, kv, 128, layout="bhsd")
            for b in (1, 8, 64) for kv in (1024, 4096, 16384, 65536, 131072) if b * kv <= DECODE_MAX_TOKENS]


def key(mode: str = "fwd") -> list[Case]:
    """The short list the GPU check runs: hd128 bf16 at 2k/8k both ways, GQA, one long decode,
    and the same decode with a key-padding mask (batched generation: the Triton kernel's case)."""
    cases = [Case("key", "bf16", TOKENS // L, 16, 16, L, L, 128, causal, mode=mode)
             for causal in (False, True) for L in (2048, 8192)]
    cases.append(Case("key", "bf16", TOKENS // 4096, 32, 8, 4096, 4096, 128, True, mode=mode))
    cases.append(Case("key", "bf16", 8, 32, 8, 1, 65536, 128, layout="bhsd"))
    cases.append(Case("key", "bf16", 8, 32, 8, 1, 65536, 128, False, True, layout="bhsd"))
    return cases


def kernels(mode: str = "fwd") -> list[Case]:
    """What the triton-or-cuda priority rule is read from: bf16 head dims 64 and 256 at 4k both
    ways, fp16 at head dim 128, and a GQA decode at head dim 64 (the key grid has hd128 bf16)."""
    cases = [Case("kernels", "bf16", TOKENS // 4096, HIDDEN // d, HIDDEN // d, 4096, 4096, d, causal, mode=mode)
             for d in (64, 256) for causal in (False, True)]
    cases.append(Case("kernels", "fp16", TOKENS // 4096, 16, 16, 4096, 4096, 128, True, mode=mode))
    cases.append(Case("kernels", "bf16", 8, 32, 8, 1, 65536, 64, layout="bhsd"))
    return cases


def cpu(quick: bool = False) -> list[Case]:
    """Small and medium CPU shapes, where the front end's own cost shows."""
    cases = [Case("cpu", "fp32", 1, 8, 8, 64, 64, 64, layout="bhsd"),
             Case("cpu", "fp32", 1, 8, 8, 128, 128, 64, True, layout="bhsd")]
    if not quick:
        cases += [Case("cpu", "fp32", 1, 32, 8, 1, 1024, 128, layout="bhsd"),
                  Case("cpu", "fp32", 2, 16, 16, 512, 512, 64, True, layout="bhsd"),
                  Case("cpu", "bf16", 2, 16, 16, 512, 512, 64, False, layout="bhsd")]
    return cases


def interpreter() -> list[Case]:
    """Tiny shapes for the Triton kernel under TRITON_INTERPRET=1 on the CPU."""
    return [Case("interpreter", "fp16", 1, 2, 2, 64, 64, 64, False, layout="bhsd"),
            Case("interpreter", "fp16", 1, 2, 2, 64, 64, 64, True, layout="bhsd")]


GRIDS = {"standard": standard, "gqa": gqa, "padded": padded, "decode": decode, "key": key, "kernels": kernels}


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """q/k/v as SDPA-layout (B, H, S, D) views, the leaves autograd differentiates,
    and for a padded batch the bool key-padding mask (B, 1, 1, S) and the lengths."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    leaves: tuple
    mask: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    dout: Optional[torch.Tensor] = None


def padded_lengths(batch: int, seqlen: int, device) -> torch.Tensor:
    """Lengths spread evenly over [seqlen/4, 3·seqlen/4]: half the batch's positions are padding."""
    lo, hi = max(1, seqlen // 4), max(1, (3 * seqlen) // 4)
    return torch.linspace(lo, hi, batch, device=device).round().to(torch.int32)


def padded_row_mask(lengths: torch.Tensor, seqlen: int, causal: bool = True) -> torch.Tensor:
    """(B, 1, L, L) bool, as a right-padded batch sends it: each sequence's real keys, and
    with ``causal`` only those at or before the query (a mask that differs per query row)."""
    keys = torch.arange(seqlen, device=lengths.device)
    keep = (keys[None, None, :] < lengths[:, None, None]).expand(len(lengths), seqlen, seqlen)
    if causal:
        keep = keep & (keys[None, :, None] >= keys[None, None, :])
    return keep[:, None].contiguous()


def make_inputs(case: Case, device, requires_grad: Optional[bool] = None) -> Inputs:
    """Fresh random inputs (never zeros) for one case."""
    dtype = case.torch_dtype
    requires_grad = case.mode == "bwd" if requires_grad is None else requires_grad

    def make(heads: int, seqlen: int):
        if case.layout == "bshd":
            t = torch.randn(case.batch, seqlen, heads, case.head_dim, device=device, dtype=dtype)
            return t.requires_grad_(requires_grad), (lambda x: x.transpose(1, 2))
        t = torch.randn(case.batch, heads, seqlen, case.head_dim, device=device, dtype=dtype)
        return t.requires_grad_(requires_grad), (lambda x: x)

    (q, to_q), (k, to_k), (v, to_v) = make(case.heads_q, case.seqlen_q), make(case.heads_kv, case.seqlen_k), \
        make(case.heads_kv, case.seqlen_k)
    inputs = Inputs(to_q(q), to_k(k), to_v(v), leaves=(q, k, v))
    if case.padded:
        lengths = padded_lengths(case.batch, case.seqlen_k, device)
        keys = torch.arange(case.seqlen_k, device=device)
        inputs.lengths = lengths
        inputs.mask = (keys[None, :] < lengths[:, None].long())[:, None, None, :]
    if case.mode == "bwd":
        inputs.dout = torch.randn_like(inputs.q.detach())
    return inputs
