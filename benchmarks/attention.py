"""The attention benchmark harness.

    python -m benchmarks.attention --grid key                     # GPU: the short list of key cases
    python -m benchmarks.attention --grid standard gqa padded decode
    python -m benchmarks.attention --grid key --mode bwd          # backward (fastattn: sdpa until a kernel lands)
    python -m benchmarks.attention --cpu                          # CPU: dispatch overhead + a Triton-interpreter run

Every case runs every provider (see benchmarks/providers.py); one that cannot
run a case records why instead of failing. Rows are appended to a CSV
(benchmarks/out/attention.csv unless --csv/--out), one PNG is written per grid,
and a compact table is printed last.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from . import cases as grids
from .cases import Case, make_inputs
from .measure import copy_bandwidth_gbs, matmul_tflops, peak_memory_mb, run_info, time_cpu, time_cuda
from .providers import Provider, TorchSDPA, cpu_providers, gpu_providers, torch_sdpa
from .report import append_rows, fill_ratios, plot, read_rows, table

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _max_diff(out, ref, provider: Provider) -> float:
    if ref is None or not isinstance(out, torch.Tensor):
        return math.nan
    out = provider.to_sdpa_layout(out)
    if out is None or out.shape != ref.shape:
        return math.nan
    return (out.float() - ref.float()).abs().max().item()


def _reference(case: Case, inputs):
    """torch SDPA's own answer, for the max_diff column (a sanity check, not a test)."""
    if case.mode != "fwd":
        return None
    with torch.no_grad():
        return torch_sdpa(inputs.q, inputs.k, inputs.v, attn_mask=inputs.mask, is_causal=case.causal,
                          enable_gqa=case.gqa)


def _first_call(provider: Provider, fn):
    """Run once (compiles, and tells whether it can run); returns (out, reasons)."""
    if isinstance(provider, TorchSDPA):
        return TorchSDPA.explain_failure(fn)
    return fn(), []


def _prepare(provider: Provider, case: Case, inputs, ref, row: dict):
    """Build the provider's callable and check its first output against the reference.
    Returns (fn, out), or (None, None) with the reasons written into ``row``."""
    reasons = provider.reasons(case, inputs)
    fn = out = None
    if not reasons:
        fn = provider.build(case, inputs)
        out, reasons = _first_call(provider, fn)
    if reasons:
        row["reason"] = "; ".join(reasons)
        return None, None
    row["backend"] = provider.backend(case, inputs)
    row["max_diff"] = _max_diff(out, ref, provider)
    return fn, out


# --------------------------------------------------------------------------- GPU


def run_case_cuda(case: Case, providers: list[Provider], device, info: dict, copy_gbs: float,
                  warmup_ms: float, rep_ms: float) -> list[dict]:
    rows = []
    base = dict(info, **case.as_row())
    try:
        inputs = make_inputs(case, device)
        ref = _reference(case, inputs)
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return [dict(base, provider=p.name, status="error", reason=f"inputs do not fit: {_first_line(exc)}")
                for p in providers]
    for provider in providers:
        row = dict(base, provider=provider.name, status="skip", reason="")
        rows.append(row)
        out = fn = bench = None
        try:
            fn, out = _prepare(provider, case, inputs, ref, row)
            if fn is None:
                continue
            if case.mode == "bwd":
                out = provider.to_sdpa_layout(out) if not isinstance(out, torch.Tensor) else out
                leaves, dout, fwd_out = inputs.leaves, inputs.dout, out

                def bench():
                    return torch.autograd.grad(fwd_out, leaves, dout, retain_graph=True)
            else:
                bench = fn
            p20, p50, p80 = time_cuda(bench, warmup_ms, rep_ms)
            row.update(status="ok", p20_ms=p20, p50_ms=p50, p80_ms=p80,
                       tflops=case.flops() / (p50 * 1e-3) / 1e12,
                       peak_mem_mb=peak_memory_mb(bench, device))
            if case.decode:
                row["gbps"] = case.bytes_moved() / (p50 * 1e-3) / 1e9
                row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbs if copy_gbs else math.nan
        except torch.OutOfMemoryError as exc:
            row.update(status="error", reason=f"out of memory: {_first_line(exc)}")
        except Exception as exc:  # a provider's failure is a result, not a crash
            row.update(status="error", reason=_first_line(exc))
        finally:
            del out, fn, bench
            if row["status"] != "ok":
                torch.cuda.empty_cache()
    fill_ratios(rows)
    return rows


def ceilings(device, info: dict) -> tuple[float, list[dict]]:
    """Measure the device-to-device copy bandwidth and a bf16 matmul once per run."""
    copy = copy_bandwidth_gbs(device)
    mm = matmul_tflops(device)
    rows = [dict(info, grid="ceiling", case="copy", provider="ceiling", status="ok", gbps=copy,
                 reason=f"device-to-device copy {copy:.0f} GB/s (read + write)"),
            dict(info, grid="ceiling", case="matmul", provider="ceiling", status="ok", tflops=mm,
                 reason=f"bf16 matmul 8192^3 {mm:.0f} TFLOP/s")]
    return copy, rows


def run_cuda(args) -> list[dict]:
    device = torch.device("cuda")
    info = run_info(device)
    if args.run_timestamp:
        info["timestamp"] = args.run_timestamp
    providers, notes = gpu_providers(args.providers)
    if args.exclude:
        providers = [p for p in providers if p.name not in args.exclude]
    for note in notes:
        print(f"note: {note}")
    if os.environ.get("FASTATTN_BACKEND"):
        print(f"note: FASTATTN_BACKEND={os.environ['FASTATTN_BACKEND']} is set, so fastattn:auto is not automatic")
    all_rows = []
    copy_gbs = args.copy_gbps
    if copy_gbs is None and args.run_timestamp and args.csv.exists():  # measured earlier in this run
        copy_gbs = next((r["gbps"] for r in read_rows(args.csv) if r["grid"] == "ceiling" and r["case"] == "copy"
                         and r["timestamp"] == args.run_timestamp), None)
    if copy_gbs is None:
        copy_gbs, rows = ceilings(device, info)
        append_rows(args.csv, rows)
        all_rows += rows
        print("\n".join(r["reason"] for r in rows), flush=True)
    for grid in args.grid:
        for case in grids.GRIDS[grid](args.mode):
            if args.layout:
                case = Case(**{**case.__dict__, "layout": args.layout})
            rows = run_case_cuda(case, providers, device, info, copy_gbs, args.warmup_ms, args.rep_ms)
            append_rows(args.csv, rows)
            all_rows += rows
            print(f"{case.label}: " + ", ".join(
                f"{r['provider']} {r['tflops']:.0f}" if r["status"] == "ok" else f"{r['provider']} {r['status']}"
                for r in rows), flush=True)
    return all_rows


# --------------------------------------------------------------------------- CPU


def run_case_cpu(case: Case, providers: list[Provider], info: dict, repeats: int, reference: str) -> list[dict]:
    inputs = make_inputs(case, "cpu")
    ref = _reference(case, inputs)
    rows, fns = {}, {}
    for provider in providers:
        row = rows[provider.name] = dict(info, **case.as_row(), provider=provider.name, status="skip", reason="")
        try:
            fn, _ = _prepare(provider, case, inputs, ref, row)
            if fn is not None:
                fns[provider.name] = fn
        except Exception as exc:
            row.update(status="error", reason=_first_line(exc))
    timings = time_cpu(fns, repeats=repeats) if fns else {}
    base = timings.get(reference, (math.nan,) * 3)[1]
    for name, (p20, p50, p80) in timings.items():
        rows[name].update(status="ok", p20_ms=p20, p50_ms=p50, p80_ms=p80,
                          tflops=case.flops() / (p50 * 1e-3) / 1e12,
                          speed_vs_best_sdpa=base / p50, overhead_us=(p50 - base) * 1e3)
    return list(rows.values())


def run_cpu(args) -> list[dict]:
    torch.manual_seed(0)
    info = run_info(torch.device("cpu"))
    if args.run_timestamp:
        info["timestamp"] = args.run_timestamp
    all_rows = []
    if args.interpreter:  # the child process, with TRITON_INTERPRET=1 from its start
        from .providers import Fastattn
        providers, cases, repeats = [TorchSDPA(), Fastattn("triton")], grids.interpreter(), 3
    else:
        providers, cases, repeats = cpu_providers(), grids.cpu(args.quick), 7 if args.quick else 21
    for case in cases:
        rows = run_case_cpu(case, providers, info, repeats, reference="sdpa:auto")
        append_rows(args.csv, rows)
        all_rows += rows
        print(f"{case.label}: " + ", ".join(
            f"{r['provider']} {r['p50_ms'] * 1e3:.1f}us" if r["status"] == "ok" else f"{r['provider']} {r['status']}"
            for r in rows), flush=True)
    if not args.interpreter and not args.no_interpreter:
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "benchmarks.attention", "--interpreter", "--csv", str(args.csv),
               "--run-timestamp", info["timestamp"], "--no-plot"]
        print("interpreter run: TRITON_INTERPRET=1 " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300)
        if done.returncode != 0:
            print(f"interpreter run failed (exit {done.returncode})", file=sys.stderr)
        all_rows += [r for r in read_rows(args.csv) if r["timestamp"] == info["timestamp"]
                     and r["grid"] == "interpreter"]
    return all_rows


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cpu", action="store_true", help="CPU mode: front-end overhead vs torch SDPA")
    parser.add_argument("--quick", action="store_true", help="CPU mode: two tiny shapes, few repeats (smoke test)")
    parser.add_argument("--no-interpreter", action="store_true", help="CPU mode: skip the Triton-interpreter run")
    parser.add_argument("--interpreter", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-timestamp", help="label the rows with this run timestamp (to join runs of one check)")
    parser.add_argument("--grid", nargs="+", choices=sorted(grids.GRIDS), default=["key"])
    parser.add_argument("--mode", choices=("fwd", "bwd"), default="fwd")
    parser.add_argument("--layout", choices=("bshd", "bhsd"), help="storage of q/k/v (default: per grid)")
    parser.add_argument("--providers", nargs="+", help="only these providers (names as in the table)")
    parser.add_argument("--exclude", nargs="+", default=[], help="leave these providers out")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV and plots")
    parser.add_argument("--csv", type=Path, help="CSV to append to (default OUT/attention.csv)")
    parser.add_argument("--png", type=Path, help="one plot of all grids here (default OUT/attention_<grid>.png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--copy-gbps", type=float, help="skip measuring the ceilings; use this copy bandwidth")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    args = parser.parse_args(argv)
    args.csv = args.csv or args.out / "attention.csv"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = args.cpu or args.interpreter
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: running the CPU mode instead (--cpu)", flush=True)
        cpu = True
    rows = run_cpu(args) if cpu else run_cuda(args)
    if args.interpreter:
        return 0
    if not args.no_plot:
        if args.png:
            written = [plot(rows, args.png)]
        else:
            written = [plot(rows, args.out / f"attention_{g}.png", grid=g)
                       for g in dict.fromkeys(r["grid"] for r in rows if r["grid"] != "ceiling")]
        for path in filter(None, written):
            print(f"plot: {path}")
    print(f"csv: {args.csv}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
