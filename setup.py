"""Build script.

The default install is pure Python: the Triton kernels compile at first use and the
CUDA extension in csrc/ is built just in time (see fastattn/_extension.py).
Set FASTATTN_BUILD_CUDA=1 to compile csrc/ ahead of time with ninja, into
fastattn/_C*.so (which fastattn/_extension.py loads before trying its JIT cache).
FASTATTN_CUDA_ARCHS ("8.0;9.0+PTX" by default, or the visible GPUs') and
FASTATTN_CUDA_HEAD_DIMS ("64,96,128,256" by default) limit what is compiled.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (fastattn/csrc/), so that a wheel or a regular install
    can compile the CUDA extension just in time; an editable install reads the checkout's."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_tree("csrc", os.path.join(self.build_lib, "fastattn", "csrc"))


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}

if os.environ.get("FASTATTN_BUILD_CUDA", "0") == "1":
    import sys

    # fastattn/_extension.py holds the one list of sources and flags; it imports only the
    # standard library at module level, so it loads here before fastattn is installed.
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_fastattn_extension", here / "fastattn" / "_extension.py")
    extension = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = extension  # dataclasses look their module up there
    spec.loader.exec_module(extension)

    root, tried = extension.find_cuda_home()
    if root is None:
        raise SystemExit("FASTATTN_BUILD_CUDA=1: no CUDA toolkit (bin/nvcc with lib64/libcudart.so) in "
                         f"{', '.join(tried)}; set CUDA_HOME to the toolkit root")
    extension._use_cuda_home(root)  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = extension.target_archs() or extension.DEFAULT_AOT_ARCHS  # a wheel for other GPUs than this old one
    head_dims = extension.parse_head_dims(os.environ.get(extension.ENV_HEAD_DIMS))
    try:
        cutlass_include = extension.cutlass_include_or_raise()
    except extension.BuildError as exc:
        raise SystemExit(f"FASTATTN_BUILD_CUDA=1: {exc}")
    flags = extension.compile_flags(archs, head_dims, cutlass_include)
    ext_modules.append(CUDAExtension(
        name="fastattn._C",
        sources=[str(s.relative_to(here)) for s in extension.sources(head_dims)],
        include_dirs=[str(extension.CSRC)],
        extra_compile_args={"cxx": flags.cxx, "nvcc": flags.nvcc},
        extra_link_args=flags.ld,
    ))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
