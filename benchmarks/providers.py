"""What the harness times: every fastattn backend (forced), fastattn's own
dispatch, torch SDPA per backend, FlexAttention (compiled) and flash-attn.

A provider either says why it cannot run a case (``reasons``) or builds a
zero-argument function that runs one forward on prepared inputs (``build``);
input preparation (layouts, packing, block masks) stays outside that function
and so outside the timing.
"""
from __future__ import annotations

import importlib
import re
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastattn

from .cases import Case, Inputs

# Captured at import, in case something later replaces the public function.
torch_sdpa = F.scaled_dot_product_attention


class Provider:
    name: str = ""
    family: str = ""  # "fastattn", "sdpa" or "peer": the table's reference is the best "sdpa"

    def reasons(self, case: Case, inputs: Inputs) -> list[str]:
        """Why this provider cannot run the case (empty = it can)."""
        return []

    def build(self, case: Case, inputs: Inputs) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def backend(self, case: Case, inputs: Inputs) -> str:
        """The kernel that actually runs (for the automatic dispatch: the chosen one)."""
        return self.name

    def to_sdpa_layout(self, out: torch.Tensor) -> Optional[torch.Tensor]:
        """The output as (B, H, L, D) for the accuracy column, or None if not comparable."""
        return out


def _sdpa_args(case: Case, inputs: Inputs) -> dict:
    return dict(attn_mask=inputs.mask, is_causal=case.causal, enable_gqa=case.gqa)


# --------------------------------------------------------------------------- fastattn


class Fastattn(Provider):
    """fastattn's SDPA front end, forced onto one backend, or (``backend=None``) left to its dispatch."""

    family = "fastattn"

    def __init__(self, backend: Optional[str] = None):
        self.forced = backend
        self.name = f"fastattn:{backend or 'auto'}"

    def _explain(self, case: Case, inputs: Inputs):
        with fastattn.use_backend(self.forced or "auto"):
            return fastattn.explain(inputs.q, inputs.k, inputs.v, **_sdpa_args(case, inputs))

    def reasons(self, case, inputs):
        decision = self._explain(case, inputs)
        if self.forced:
            return list(decision.reasons(self.forced))
        return [] if decision.chosen else [str(decision)]

    def backend(self, case, inputs):
        return self._explain(case, inputs).chosen or "-"

    def build(self, case, inputs):
        q, k, v, args = inputs.q, inputs.k, inputs.v, _sdpa_args(case, inputs)
        if self.forced is None:  # exactly what a user writes
            return lambda: fastattn.scaled_dot_product_attention(q, k, v, **args)

        def run():
            with fastattn.use_backend(self.forced):
                return fastattn.scaled_dot_product_attention(q, k, v, **args)
        return run


# --------------------------------------------------------------------------- torch SDPA


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, name)


_TRIGGERED = re.compile(r"\s*\(Triggered internally at[^)]*\)\.?", re.S)


class TorchSDPA(Provider):
    """torch's scaled_dot_product_attention, one backend forced with ``sdpa_kernel``
    (``backend=None``: torch's own choice). Torch explains a refusal in warnings;
    those become the reasons."""

    family = "sdpa"
    SHORT = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
             "MATH": "math"}

    def __init__(self, backend: Optional[str] = None):
        self.torch_backend = backend
        self.name = "sdpa:" + (self.SHORT[backend] if backend else "auto")

    def build(self, case, inputs):
        q, k, v, args = inputs.q, inputs.k, inputs.v, _sdpa_args(case, inputs)
        if self.torch_backend is None:
            return lambda: torch_sdpa(q, k, v, **args)
        from torch.nn.attention import sdpa_kernel
        backend = _sdpa_backend(self.torch_backend)

        def run():
            with sdpa_kernel(backend):
                return torch_sdpa(q, k, v, **args)
        return run

    @staticmethod
    def explain_failure(fn: Callable[[], torch.Tensor]) -> tuple[Optional[torch.Tensor], list[str]]:
        """Run ``fn`` once; on torch's "no available kernel" error return its warnings as reasons."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(), []
            except RuntimeError as exc:
                if "out of memory" in str(exc).lower():
                    raise
                said = [_TRIGGERED.sub("", str(w.message)).strip() for w in caught]
                said = [s for s in dict.fromkeys(said) if s and not s.endswith("not used because:")]
                return None, said or [str(exc).splitlines()[0]]


# --------------------------------------------------------------------------- FlexAttention


class Flex(Provider):
    """``torch.nn.attention.flex_attention`` under ``torch.compile`` (one compile per shape);
    causal and padding become a block mask built outside the timing."""

    name = "flex"
    family = "peer"

    def __init__(self):
        self._compiled = None

    def reasons(self, case, inputs):
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as exc:
            return [f"torch.nn.attention.flex_attention is not available in torch {torch.__version__} ({exc})"]
        if inputs.q.device.type != "cuda":
            return ["the benchmark runs FlexAttention on CUDA only"]
        if case.mode != "fwd" and case.decode:
            return ["decode has no backward"]
        return []

    def build(self, case, inputs):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        B, L, S, device = case.batch, case.seqlen_q, case.seqlen_k, inputs.q.device
        if case.padded:
            lengths = inputs.lengths

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx < lengths[b]
            block_mask = create_block_mask(mask_mod, B, None, L, S, device=device)
        elif case.causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            block_mask = create_block_mask(mask_mod, None, None, L, S, device=device)
        q, k, v, compiled = inputs.q, inputs.k, inputs.v, self._compiled
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=case.gqa)


# --------------------------------------------------------------------------- flash-attn


class FlashAttn(Provider):
    """flash-attn's ``flash_attn_func`` on (B, S, H, D) views; a padded batch goes
    through ``flash_attn_varlen_func`` on the packed valid tokens, as an encoder
    using flash-attn does (packing is outside the timing; queries of padding
    positions are not computed at all, so its padded times do less work)."""

    family = "peer"

    def __init__(self, module: str = "flash_attn"):
        self.module_name = module
        self.name = "flash_attn3" if module == "flash_attn_interface" else "flash_attn"

    @staticmethod
    def available(module: str = "flash_attn") -> bool:
        try:
            importlib.import_module(module)
            return True
        except Exception:
            return False

    def reasons(self, case, inputs):
        if inputs.q.device.type != "cuda":
            return ["flash-attn runs on CUDA only"]
        if case.torch_dtype not in (torch.float16, torch.bfloat16):
            return [f"dtype {case.dtype} is not supported (fp16/bf16 only)"]
        return []

    def build(self, case, inputs):
        mod = importlib.import_module(self.module_name)
        q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
        if not case.padded:
            return lambda: mod.flash_attn_func(q, k, v, causal=case.causal)
        keep = inputs.mask[:, 0, 0, :].reshape(-1)  # (B*S,) valid tokens, same for queries and keys
        idx = keep.nonzero().squeeze(1)
        cu = torch.zeros(case.batch + 1, dtype=torch.int32, device=q.device)
        cu[1:] = inputs.lengths.cumsum(0)
        maxlen = int(inputs.lengths.max())
        qp, kp, vp = (t.reshape(-1, t.shape[2], t.shape[3])[idx] for t in (q, k, v))
        return lambda: mod.flash_attn_varlen_func(qp, kp, vp, cu, cu, maxlen, maxlen, causal=case.causal)

    def to_sdpa_layout(self, out):
        if isinstance(out, tuple):  # flash-attn 3 returns (out, lse)
            out = out[0]
        return out.transpose(1, 2) if out.dim() == 4 else None


# --------------------------------------------------------------------------- the lists


def gpu_providers(names: Optional[list[str]] = None) -> tuple[list[Provider], list[str]]:
    """Every provider for a CUDA run (filtered to ``names`` if given), and notes on the ones left out."""
    found: list[Provider] = [Fastattn(name) for name in fastattn.registered_backends()] + [Fastattn()]
    found += [TorchSDPA(b) for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")]
    found += [TorchSDPA(), Flex()]
    notes = []
    for module in ("flash_attn", "flash_attn_interface"):
        if FlashAttn.available(module):
            found.append(FlashAttn(module))
        else:
            notes.append(f"{FlashAttn(module).name}: not installed (`import {module}` fails), left out")
    if names:
        unknown = set(names) - {p.name for p in found}
        if unknown:
            notes.append(f"unknown or unavailable providers asked for: {sorted(unknown)}")
        found = [p for p in found if p.name in names]
    return found, notes


def cpu_providers() -> list[Provider]:
    """The dispatch-overhead comparison: torch SDPA called directly vs fastattn's front end."""
    return [TorchSDPA(), Fastattn(), Fastattn("sdpa")]
