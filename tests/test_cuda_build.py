"""CI: compile csrc/ with nvcc for sm_80 and sm_90 against the CUDA build of torch, then
load the library and check its symbols and ops. Needs no GPU (torch loads the CUDA
runtime lazily). A representative subset is compiled: head dims 64, 96 and 256 (every
distinct tile configuration: 128-key tiles, the narrow swizzle for 96, 64-row tiles for 256;
head dim 128 differs from 64 only in sizes) in both dtypes, causal and not, plus the op
and the split-KV merge: about 3 minutes on 2 cores (CuTe templates compile slowly;
everything takes 4.5). The GPU check builds all of it. Deselect with ``-m "not cuda_build"``.

The host compiler is wrapped to link libstdc++ statically, as the H100 image's does: the
library must still use the process's C++ runtime (``_extension.LINK_FLAGS``).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastattn import _extension
from fastattn.backends import cuda as cuda_backend

HEAD_DIMS = (64, 96, 256)

pytestmark = pytest.mark.cuda_build


def _why_not() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU-only build: nothing to compile against"
    root, tried = _extension.find_cuda_home()
    if root is None:
        return f"no nvcc (CUDA toolkit) found in {', '.join(tried)}"
    if not _extension._has_ninja():
        return "ninja is not installed"
    return None


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("fastattn_cuda_build")
    real_cxx = shutil.which(os.environ.get("CXX", "c++"))
    wrapper = directory / "static-libstdcxx-g++"
    wrapper.write_text(f'#!/bin/sh\nexec "{real_cxx}" "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CXX", str(wrapper))
        try:
            lib = _extension.build(("8.0", "9.0"), HEAD_DIMS, directory=directory / "build", jobs=4,
                                   load_library=True)
        except _extension.BuildError as exc:
            pytest.fail(f"csrc/ does not build: {exc}")
    return Path(lib)


def test_library_uses_the_process_cxx_runtime(built_library):
    # Its own copy of libstdc++ made number formatting in error messages crash on the H100.
    needed = subprocess.run(["readelf", "-d", str(built_library)], capture_output=True, text=True,
                            check=True).stdout
    assert "libstdc++.so" in needed, f"{built_library.name} does not link libstdc++ dynamically"
    symbols = subprocess.run(["nm", "--defined-only", "-C", str(built_library)], capture_output=True,
                             text=True, check=True).stdout
    assert "std::locale::id::_M_id" not in symbols, f"{built_library.name} carries its own libstdc++"


def test_library_exports_every_instantiation(built_library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", "-C", str(built_library)], capture_output=True,
                             text=True, check=True).stdout
    for dtype in ("Half", "BFloat16"):
        for head_dim in HEAD_DIMS:
            for bounded in ("true", "false"):
                want = f"launch_flash_fwd<fastattn::{dtype}, {head_dim}, {bounded}>"
                assert want in symbols, f"{want} missing from {built_library.name}"
        assert f"launch_flash_combine<fastattn::{dtype}>" in symbols


def test_library_registers_the_ops(built_library):
    assert tuple(torch.ops.fastattn.head_dims()) == HEAD_DIMS
    schema = str(torch.ops.fastattn.fwd.default._schema)
    assert "Tensor? seqused_k=None" in schema and "int num_splits=0" in schema


def test_fake_implementation_passes_opcheck(built_library):
    from fastattn.ops import cuda_fwd

    cuda_fwd.register_fake_impl()
    q = torch.randn(2, 8, 5, 64, dtype=torch.float16, device="meta").transpose(1, 2)  # (B, H, L, D) view
    k = torch.randn(2, 2, 33, 64, dtype=torch.float16, device="meta")
    used = torch.tensor([33, 7], dtype=torch.int32, device="meta")
    torch.library.opcheck(torch.ops.fastattn.fwd.default, (q, k, k, 0.125, -1, 0, True, 0.0, used, 0))
    out, lse = torch.ops.fastattn.fwd(q, k, k, 0.125)
    assert out.shape == (2, 5, 8, 64) and out.stride() == q.new_empty((2, 8, 5, 64)).transpose(1, 2).stride()
    assert lse.shape == (2, 5, 8) and lse.dtype == torch.float32


def test_op_refuses_cpu_tensors(built_library):
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    with pytest.raises(NotImplementedError):
        torch.ops.fastattn.fwd(q, q, q, 0.125)


def test_backend_messages_appear_in_the_cpp_checks():
    source = (_extension.CSRC / "flash_api.cpp").read_text()
    for message in cuda_backend.SHARED_WITH_CPP:
        assert message.strip() in source, f"the C++ op does not say {message!r}"
