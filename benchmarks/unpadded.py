"""Padded encoder batches: unpadded (varlen) against the masked kernel, the GPU check for
issue 11 section 4 (not yet measured).

    python -m benchmarks.unpadded                     # GPU: CSV rows on stdout, then the verdict
    python -m benchmarks.unpadded --lengths 128 --batch 32 --dtype bf16

MiniLM-like attention (12 heads, head dim 32: all-MiniLM-L6-v2's) through the "fastattn"
Transformers attention function with the mask its mask function builds for a BERT-style
bidirectional padding mask, right-padded as tokenizers pad (and left-padded, which gathers the
valid keys), at 0/25/50% padding. Two providers on the same inputs and mask object:
``unpadded`` (the varlen path: each sequence against its own keys) and ``masked`` (the dense
kernel reading the (B, 1, 1, S) padding row), beside torch SDPA on the same bool mask. Each
result is checked against the masked one before it is timed. The verdict line says from which
padding fraction the unpadded path wins at every shape: what
``fastattn.integrations.transformers.UNPADDED_MIN_PADDING`` should be.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from .measure import time_cuda

HEADS, HEAD_DIM = 12, 32  # all-MiniLM-L6-v2: hidden 384, 12 heads


@contextlib.contextmanager
def _threshold(value: float):
    from fastattn.integrations import transformers as hf

    saved, hf.UNPADDED_MIN_PADDING = hf.UNPADDED_MIN_PADDING, value
    try:
        yield
    finally:
        hf.UNPADDED_MIN_PADDING = saved


class _Attention(torch.nn.Module):  # what the attention function reads of a BERT self-attention module
    is_causal = False


def rows(lengths, batch, paddings, dtype, device, timer=None):
    """One row per provider and case; ``timer(fn) -> ms`` (default: the median of measure.time_cuda)."""
    timer = timer or (lambda fn: time_cuda(fn)[1])
    from transformers import masking_utils

    from fastattn.integrations import transformers as hf

    module = _Attention()
    for L in lengths:
        for side, padding in [("right", p) for p in paddings] + [("left", max(paddings))]:
            gen = torch.Generator().manual_seed(L)
            lo = max(1, int(L * (1 - 2 * padding)))  # uniform in [lo, L]: mean about (1 - padding) x L
            lens = torch.randint(lo, L + 1, (batch,), generator=gen) if padding else torch.full((batch,), L)
            pos = torch.arange(L)[None]
            keep = (pos < lens[:, None]) if side == "right" else (pos >= L - lens[:, None])
            keep = keep.to(device)
            mask = hf.mask_function(batch_size=batch, q_length=L, kv_length=L,
                                    mask_function=masking_utils.bidirectional_mask_function, attention_mask=keep,
                                    device=device)
            q, k, v = (torch.randn(batch, L, HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
                       for _ in range(3))
            scale = HEAD_DIM ** -0.5

            def unpadded():
                with _threshold(0.0):
                    return hf.attention_forward(module, q, k, v, mask, scaling=scale)[0]

            def masked():
                with _threshold(2.0):
                    return hf.attention_forward(module, q, k, v, mask, scaling=scale)[0]

            dense_mask = mask.contiguous()
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale)  # noqa: E731
            with hf.record_backends() as records:
                got = unpadded()
            ran = records[0].shape[0] == 1  # one row of sequences: the varlen call (at 0% padding too)
            want = masked()
            err = (got.float() - want.float()).abs().max().item()
            assert err < 2e-2, f"unpadded L{L} {side} padding {padding}: error {err} against the masked kernel"
            actual = 1.0 - keep.float().mean().item()
            times = {name: timer(fn) for name, fn in (("unpadded", unpadded), ("masked", masked),
                                                                 ("torch_sdpa", sdpa))}
            for name, ms in times.items():
                yield dict(provider=name, B=batch, L=L, side=side, padding=actual, ms=ms,
                           speedup=times["masked"] / ms, ran_varlen=ran if name == "unpadded" else "")


def verdict(results) -> str:
    """The smallest padding fraction from which unpadded beats masked at every shape measured
    (right padding: what tokenizers make)."""
    wins: dict[float, bool] = {}
    for r in results:
        if r["provider"] == "unpadded" and r["side"] == "right" and r["padding"] > 0:
            key = round(r["padding"], 2)
            wins[key] = wins.get(key, True) and r["speedup"] > 1.0
    fractions = sorted(wins)
    from_here = [p for i, p in enumerate(fractions) if all(wins[q] for q in fractions[i:])]
    if not from_here:
        return "verdict: unpadded lost at the largest padding measured: keep UNPADDED_MIN_PADDING above it"
    return f"verdict: unpadded wins at every shape from {from_here[0]:.2f} padding: set UNPADDED_MIN_PADDING near it"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unpadded", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--paddings", nargs="+", type=float, default=[0.0, 0.25, 0.5])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("unpadded: no CUDA device; nothing to measure")
        return 0
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, {HEADS} heads, head dim {HEAD_DIM}")
    print("provider,B,L,side,padding,ms,speedup_vs_masked,ran_varlen")
    results = []
    with torch.no_grad():
        for r in rows(args.lengths, args.batch, args.paddings, dtype, torch.device("cuda")):
            results.append(r)
            print(f"{r['provider']},{r['B']},{r['L']},{r['side']},{r['padding']:.3f},{r['ms']:.4f},"
                  f"{r['speedup']:.2f},{r['ran_varlen']}", flush=True)
    print(verdict(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
