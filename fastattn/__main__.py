"""``python -m fastattn``: the environment, each backend's health, and who serves typical shapes.

    python -m fastattn            # report + quick self-check (seconds, CPU-only machines too)
    python -m fastattn build      # compile the CUDA extension ahead of time
    python -m fastattn demo       # a small Transformers model with sdpa vs fastattn
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # missing or broken: say which
        return f"not available ({type(exc).__name__})"


def _environment() -> list[str]:
    import fastattn

    lines = [
        f"fastattn {fastattn.__version__}  python {platform.python_version()}  {platform.system()} {platform.machine()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})  triton {_version('triton')}  "
        f"transformers {_version('transformers')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}  {p.name}  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs  "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("no CUDA device: kernels run only through the Triton interpreter (TRITON_INTERPRET=1)")
    return lines


def _self_check_device(name: str) -> tuple[str, torch.dtype] | None:
    """Where a backend can be exercised on this machine, or None."""
    from ._env import interpreting

    if name == "sdpa":
        return ("cuda" if torch.cuda.is_available() else "cpu"), torch.float32
    if torch.cuda.is_available():
        return "cuda", torch.float16
    if name == "triton" and interpreting():
        return "cpu", torch.float16
    return None


def _self_check(name: str) -> str:
    """Run one small causal GQA case through backend ``name`` against the fp64 reference."""
    from . import use_backend
    from .functional import scaled_dot_product_attention
    from .testing import assert_close_by_rule, reference_attention

    from . import registered_backends

    where = _self_check_device(name)
    if where is None:
        return "not exercised here (needs a CUDA device" + (", or TRITON_INTERPRET=1" if name == "triton" else "") + ")"
    # Forcing a backend gets it ready first, and for the cuda backend that means compiling the
    # extension (minutes): a report must not, so an unavailable backend is only reported.
    if registered_backends()[name].availability():
        if name == "cuda" and _extension_buildable():
            return "not built: `python -m fastattn build` compiles the CUDA extension (minutes), then this check runs"
        return "not run (unavailable, see above)"
    device, dtype = where
    q = torch.randn(2, 4, 33, 64, device=device, dtype=dtype)
    k = torch.randn(2, 2, 47, 64, device=device, dtype=dtype)
    v = torch.randn(2, 2, 47, 64, device=device, dtype=dtype)
    start = time.perf_counter()
    try:
        with use_backend(name):
            out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ref, _ = reference_attention(q, k, v, causal=True)
        ref_lowp, _ = reference_attention(q, k, v, causal=True, compute_dtype=None)
        assert_close_by_rule(out, ref.float(), ref_lowp)
    except Exception as exc:  # report, don't crash the report
        return f"FAILED on {device} {dtype}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    ms = (time.perf_counter() - start) * 1e3
    return f"ok on {device} {str(dtype).replace('torch.', '')} ({ms:.0f} ms, max error within flash-attn's rule)"


def _extension_buildable() -> bool:
    from . import _extension

    return _extension.load().buildable


TYPICAL_SHAPES = [
    ("Llama prefill, bf16, 32/8 heads, hd128, causal", dict(B=1, Hq=32, Hkv=8, L=2048, S=2048, E=128, dtype=torch.bfloat16, causal=True)),
    ("decode step, bf16, q_len 1, kv 4096", dict(B=4, Hq=32, Hkv=8, L=1, S=4096, E=128, dtype=torch.bfloat16, causal=False)),
    ("BERT encoder, fp16, padding mask, hd64", dict(B=8, Hq=12, Hkv=12, L=128, S=128, E=64, dtype=torch.float16, causal=False, mask=True)),
    ("fp32 training step", dict(B=2, Hq=8, Hkv=8, L=512, S=512, E=64, dtype=torch.float32, causal=True)),
    ("head dim 512", dict(B=1, Hq=4, Hkv=4, L=256, S=256, E=512, dtype=torch.bfloat16, causal=True)),
]


def _who_serves(device: str) -> list[str]:
    from .functional import explain

    lines = []
    for title, s in TYPICAL_SHAPES:
        # Uninitialized tensors are enough: explain only reads shapes, dtypes and devices.
        q = torch.empty(s["B"], s["Hq"], s["L"], s["E"], dtype=s["dtype"], device=device)
        k = torch.empty(s["B"], s["Hkv"], s["S"], s["E"], dtype=s["dtype"], device=device)
        mask = torch.ones(s["B"], 1, 1, s["S"], dtype=torch.bool, device=device) if s.get("mask") else None
        report = explain(q, k, k, attn_mask=mask, is_causal=s["causal"], enable_gqa=s["Hq"] != s["Hkv"])
        lines.append(f"  {title}: {report.chosen}")
        for name, reasons in report.verdicts:
            if reasons and name != report.chosen and (report.chosen == "sdpa" or name == "triton"):
                lines.append(f"      {name} not chosen: {'; '.join(reasons)}")
            if name == report.chosen:
                break
    return lines


def report_main(argv=None) -> int:
    from . import registered_backends

    argparse.ArgumentParser(prog="python -m fastattn report", description=__doc__.splitlines()[0]).parse_args(argv)

    print("\n".join(_environment()))
    print("\nbackends (priority order):")
    for name, backend in registered_backends().items():
        problems = backend.availability()
        print(f"  {name}: {'available' if not problems else 'unavailable'} - {backend.description}")
        for p in problems:
            print(f"      - {p}")
        print(f"      self-check: {_self_check(name)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nwho serves typical calls on {device}:")
    print("\n".join(_who_serves(device)))
    return 0


COMMANDS = ("report", "build", "demo")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A subcommand parses its own arguments (its --help included).
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in COMMANDS else (None, argv)
    if command is None:
        parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog="`python -m fastattn COMMAND --help` shows a command's options.")
        parser.add_argument("command", nargs="?", default="report", choices=COMMANDS)
        command = parser.parse_args(rest).command
        rest = []
    if command == "build":
        from ._extension import build_main

        return build_main(rest)
    if command == "demo":
        from .integrations.transformers_demo import demo_main

        return demo_main(rest)
    return report_main(rest)


if __name__ == "__main__":
    sys.exit(main())
