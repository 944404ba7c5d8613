"""Block-size sweep for the Triton forward kernel, to tune ``block_config()`` from real numbers.

    python -m benchmarks.sweep                                  # hd128 bf16 seqlen 4k, causal and full
    python -m benchmarks.sweep --configs 128x64x8x3 128x128x8x2 --seqlen 8192
    python -m benchmarks.sweep --row-mask                       # a (B, 1, L, L) bool mask read per query row
    python -m benchmarks.sweep --dry-run                        # no GPU: tiny shape through the Triton interpreter

Each config is (BLOCK_M, BLOCK_N, num_warps, num_stages), run through
``flash_attn_forward(config=...)`` on fresh random inputs, checked against
torch SDPA (max_diff) and timed with L2 flushed. ``--row-mask`` gives every call a
mask that differs per query row, as a padded causal batch sends it ((B, 1, L, L): each
sequence's keys up to its length, and causal for the causal run, all in the mask). The config ``block_config()``
picks today is marked ``default``; ``vs_default`` > 1 means faster than it.
With ``--jobs N`` the kernels are compiled in N processes first (Triton's disk
cache then serves the timing process), which saves most of the compile time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
]

COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "cuda", "dtype", "batch", "heads", "seqlen",
           "head_dim", "causal", "mask", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "default", "status", "reason",
           "p20_ms", "p50_ms", "p80_ms", "tflops", "max_diff", "vs_default"]


def parse_config(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 128x64x8x3")
    return parts


def as_dict(cfg) -> dict:
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg))


def make_qkv(shape, dtype, device, seed: int = 0):
    """(B, H, L, D) views of (B, L, H, D) buffers, the layout a model hands over."""
    B, H, L, D = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, L, H, D, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(3)]


def make_row_mask(shape, causal: bool, device) -> torch.Tensor:
    """The padded batch's per-row mask for ``shape`` (B, H, L, D): see cases.padded_row_mask."""
    from .cases import padded_lengths, padded_row_mask

    return padded_row_mask(padded_lengths(shape[0], shape[2], device), shape[2], causal)


def run_config(cfg, causal: bool, shape, dtype, device, row_mask: bool = False):
    from fastattn.kernels.triton import flash_fwd
    # An explicit config= is used as given (one that does not fit raises), so each
    # row times the config it names.
    flash_attn_forward = flash_fwd.flash_attn_forward
    q, k, v = make_qkv(shape, dtype, device)
    scale = 1.0 / math.sqrt(shape[3])
    mask = make_row_mask(shape, causal, device) if row_mask else None
    bounds = (-1, 0) if causal and not row_mask else (-1, -1)
    return lambda: flash_attn_forward(q, k, v, scale=scale, mask=mask, causal_bounds=bounds, config=as_dict(cfg))[0]


def _warm(cfg, causal, shape, dtype_name, row_mask) -> str:
    """Compile one config in a worker process (fills Triton's disk cache)."""
    try:
        fn = run_config(cfg, causal, shape, getattr(torch, dtype_name), torch.device("cuda"), row_mask)
        fn()
        torch.cuda.synchronize()
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=CONFIGS)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16 * 1024, help="batch x seqlen")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--row-mask", action="store_true", help="a bool mask per query row (padded causal batch)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile in N processes first")
    parser.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "out" / "sweep.csv")
    parser.add_argument("--run-timestamp", help="label the rows with this run timestamp (to join runs of one check)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: a tiny shape through the Triton interpreter")
    args = parser.parse_args(argv)

    dry = args.dry_run or not torch.cuda.is_available()
    if dry:
        if not args.dry_run:
            print("no CUDA device: dry run through the Triton interpreter (tiny shape, timings meaningless)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is first imported
    from fastattn.kernels.triton.flash_fwd import block_config
    from fastattn.testing import attention_flops

    from .measure import run_info, time_cpu, time_cuda
    from .report import append_rows

    device = torch.device("cpu" if dry else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    L, D = (128, 64) if dry else (args.seqlen, args.head_dim)
    B, H = (1, 2) if dry else (max(1, args.tokens // L), 2048 // D)
    shape = (B, H, L, D)
    configs = [c for c in args.configs if not dry or c[0] * c[1] <= 128 * 64]
    info = run_info(device)
    if args.run_timestamp:
        info["timestamp"] = args.run_timestamp
    default = block_config(D, D, L)
    default_key = (default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"])
    if not dry and default_key not in configs:
        configs = [default_key] + configs
    print(f"sweep: {args.dtype} B{B} H{H} L{L} D{D}{' row mask' if args.row_mask else ''}, "
          f"{len(configs)} configs x causal/full; "
          f"default {'x'.join(map(str, default_key))}", flush=True)

    warm_errors = {}
    if not dry and args.jobs > 1:
        import multiprocessing as mp
        todo = [(cfg, causal) for causal in (False, True) for cfg in configs]
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {key: pool.submit(_warm, key[0], key[1], shape, str(dtype).split(".")[-1], args.row_mask)
                       for key in todo}
            warm_errors = {key: f.result() for key, f in futures.items()}
        print(f"compiled {sum(not e for e in warm_errors.values())}/{len(todo)} in {args.jobs} processes", flush=True)

    rows = []
    for causal in (False, True):
        q, k, v = make_qkv(shape, dtype, device)
        with torch.no_grad():
            if args.row_mask:
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=make_row_mask(shape, causal, device))
            else:
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        flops = attention_flops(B, H, L, L, D, causal=causal)
        group = []
        for cfg in configs:
            row = dict(info, dtype=args.dtype, batch=B, heads=H, seqlen=L, head_dim=D, causal=int(causal),
                       mask="rows" if args.row_mask else "",
                       **as_dict(cfg), default=int(cfg == default_key and not dry), status="error", reason="")
            group.append(row)
            try:
                fn = run_config(cfg, causal, shape, dtype, device, args.row_mask)
                row["max_diff"] = (fn().float() - ref.float()).abs().max().item()
                if dry:
                    p20, p50, p80 = time_cpu({"k": fn}, repeats=1, warmup=0, batch_s=0)["k"]
                else:
                    p20, p50, p80 = time_cuda(fn)
                row.update(status="ok", p20_ms=p20, p50_ms=p50, p80_ms=p80, tflops=flops / (p50 * 1e-3) / 1e12)
            except Exception as exc:
                text = str(exc).strip()
                row["reason"] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
                if not dry:
                    torch.cuda.empty_cache()
        base = next((r["p50_ms"] for r in group if r["default"] and r["status"] == "ok"), math.nan)
        for r in group:
            if r["status"] == "ok":
                r["vs_default"] = base / r["p50_ms"]
        rows += group
        append_rows(args.csv, group, COLUMNS)  # per group: a run cut short keeps what it measured

    print(f"csv: {args.csv}\n")
    print(f"{'causal':6}  {'config (MxNxWxS)':16}  {'p50 ms':>8}  {'TFLOP/s':>8}  {'vs default':>10}  {'max_diff':>9}")
    for causal in (0, 1):
        group = sorted((r for r in rows if r["causal"] == causal), key=lambda r: r.get("p50_ms", math.inf))
        for r in group:
            cfg = f"{r['BLOCK_M']}x{r['BLOCK_N']}x{r['num_warps']}x{r['num_stages']}" + (" *" if r["default"] else "")
            if r["status"] == "ok":
                print(f"{causal:6}  {cfg:16}  {r['p50_ms']:8.3f}  {r['tflops']:8.1f}  "
                      f"{r.get('vs_default', math.nan):10.3f}  {r['max_diff']:9.2e}")
            else:
                print(f"{causal:6}  {cfg:16}  {'error':>8}  {r['reason'][:90]}")
    print("(* = block_config()'s choice today)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
