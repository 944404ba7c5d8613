"""``torch.ops.fastattn.triton_fwd``: the Triton kernel as a custom op.

Under ``torch.compile`` (Transformers compiles the forward for StaticCache
generation, for one) the launcher must not be traced: Inductor cannot lower its
bool-mask reinterpretation, and a kernel launch is no graph op anyway. The op
is opaque to the compiler, and its fake implementation gives the output shapes
and layouts. In eager mode the backend calls the launcher directly and skips the
op's dispatch overhead.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import empty_outputs


@torch.library.custom_op("fastattn::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor], scale: float,
               window_left: int, window_right: int, diag_offset: int,
               softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.triton.flash_fwd import flash_attn_forward

    return flash_attn_forward(q, k, v, scale=scale, mask=mask, causal_bounds=(window_left, window_right),
                              diag_offset=diag_offset, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


@triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, mask, alibi_slopes, sinks, scale, window_left, window_right, diag_offset, softcap):
    return empty_outputs(q, v.shape[-1])
