"""Build and load the CUDA extension in ``csrc/`` (with ninja), and record why it could not.

The contract, one line per case:

- ``import fastattn`` compiles and loads nothing (this module imports only the standard
  library at the top).
- :func:`load` never raises. It returns an :class:`ExtensionStatus`; when the library is
  not there, ``reason`` says why in one sentence (no CUDA torch, no GPU, no nvcc, a
  compile error, a load error), logged once. The ``cuda`` backend turns it into its
  reason in ``fastattn.explain`` and ``python -m fastattn``.
- Where the library comes from, first hit wins: the ahead-of-time build
  (``FASTATTN_BUILD_CUDA=1 pip install -e .`` puts ``fastattn/_C*.so`` next to this
  file), then the JIT cache, then -- only in a process that sees a CUDA device, and
  only when the cuda backend is asked for (``load(build=True)``: forcing the backend,
  ``python -m fastattn build``) -- a JIT build into the cache (minutes; a message says
  so). Choosing a backend never builds. ``FASTATTN_CUDA_JIT=0`` turns the JIT build off.
- The JIT cache lives in ``$FASTATTN_CACHE_DIR`` (default ``~/.cache/fastattn``), one
  directory per (fastattn version, torch version, CUDA version, architectures, head dims,
  hash of csrc/ and of the compile and link flags: what changes the binary, not this file),
  built under a file lock so concurrent processes build it once. A failed build leaves
  ``build_failed.txt`` there and is not retried by every process; run
  ``python -m fastattn build`` to retry (and to see the compiler output).
- ``FASTATTN_CUDA_ARCHS`` ("8.0;9.0+PTX", as TORCH_CUDA_ARCH_LIST) and
  ``FASTATTN_CUDA_HEAD_DIMS`` ("64,128") limit what is compiled. The JIT default is the
  visible GPUs' architectures and every head dim.

This file is also loaded by ``setup.py`` (by path, before fastattn is installed), so it
must not import the rest of the package at module level.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

__all__ = ["ExtensionStatus", "load", "build", "build_main", "reset", "find_cuda_home", "BuildError"]

logger = logging.getLogger("fastattn")

ALL_HEAD_DIMS = (64, 96, 128, 256)
MIN_ARCH = (8, 0)
DEFAULT_AOT_ARCHS = ("8.0", "9.0+PTX")  # sm_80 cubins also run on 8.6/8.7/8.9; PTX for newer GPUs
LIBRARY_NAME = "fastattn_cuda"
ENV_ARCHS = "FASTATTN_CUDA_ARCHS"
ENV_HEAD_DIMS = "FASTATTN_CUDA_HEAD_DIMS"
ENV_JIT = "FASTATTN_CUDA_JIT"
ENV_CACHE = "FASTATTN_CACHE_DIR"
ENV_CUTLASS = "FASTATTN_CUTLASS_DIR"



def _csrc() -> Path:
    """``csrc/`` of the source checkout (editable installs, setup.py), else the copy that a
    wheel ships inside the package (setup.py's build_py puts it there), so that a regular
    install can build just in time too."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "csrc"
    return checkout if (checkout / "flash_api.cpp").is_file() else here / "csrc"


CSRC = _csrc()


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message is the reason."""


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    reason: Optional[str] = None  # why not, when not loaded
    path: Optional[str] = None  # the shared library that was loaded
    head_dims: tuple[int, ...] = field(default=())  # compiled head dims, when loaded
    buildable: bool = False  # not loaded only because nothing asked for a build yet


# --------------------------------------------------------------------------- what to compile


def parse_head_dims(text: Optional[str]) -> tuple[int, ...]:
    """``"64,128"`` -> (64, 128); None/empty -> every head dim."""
    if not text or not text.strip():
        return ALL_HEAD_DIMS
    dims = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        if not part.isdigit() or int(part) not in ALL_HEAD_DIMS:
            raise BuildError(f"{ENV_HEAD_DIMS}: {part!r} is not a head dim this kernel has "
                             f"(choose from {', '.join(map(str, ALL_HEAD_DIMS))})")
        dims.append(int(part))
    return tuple(sorted(set(dims)))


def parse_archs(text: str) -> tuple[str, ...]:
    """``"8.0;9.0+PTX"`` (TORCH_CUDA_ARCH_LIST syntax, also comma-separated) -> ("8.0", "9.0+PTX")."""
    archs = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", part)
        if not m:
            raise BuildError(f"{ENV_ARCHS}: {part!r} is not an architecture like 8.0 or 9.0+PTX")
        if (int(m.group(1)), int(m.group(2))) < MIN_ARCH:
            raise BuildError(f"{ENV_ARCHS}: {part} is older than sm_80; the kernel needs sm_80 or newer")
        archs.append(part)
    if not archs:
        raise BuildError(f"{ENV_ARCHS} is empty")
    return tuple(archs)


def visible_archs() -> tuple[str, ...]:
    """The architectures of the visible GPUs (sm_80 or newer), e.g. ("9.0",)."""
    import torch

    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return tuple(f"{a}.{b}" for a, b in sorted(caps) if (a, b) >= MIN_ARCH)


def target_archs() -> tuple[str, ...]:
    """What to compile for when nobody says: $FASTATTN_CUDA_ARCHS, else the visible GPUs'
    architectures (empty when none is sm_80 or newer), else -- no GPU in this process --
    DEFAULT_AOT_ARCHS."""
    import torch

    if os.environ.get(ENV_ARCHS):
        return parse_archs(os.environ[ENV_ARCHS])
    return visible_archs() if torch.cuda.is_available() else DEFAULT_AOT_ARCHS


def arch_flags(archs: Sequence[str]) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def sources(head_dims: Sequence[int]) -> list[Path]:
    """The translation units: the op, the split-KV merge, and one file per
    (head dim, dtype, causal) for the requested head dims."""
    units = [CSRC / "flash_api.cpp", CSRC / "flash_fwd_combine.cu"]
    for d in head_dims:
        units += sorted((CSRC / "instantiations").glob(f"flash_fwd_hdim{d}_*.cu"))
    return units


class BuildFlags(NamedTuple):
    cxx: list[str]  # host compiler
    nvcc: list[str]
    ld: list[str]  # linker (through the host compiler)


# The C++ runtime is linked dynamically whatever the compiler's habit. The H100 image's host
# compiler (/opt/gcc/bin/g++, a g++ wrapper) links libstdc++ statically: the library then
# carries its own copy, whose locale facets torch's string streams do not know, and a
# TORCH_CHECK message that formats a number killed the process (segfault in
# ostream::_M_insert<long>; here, with -static-libstdc++, the number is silently left out).
# An explicit -lstdc++ among the library's own link arguments resolves from libstdc++.so
# before the driver's static archive is reached.
LINK_FLAGS = ["-lstdc++"]


def compile_flags(archs: Sequence[str], head_dims: Sequence[int], cutlass_include: str) -> BuildFlags:
    """The host compiler's, nvcc's and the linker's flags."""
    defines = [f"-DFASTATTN_HDIM_{d}" for d in head_dims]
    cxx = ["-O3", *defines]  # the C++ standard is torch's choice (C++20 for torch 2.14)
    nvcc = ["-O3", "-lineinfo", "-DNDEBUG", *defines, f"-I{cutlass_include}",
            "--expt-relaxed-constexpr",  # CuTe calls constexpr host functions from device code
            # torch compiles extensions with the CUDA half/bfloat16 operators switched off;
            # CUTLASS's numeric types use them
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            *arch_flags(archs)]
    return BuildFlags(cxx, nvcc, list(LINK_FLAGS))


# --------------------------------------------------------------------------- toolkit


def _looks_like_cuda_root(root: str) -> bool:
    p = Path(root)
    has_nvcc = (p / "bin" / "nvcc").is_file()
    has_cudart = (p / "lib64" / "libcudart.so").exists() or bool(glob.glob(str(p / "targets" / "*" / "lib" / "libcudart.so")))
    return has_nvcc and has_cudart


def find_cuda_home() -> tuple[Optional[str], list[str]]:
    """The CUDA toolkit root (the directory with bin/nvcc and lib64/libcudart.so or
    targets/*/lib/libcudart.so), and the candidates tried.

    torch guesses the root from ``which nvcc``, which is wrong when nvcc on PATH is a
    wrapper script or symlink outside the toolkit (torch then picks ``/usr/local``).
    Candidates, in order: $CUDA_HOME, $CUDA_PATH, nvcc on PATH with links resolved,
    /usr/local/cuda, /usr/local/cuda-* (newest first); the first real toolkit wins.
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    versioned = glob.glob("/usr/local/cuda-*")
    versioned.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", os.path.basename(p))], reverse=True)
    candidates += versioned
    tried = list(dict.fromkeys(candidates))
    for root in tried:
        if _looks_like_cuda_root(root):
            return os.path.realpath(root), tried
    return None, tried


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning:
    that only means no GPU is visible, which compiling does not need (our own first line
    says so), and it was the first thing a user of ``python -m fastattn build`` read."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _use_cuda_home(root: str) -> None:
    """Point torch's extension builder at ``root``. torch reads CUDA_HOME once, when
    torch.utils.cpp_extension is first imported, so the module's copy is set too."""
    os.environ["CUDA_HOME"] = root
    _cpp_extension().CUDA_HOME = root


def _is_cutlass_include(path: Path) -> bool:
    return (path / "cute" / "tensor.hpp").is_file() and (path / "cutlass" / "numeric_types.h").is_file()


def find_cutlass_include() -> tuple[Optional[str], list[str]]:
    """The CUTLASS/CuTe include directory (with cute/tensor.hpp), and the places tried:
    $FASTATTN_CUTLASS_DIR (the include directory or a CUTLASS checkout), $CUTLASS_PATH,
    then the headers shipped in the ``nvidia-cutlass`` package (``pip install
    nvidia-cutlass``; found without importing it)."""
    import importlib.util

    candidates: list[Path] = []
    for var in (ENV_CUTLASS, "CUTLASS_PATH"):
        if os.environ.get(var):
            candidates += [Path(os.environ[var]), Path(os.environ[var]) / "include"]
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "source" / "include")
    for path in candidates:
        if _is_cutlass_include(path):
            return str(path.resolve()), [str(c) for c in candidates]
    return None, [str(c) for c in candidates]


def cutlass_include_or_raise() -> str:
    path, tried = find_cutlass_include()
    if path is None:
        where = f" (tried {', '.join(tried)})" if tried else ""
        raise BuildError(f"the CUTLASS/CuTe headers were not found{where}; `pip install nvidia-cutlass` ships "
                         f"them, or set {ENV_CUTLASS} to a CUTLASS include directory")
    return path


# --------------------------------------------------------------------------- cache


def _fastattn_version() -> str:
    try:
        from importlib.metadata import version

        return version("fastattn")
    except Exception:
        return "dev"


def _source_hash(archs: Sequence[str], head_dims: Sequence[int]) -> str:
    """What the binary is made of besides the versions and architectures in the directory's name:
    the sources under csrc/ and the compiler's and linker's flags. Not this file: a comment or a
    fix to the loader must not rebuild every user's extension (only what changes the binary does)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h", ".hpp", ".cpp") and path.is_file():
            h.update(str(path.relative_to(CSRC)).encode())
            h.update(path.read_bytes())
    # The CUTLASS include directory differs between machines without changing the binary.
    flags = compile_flags(archs, head_dims, "<cutlass>")
    h.update(repr((flags.cxx, flags.nvcc, flags.ld)).encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastattn")
    return Path(base)


def build_dir(archs: Sequence[str], head_dims: Sequence[int]) -> Path:
    """One directory per fastattn, torch and CUDA version, architectures, head dims and sources."""
    import torch

    arch_key = "-".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    key = (f"fastattn{_fastattn_version()}-torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}"
           f"-sm{arch_key}-hd{'_'.join(map(str, head_dims))}-src{_source_hash(archs, head_dims)}")
    return cache_root() / "cuda-ext" / re.sub(r"[^A-Za-z0-9_.+-]", "_", key)


def _library_path(directory: Path) -> Path:
    return directory / f"{LIBRARY_NAME}.so"


# --------------------------------------------------------------------------- build


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(str(text).strip().splitlines()[-lines:])


def build(archs: Optional[Sequence[str]] = None, head_dims: Optional[Sequence[int]] = None, *,
          verbose: bool = False, jobs: Optional[int] = None, directory: Optional[Path] = None,
          load_library: bool = True) -> Path:
    """Compile csrc/ with ninja into the cache (or ``directory``) and load it.

    Returns the shared library's path; raises :class:`BuildError` with the reason.
    Holds a file lock on the build directory, so concurrent callers build once.
    With ``load_library=False`` only compiles (for machines without a GPU).
    """
    global _refused
    import torch

    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                         "install a CUDA build of torch")
    if not CSRC.is_dir():
        raise BuildError(f"the CUDA sources are not installed ({CSRC} is missing); reinstall fastattn "
                         "from a wheel or source tree that has them (pip install --force-reinstall fastattn)")
    head_dims = tuple(head_dims) if head_dims else parse_head_dims(os.environ.get(ENV_HEAD_DIMS))
    if archs is None:
        archs = target_archs()
        if not archs:
            raise BuildError("no visible GPU is sm_80 or newer; the cuda kernel needs Ampere or newer")
    root, tried = find_cuda_home()
    if root is None:
        raise BuildError("nvcc not found: no CUDA toolkit (bin/nvcc with lib64/libcudart.so) in "
                         f"{', '.join(tried)}; install the CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                         "and set CUDA_HOME to its root")
    _use_cuda_home(root)  # before anything imports torch.utils.cpp_extension (it reads CUDA_HOME once)
    cutlass_include = cutlass_include_or_raise()
    if not _has_ninja():
        raise BuildError("ninja not found; install it with `pip install ninja`")

    directory = Path(directory) if directory else build_dir(archs, head_dims)
    directory.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(directory / ".lock")):
        lib = _library_path(directory)
        failed = directory / "build_failed.txt"
        if not lib.exists():
            print(f"fastattn: compiling the CUDA extension: expect about {_minutes(estimate_seconds(archs, head_dims, jobs))} "
                  f"on this machine's {os.cpu_count()} cores, once (the result is cached). "
                  f"{len(sources(head_dims))} objects for sm {', '.join(archs)}, head dims {', '.join(map(str, head_dims))}, "
                  f"CUDA {root}, into {directory}"
                  + ("" if torch.cuda.is_available() else "; no GPU is visible (compiling needs none)")
                  + (". Progress follows; --verbose (python -m fastattn build) shows the compiler's commands."
                     if not verbose else "."),
                  file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                _compile(directory, archs, head_dims, cutlass_include, verbose=verbose, jobs=jobs)
                try:
                    _check_cxx_runtime(lib)
                except BuildError as refused:
                    lib.unlink()  # never found by a later process
                    _refused = str(refused)  # torch's builder has loaded it into this one already
                    raise
            except Exception as exc:
                reason = (str(exc) if isinstance(exc, BuildError)
                          else f"building the CUDA extension failed ({type(exc).__name__}): {_tail(str(exc))}")
                failed.write_text(reason + "\n")
                raise BuildError(reason) from exc
            failed.unlink(missing_ok=True)
            print(f"fastattn: built {lib} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    if load_library:
        _load_library(lib)
    return lib


def carries_own_cxx_runtime(lib: Path) -> Optional[bool]:
    """Whether ``lib`` has libstdc++ linked in rather than needed from the process (None:
    no readelf, or not a shared library it can read). The extension uses libstdc++
    throughout, so a library that does not list it as NEEDED carries a copy of its own."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    dynamic = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True)
    if dynamic.returncode != 0 or "(NEEDED)" not in dynamic.stdout:
        return None
    return "libstdc++.so" not in dynamic.stdout


def _check_cxx_runtime(lib: Path) -> None:
    """Refuse a library with its own libstdc++ (see LINK_FLAGS): it would crash on error messages."""
    if carries_own_cxx_runtime(lib):
        raise BuildError(f"{lib} has libstdc++ linked in statically (the host compiler's doing: CXX="
                         f"{os.environ.get('CXX', 'c++')} here), and such a library crashes when it reports an "
                         "error; rebuild it with a compiler that links libstdc++ dynamically, e.g. CXX=/usr/bin/g++")


def _has_ninja() -> bool:
    try:
        return _cpp_extension().is_ninja_available()
    except Exception:
        return False


# About a CPU-minute per kernel instantiation and architecture (CuTe templates compile slowly):
# 14 objects for 2 architectures took 13.6 minutes on an idle 2-core machine (tests/test_cuda_build.py).
CPU_SECONDS_PER_KERNEL_AND_ARCH = 60


def _parallel_jobs(jobs: Optional[int]) -> int:
    """How many compiles run at once: ninja's -j (MAX_JOBS), else its default, capped by the cores."""
    cores = os.cpu_count() or 1
    requested = jobs or int(os.environ.get("MAX_JOBS") or 0) or cores + 2
    return max(1, min(requested, cores))


def estimate_seconds(archs: Sequence[str], head_dims: Sequence[int], jobs: Optional[int] = None) -> float:
    """A rough wall-clock estimate of a build on this machine (the first line a user reads)."""
    kernels = sum(1 for s in sources(head_dims) if s.parent.name == "instantiations")
    return kernels * len(archs) * CPU_SECONDS_PER_KERNEL_AND_ARCH / _parallel_jobs(jobs) + 30


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class _Progress:
    """Reports, while ninja runs (its own output is hidden unless --verbose), how many of the
    objects exist in the build directory and the time elapsed: a line whenever that count
    changes, and at least once a minute."""

    def __init__(self, directory: Path, total: int, interval: float = 5.0, quiet_for: float = 60.0):
        self.directory, self.total, self.interval, self.quiet_for = directory, total, interval, quiet_for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastattn-build-progress", daemon=True)
        self.start = time.monotonic()

    def done(self) -> int:
        return len(list(self.directory.glob("*.o")))

    def line(self) -> str:
        done = self.done()
        what = "linking" if done >= self.total else "compiling"
        return f"fastattn: {done}/{self.total} objects compiled, {what}, {_minutes(time.monotonic() - self.start)} elapsed"

    def _run(self) -> None:
        last, last_time = None, self.start
        while not self._stop.wait(self.interval):
            done = self.done()
            if done != last or time.monotonic() - last_time >= self.quiet_for:
                print(self.line(), file=sys.stderr, flush=True)
                last, last_time = done, time.monotonic()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _compile(directory: Path, archs: Sequence[str], head_dims: Sequence[int], cutlass_include: str, *,
             verbose: bool, jobs: Optional[int]) -> None:
    """Run torch's ninja-based builder (MAX_JOBS limits ninja's parallelism)."""
    cpp_extension = _cpp_extension()
    flags = compile_flags(archs, head_dims, cutlass_include)
    if jobs:
        os.environ["MAX_JOBS"] = str(jobs)
    with contextlib.nullcontext() if verbose else _Progress(directory, len(sources(head_dims))):
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=[str(s) for s in sources(head_dims)],
            extra_cflags=flags.cxx,
            extra_cuda_cflags=flags.nvcc,  # carries -gencode, so torch adds no arch flags of its own
            extra_ldflags=flags.ld,
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            verbose=verbose,
            with_cuda=True,
            is_python_module=False,
            is_standalone=False,
            keep_intermediates=True,
        )  # with is_python_module=False this also torch.ops.load_library()s it: fine without a GPU too


def _load_library(lib: Path) -> None:
    import torch

    _check_cxx_runtime(lib)  # an ahead-of-time build, or one made by an older fastattn
    try:
        torch.ops.load_library(str(lib))
    except Exception as exc:
        raise BuildError(f"the CUDA extension {lib} was built but does not load ({type(exc).__name__}: "
                         f"{_tail(str(exc), 5)}); delete it and run `python -m fastattn build`") from exc


# --------------------------------------------------------------------------- load (cached)

_lock = threading.Lock()
_status: Optional[ExtensionStatus] = None
_logged: set[str] = set()
_refused: Optional[str] = None  # a library built and loaded here, then refused (see _check_cxx_runtime)


def reset() -> None:
    """Forget the cached result of :func:`load` (tests; after ``python -m fastattn build``)."""
    global _status
    with _lock:
        _status = None
    # Nothing else to clear: dispatch keys its cached decisions on the backends' availability.


def _aot_library() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_C*.so"))
    return found[0] if found else None


def _op_loaded() -> bool:
    import torch

    try:
        torch.ops.fastattn.fwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _loaded_status(path: Optional[Path]) -> ExtensionStatus:
    import torch

    from .ops import cuda_fwd  # registers the fake implementation

    cuda_fwd.register_fake_impl()
    dims = tuple(int(d) for d in torch.ops.fastattn.head_dims())
    return ExtensionStatus(True, None, str(path) if path else None, dims)


def _try_load(build_if_missing: bool) -> ExtensionStatus:
    import torch

    if torch.version.cuda is None:
        return ExtensionStatus(False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                                      "install a CUDA build of torch")
    if not torch.cuda.is_available():
        return ExtensionStatus(False, "no CUDA device in this process (torch.cuda.is_available() is False)")
    if _refused is not None:  # its ops are registered, but must not be used
        return ExtensionStatus(False, f"{_refused} (restart the process after rebuilding)")
    if _op_loaded():  # loaded by an earlier build() in this process
        return _loaded_status(None)
    aot = _aot_library()
    if aot is not None:
        _load_library(aot)
        return _loaded_status(aot)
    archs = target_archs()
    if not archs:
        return ExtensionStatus(False, "no visible GPU is sm_80 or newer (the cuda kernel needs Ampere or newer)")
    head_dims = parse_head_dims(os.environ.get(ENV_HEAD_DIMS))
    directory = build_dir(archs, head_dims)
    lib = _library_path(directory)
    if lib.exists():  # built earlier (python -m fastattn build, another process): no toolkit needed
        _load_library(lib)
        return _loaded_status(lib)
    failed = directory / "build_failed.txt"
    if failed.exists():
        return ExtensionStatus(False, failed.read_text().strip() + " (cached; `python -m fastattn build` retries)")
    if os.environ.get(ENV_JIT, "1").strip().lower() in ("0", "false", "no"):
        return ExtensionStatus(False, f"the CUDA extension is not built and {ENV_JIT}=0 forbids building it "
                                      "on first use; run `python -m fastattn build`")
    if not build_if_missing:
        # Choosing a backend must never stall for minutes: the build happens when the
        # cuda backend is asked for (use_backend("cuda"), FASTATTN_BACKEND=cuda) or ahead of time.
        return ExtensionStatus(False, "the CUDA extension is not built yet: `python -m fastattn build` builds it "
                                      "(minutes), as does forcing the backend (use_backend('cuda'))", buildable=True)
    lib = build(archs, head_dims)
    return _loaded_status(lib)


def load(build: bool = False) -> ExtensionStatus:
    """Load the extension (an ahead-of-time or cached build); with ``build=True`` also
    compile it when there is none yet (minutes, with a message). Never raises."""
    global _status
    status = _status
    if status is not None and not (build and status.buildable):
        return status  # without the lock: torch.compile traces this path and cannot enter a lock
    with _lock:
        if _status is None or (build and _status.buildable):
            level = logging.WARNING  # a build or load that went wrong on a CUDA machine
            try:
                _status = _try_load(build)
                level = logging.INFO  # no GPU, CPU-only torch, JIT switched off: nothing went wrong
            except BuildError as exc:
                _status = ExtensionStatus(False, str(exc))
            except Exception as exc:  # a bug or an unexpected environment: still never fatal
                _status = ExtensionStatus(False, f"loading the CUDA extension failed ({type(exc).__name__}: {exc})")
            if not _status.loaded and _status.reason not in _logged:
                _logged.add(_status.reason)
                logger.log(level, "fastattn: cuda backend unavailable: %s", _status.reason)
        return _status


# --------------------------------------------------------------------------- python -m fastattn build


def build_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fastattn build``: compile the extension ahead of time and say where it went."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastattn build",
                                     description="Compile the CUDA extension in csrc/ with ninja into the cache.")
    parser.add_argument("--archs", help=f"architectures, e.g. '8.0;9.0+PTX' (default: ${ENV_ARCHS}, else the "
                                        f"visible GPUs, else {';'.join(DEFAULT_AOT_ARCHS)})")
    parser.add_argument("--head-dims", help=f"head dims, e.g. '64,128' (default: ${ENV_HEAD_DIMS}, else all)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: ninja's)")
    parser.add_argument("--directory", help="build here instead of the cache")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(list(argv) if argv is not None else None)
    import torch

    try:
        archs = parse_archs(args.archs) if args.archs else target_archs()
        dims = parse_head_dims(args.head_dims or os.environ.get(ENV_HEAD_DIMS))
        target = Path(args.directory) if args.directory else build_dir(archs, dims)
        (target / "build_failed.txt").unlink(missing_ok=True)  # retry a failure recorded earlier
        lib = build(archs, dims, verbose=args.verbose, jobs=args.jobs, directory=target,
                    load_library=torch.cuda.is_available())
    except BuildError as exc:
        print(f"fastattn build failed: {exc}", file=sys.stderr)
        return 1
    reset()
    print(lib)
    return 0
