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


# --------------------------------------------------------------------------- tiers
# The default run is the quick tier a kernel developer reruns; --full adds the slow tier
# (compiling csrc/ with nvcc, AOT Triton compiles, multi-process gloo runs, building and
# installing a wheel), which CI runs.

SLOW_MARKERS = ("slow", "cuda_build")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the slow tier (the CUDA compile, packaging): what CI runs")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if any(item.get_closest_marker(m) for m in SLOW_MARKERS)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in set(slow)]


def pytest_terminal_summary(terminalreporter, config):
    # Why tests skipped, one line per reason (-q hides them, -rs lists every test).
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skip reasons", sep="-")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{count:5d} skipped: {reason}")
    if not config.getoption("--full"):  # (under xdist the workers deselect: no count here)
        terminalreporter.write_line("slow tier not run (the CUDA compile, AOT Triton compiles for sm_80/sm_90, "
                                    "multi-process distributed runs, packaging): `python -m pytest -n 2 -q --full` runs everything, as CI does")
