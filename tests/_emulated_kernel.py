"""Build and load csrc/emulation/ (the CUDA kernel's body run on the CPU) for the tests.

Compiled with the host compiler through torch.utils.cpp_extension into the fastattn
cache, keyed by the sources, torch and the CUTLASS headers; ninja's lock makes
concurrent test workers build it once. Needs the CUTLASS headers (nvidia-cutlass) and
a CUDA toolkit's headers (cuda_runtime_api.h, and CCCL's cuda/std for CUTLASS).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from fastattn import _extension

SOURCE = _extension.CSRC / "emulation" / "flash_fwd_emulated.cpp"
_loaded: Optional[str] = None  # the library loaded into this process


def why_not() -> Optional[str]:
    """Why the emulation cannot be built here (None when it can)."""
    if _extension.find_cutlass_include()[0] is None:
        return "the CUTLASS headers are not installed (pip install nvidia-cutlass)"
    if _extension.find_cuda_home()[0] is None:
        return "no CUDA toolkit headers (cuda_runtime_api.h) found"
    if not _extension._has_ninja():
        return "ninja is not installed"
    return None


def _include_dirs() -> list[str]:
    cuda = Path(_extension.find_cuda_home()[0])
    dirs = [_extension.find_cutlass_include()[0], str(_extension.CSRC), str(cuda / "include")]
    if (cuda / "include" / "cccl").is_dir():  # CUDA 13 keeps libcu++ (cuda/std/...) there
        dirs.append(str(cuda / "include" / "cccl"))
    return dirs


def load() -> None:
    """Build (once per source version) and load torch.ops.fastattn_emulated."""
    global _loaded
    if _loaded:
        return
    from torch.utils import cpp_extension

    includes = _include_dirs()
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(_extension.CSRC.rglob("*")):
        if path.suffix in (".cuh", ".h", ".cpp") and path.is_file():
            h.update(path.read_bytes())
    h.update((Path(includes[0]) / "cutlass" / "version.h").read_bytes())
    directory = _extension.cache_root() / "emulated" / h.hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="fastattn_emulated", sources=[str(SOURCE)], extra_include_paths=includes,
                       extra_cflags=["-O1", "-w"], build_directory=str(directory), with_cuda=False,
                       is_python_module=False)  # also loads it into torch.ops
    _loaded = str(directory)


def fwd(q, k, v, scale, window_left=-1, window_right=-1, lower_right=False, softcap=0.0, seqused_k=None,
        num_splits=0, key_mask=None, eager_copies=False):
    """torch.ops.fastattn.fwd's contract on CPU tensors: (out, lse), plus (out_accum,
    lse_accum) with num_splits > 1."""
    return torch.ops.fastattn_emulated.fwd(q, k, v, scale, window_left, window_right, lower_right, softcap,
                                           seqused_k, num_splits, key_mask, eager_copies)
