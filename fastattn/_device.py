"""Per-device facts, queried once per device index (layers under ``device_map`` live
on different GPUs, so nothing here may assume the current device)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ._env import constant_while_tracing


def _index(index: Optional[int]) -> int:
    return torch.cuda.current_device() if index is None else index


# torch.compile reads these while tracing (the device queries are not traceable)
@constant_while_tracing
def capability(index: Optional[int]) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (None = the current device)."""
    return _capability(_index(index))


@constant_while_tracing
def sm_count(index: Optional[int]) -> int:
    """Number of streaming multiprocessors of CUDA device ``index`` (None = the current device)."""
    return _sm_count(_index(index))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
