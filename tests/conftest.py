"""Kernels run on the GPU when there is one, else through the Triton interpreter
(which must be switched on before Triton kernels are first defined)."""
import os
import tempfile
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # What the tests compile (the emulated CUDA kernel) goes to a cache of their own under the
    # system's temp dir, not the user's ~/.cache/fastattn. (A GPU run keeps the real cache:
    # the GPU check's build stage fills it for the tests.)
    os.environ.setdefault("FASTATTN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fastattn-tests-{os.getuid()}"))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible draw for every test case.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def device():
    return DEVICE
