"""Varlen prefill and paged decode, the GPU check for issue 11 (not yet measured).

    python -m benchmarks.varlen                       # GPU: both tables, CSV rows on stdout
    python -m benchmarks.varlen --only decode --kv 4096 65536 --batch 1 64

Paged decode: ``flash_attn_with_kvcache`` over a shuffled paged cache (page sizes 16 and
256, bf16, 32/8 heads, head dim 128, one new query), GB/s of the minimum traffic (the K/V
read once) as % of the measured copy bandwidth, beside torch SDPA on the same keys as a
dense (B, H, S, D) cache. Goal: >= 80% of copy at both page sizes.

Varlen prefill: ``flash_attn_varlen_func`` (causal, bf16, 32/8 heads, hd128) on B sequences
whose lengths average (1 - padding) x L, against torch SDPA on the padded (B, L) batch with
its bool mask. Goal: >= 1.5x padded SDPA at 50% padding.

Every result is checked against the dense reference it is timed beside before it is timed.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .measure import copy_bandwidth_gbs, time_cuda


def paged_decode_rows(kv_lengths, batches, page_sizes, device, copy):
    import fastattn

    H, Hk, D = 32, 8, 128
    for S in kv_lengths:
        for B in batches:
            if B * S * Hk * D * 2 * 2 > 24 << 30:  # keep K + V under 24 GiB
                continue
            k = torch.randn(B, S, Hk, D, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(B, 1, H, D, device=device, dtype=torch.bfloat16)
            seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
            moved = 2 * k.numel() * k.element_size()
            dense = lambda: F.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
            want = dense().transpose(1, 2)
            ms = time_cuda(dense)[1]
            yield dict(kind="decode", provider="torch_sdpa_dense", B=B, S=S, page=0, ms=ms,
                       pct_copy=100 * moved / (ms * 1e-3) / 1e9 / copy)
            for page in page_sizes:
                pages = B * S // page
                order = torch.randperm(pages, device=device)
                k_cache = torch.empty(pages, page, Hk, D, device=device, dtype=torch.bfloat16)
                v_cache = torch.empty_like(k_cache)
                k_cache[order] = k.reshape(pages, page, Hk, D)
                v_cache[order] = v.reshape(pages, page, Hk, D)
                table = order.view(B, S // page).to(torch.int32)
                fn = lambda: fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,  # noqa: E731
                                                               block_table=table)
                err = (fn().float() - want.float()).abs().max().item()
                assert err < 2e-2, f"paged decode B{B} S{S} page {page}: error {err}"
                ms = time_cuda(fn)[1]
                yield dict(kind="decode", provider=f"fastattn_paged{page}", B=B, S=S, page=page, ms=ms,
                           pct_copy=100 * moved / (ms * 1e-3) / 1e9 / copy)
                del k_cache, v_cache


def varlen_prefill_rows(lengths, batch, paddings, device):
    import fastattn

    H, Hk, D = 32, 8, 128
    for L in lengths:
        for padding in paddings:
            gen = torch.Generator().manual_seed(L)
            lo = max(1, int(L * (1 - 2 * padding)))  # uniform in [lo, L]: mean (1 - padding) x L
            lens = torch.randint(lo, L + 1, (batch,), generator=gen) if padding else torch.full((batch,), L)
            total = int(lens.sum())
            cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(device)
            q = torch.randn(total, H, D, device=device, dtype=torch.bfloat16)
            k = torch.randn(total, Hk, D, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            fn = lambda: fastattn.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)  # noqa: E731
            qp, kp, vp = (torch.zeros(batch, L, t.shape[1], D, device=device, dtype=t.dtype) for t in (q, k, v))
            keep = torch.arange(L, device=device)[None] < lens.to(device)[:, None]
            for dst, src in ((qp, q), (kp, k), (vp, v)):
                dst[keep] = src
            mask = keep[:, None, None, :] & torch.ones(L, L, dtype=torch.bool, device=device).tril()
            padded = lambda: F.scaled_dot_product_attention(  # noqa: E731
                qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask, enable_gqa=True)
            err = (fn().float() - padded().transpose(1, 2)[keep].float()).abs().max().item()
            assert err < 2e-2, f"varlen prefill L{L} padding {padding}: error {err}"
            t_var, t_pad = time_cuda(fn)[1], time_cuda(padded)[1]
            yield dict(kind="prefill", provider="fastattn_varlen", B=batch, S=L, page=int(100 * padding), ms=t_var,
                       speedup=t_pad / t_var)
            yield dict(kind="prefill", provider="torch_sdpa_padded", B=batch, S=L, page=int(100 * padding), ms=t_pad,
                       speedup=1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.varlen", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", choices=["decode", "prefill"])
    parser.add_argument("--kv", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--pages", nargs="+", type=int, default=[16, 256])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--prefill-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("varlen: no CUDA device; nothing to measure")
        return 0
    device = torch.device("cuda")
    copy = copy_bandwidth_gbs(device)
    print(f"# copy bandwidth {copy:.0f} GB/s, {torch.cuda.get_device_name(device)}")
    print("kind,provider,B,S,page_or_padding_pct,ms,pct_copy_or_speedup")
    rows = []
    if args.only != "prefill":
        rows.append(paged_decode_rows(args.kv, args.batch, args.pages, device, copy))
    if args.only != "decode":
        rows.append(varlen_prefill_rows(args.lengths, args.prefill_batch, (0.0, 0.5), device))
    for source in rows:
        for r in source:
            metric = r.get("pct_copy", r.get("speedup"))
            print(f"{r['kind']},{r['provider']},{r['B']},{r['S']},{r['page']},{r['ms']:.4f},{metric:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
