"""The CUDA kernel's split-KV decode against its number of splits, to set the op's
``choose_num_splits`` from measurements rather than from a guess.

    python -m benchmarks.cuda_splits                      # GPU: B8, 32/8 heads, KV 64k, head dims 64 and 128
    python -m benchmarks.cuda_splits --splits 0 3 6 12 --kv 16384

Calls ``torch.ops.fastattn.fwd`` directly (0 = the op's own choice) on fresh random bf16
inputs in the decode layout, checks each result against the op's own unsplit one (largest
difference over the largest output, which bf16 rounding keeps near 1e-2), and prints
GB/s of the minimum traffic (K, V, q and out once) with its share of the copy bandwidth
measured first. Needs the extension built (``python -m fastattn build``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .cases import Case, make_inputs
from .measure import copy_bandwidth_gbs, time_cuda

SPLITS = (0, 1, 2, 3, 4, 6, 9, 12, 16, 24)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_splits", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--splits", nargs="+", type=int, default=list(SPLITS))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv", type=int, default=65536)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("cuda_splits: no CUDA device; nothing to measure")
        return 0
    from fastattn import _extension

    status = _extension.load()
    if not status.loaded:
        print(f"cuda_splits: the CUDA extension is not available: {status.reason}")
        return 1
    device = torch.device("cuda")
    copy = copy_bandwidth_gbs(device)
    print(f"copy bandwidth {copy:.0f} GB/s; decode B{args.batch}, 32/8 heads, KV {args.kv}, bf16")
    print(f"{'head dim':>8}  {'splits':>6}  {'p50 ms':>8}  {'GB/s':>7}  {'% copy':>6}  {'rel diff':>8}")
    failed = False
    for head_dim in args.head_dims:
        case = Case("splits", "bf16", args.batch, 32, 8, 1, args.kv, head_dim, layout="bhsd")
        x = make_inputs(case, device)
        scale = head_dim ** -0.5
        unsplit = torch.ops.fastattn.fwd(x.q, x.k, x.v, scale, num_splits=1)[0].float()
        for splits in args.splits:
            fn = lambda: torch.ops.fastattn.fwd(x.q, x.k, x.v, scale, num_splits=splits)  # noqa: E731
            diff = ((fn()[0].float() - unsplit).abs().max() / unsplit.abs().max()).item()
            ms = time_cuda(fn)[1]
            gbs = case.bytes_moved() / (ms * 1e-3) / 1e9
            failed |= not diff < 5e-2
            print(f"{head_dim:8}  {splits if splits else 'auto':>6}  {ms:8.3f}  {gbs:7.0f}  {100 * gbs / copy:5.0f}%  "
                  f"{diff:8.1e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
