"""Timers, peak memory, the device's ceilings, and what a result row records about the run."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

QUANTILES = (0.2, 0.5, 0.8)
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- timers


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """p20/p50/p80 in ms of ``fn`` on the GPU: ``triton.testing.do_bench`` warms up,
    clears the L2 cache before every call (a 256 MB write) and times each call
    alone with CUDA events."""
    from triton.testing import do_bench
    return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))


def interleaved_samples(fns: dict[str, Callable[[], object]], repeats: int, batch_s: float, warmup: int = 3,
                        calibrate: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per batch. The functions are interleaved
    (one batch each in turn) so that drift in clock speed hits all of them alike; each batch
    repeats one function enough times to last ``batch_s`` (worked out from ``calibrate`` calls
    after ``warmup`` ones)."""
    counts = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(calibrate):
            fn()
        once = max((time.perf_counter() - t0) / calibrate, 1e-8)
        counts[name] = max(1, int(batch_s / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = counts[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def time_cpu(fns: dict[str, Callable[[], object]], repeats: int = 21, batch_s: float = 0.005,
             warmup: int = 3) -> dict[str, tuple[float, float, float]]:
    """p20/p50/p80 in ms per call, for host-side work (see :func:`interleaved_samples`)."""
    samples = interleaved_samples(fns, repeats, batch_s, warmup)
    return {name: percentiles([t * 1e3 for t in s]) for name, s in samples.items()}


def percentiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return (samples[0],) * 3
    qs = statistics.quantiles(sorted(samples), n=10, method="inclusive")  # deciles
    return qs[1], statistics.median(samples), qs[7]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory the call allocates at its peak beyond what existed before it (output
    included), in MiB; NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


# --------------------------------------------------------------------------- ceilings


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, counted as bytes read + bytes written, in GB/s."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    p50 = time_cuda(lambda: dst.copy_(src), rep_ms=200)[1]
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    p50 = time_cuda(lambda: a @ b, rep_ms=200)[1]
    return 2 * n**3 / (p50 * 1e-3) / 1e12


# --------------------------------------------------------------------------- run metadata


def git_commit() -> str:
    """The commit the working tree is at ("+dirty" with local changes); FASTATTN_COMMIT
    overrides, for copies of the tree that carry no .git."""
    if os.environ.get("FASTATTN_COMMIT"):
        return os.environ["FASTATTN_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fastattn", "benchmarks", "csrc"],
                               cwd=REPO, timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def run_info(device: torch.device) -> dict:
    """The columns every row of one run shares."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        commit=git_commit(),
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda or "-",
    )
