"""Host cost per call: fastattn's front ends against the torch / Transformers calls they stand in
for, measured side by side in one run on tiny CPU tensors and one thread. On the CPU fastattn
runs torch's SDPA underneath, so every difference is fastattn's own host time.

    python -m benchmarks.overhead                  # the table
    python -m benchmarks.overhead --csv out.csv    # and one CSV row per case
    python -m benchmarks.overhead --quick          # fewer repeats (a smoke run)
    python -m benchmarks.overhead --device cuda    # on a GPU, bf16: host time per call, launch included

On a GPU the loops never wait for the device (a tiny kernel finishes before the next launch is
ready), so the figures are host time per call there too, and the sliding-window decode case
runs fastattn's Triton kernel (torch's counterpart: SDPA with the window as a bool mask, what
Transformers' sdpa path does; on the CPU fastattn's fallback builds that mask per call).

Each case is a pair: the counterpart (what a user calls without fastattn) and fastattn's call on
the same inputs, timed in alternating short batches, so that a busy or drifting machine slows
both alike. The table shows the fastest batch and the median per call in microseconds, and
fastattn's extra microseconds, fastest against fastest (on a shared machine the fastest batch
is the one least disturbed by others: timeit's rule), against the goal from issue #12.

Two rows stand alone (no counterpart; fastattn's own host work): a continuous-batching decode
step through ``flash_attn_varlen_func`` (no cached plan: a new packing each step), and, on the
CPU, a decode step's way to the Triton kernel with the kernel stubbed out: what a GPU pays
before Triton's own launch on every Triton call.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastattn

from .measure import interleaved_samples, run_info
from .report import append_rows

COLUMNS = ["timestamp", "commit", "device", "torch", "transformers", "threads", "case", "counterpart", "theirs_min_us",
           "theirs_p50_us", "fastattn_min_us", "fastattn_p50_us", "extra_us", "ratio", "goal_us"]


@dataclass
class Case:
    name: str
    counterpart: str
    reference: Optional[Callable[[], object]]  # the call fastattn stands in for (None: fastattn's time alone)
    fastattn: Callable[[], object]
    goal_us: Optional[float]  # fastattn may cost at most this much more (None: no goal)
    backend: str = ""  # what fastattn ran
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # held while timing


_ON = {"device": "cpu", "dtype": torch.float32}  # where the cases' tensors live (main() sets it)


def _qkv(B, Hq, Hkv, L, S, E, layout="bhsd"):
    if layout == "bshd":
        return (torch.randn(B, L, Hq, E, **_ON), torch.randn(B, S, Hkv, E, **_ON),
                torch.randn(B, S, Hkv, E, **_ON))
    return torch.randn(B, Hq, L, E, **_ON), torch.randn(B, Hkv, S, E, **_ON), torch.randn(B, Hkv, S, E, **_ON)


def front_end_cases() -> list[Case]:
    """fastattn.scaled_dot_product_attention and flash_attn_func against torch's SDPA."""
    cases = []
    sdpa, ours = F.scaled_dot_product_attention, fastattn.scaled_dot_product_attention
    q, k, v = _qkv(2, 4, 2, 1, 32, 16)
    pad = torch.ones(2, 1, 1, 32, dtype=torch.bool, device=_ON["device"])
    pad[0, ..., :9] = False
    pq, pk, pv = _qkv(2, 4, 2, 16, 16, 16)
    cases += [
        Case("sdpa: decode, GQA 4/2, 32 keys", "F.scaled_dot_product_attention",
             lambda: sdpa(q, k, v, enable_gqa=True), lambda: ours(q, k, v, enable_gqa=True), 3.0),
        Case("sdpa: decode, GQA, key-padding mask", "F.scaled_dot_product_attention",
             lambda: sdpa(q, k, v, attn_mask=pad, enable_gqa=True),
             lambda: ours(q, k, v, attn_mask=pad, enable_gqa=True), 3.0),
        Case("sdpa: prefill 16, causal", "F.scaled_dot_product_attention",
             lambda: sdpa(pq, pk, pv, is_causal=True, enable_gqa=True),
             lambda: ours(pq, pk, pv, is_causal=True, enable_gqa=True), 3.0),
    ]
    fq, fk, fv = _qkv(2, 4, 2, 1, 32, 16, layout="bshd")
    gq, gk, gv = _qkv(2, 4, 2, 16, 16, 16, layout="bshd")

    def torch_bshd(q, k, v, causal):  # what flash_attn_func computes, spelled with torch's SDPA
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                    enable_gqa=True).transpose(1, 2).contiguous()

    cases += [
        Case("flash_attn_func: decode, causal", "F.sdpa on (B, H, S, D) views",
             lambda: torch_bshd(fq, fk, fv, False), lambda: fastattn.flash_attn_func(fq, fk, fv, causal=True), 3.0),
        Case("flash_attn_func: prefill 16, causal", "F.sdpa on (B, H, S, D) views",
             lambda: torch_bshd(gq, gk, gv, True), lambda: fastattn.flash_attn_func(gq, gk, gv, causal=True), 3.0),
    ]
    # No goal: on a GPU the Triton kernel runs it, on the CPU the fallback builds the window's mask.
    wq, wk, wv = _qkv(2, 8, 2, 1, 256, 64, layout="bshd")
    window = torch.zeros(1, 1, 1, 256, dtype=torch.bool, device=_ON["device"])
    window[..., -65:] = True  # flash-attn's window_size=(64, 0) on the last query

    def torch_window(q, k, v):
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=window,
                    enable_gqa=True).transpose(1, 2).contiguous()

    cases.append(Case("flash_attn_func: decode, window 64", "F.sdpa with the window as a mask",
                      lambda: torch_window(wq, wk, wv),
                      lambda: fastattn.flash_attn_func(wq, wk, wv, causal=True, window_size=(64, 0)), None))
    cases.append(varlen_case())
    if torch.device(_ON["device"]).type == "cpu" and _has_triton():
        cases.append(launcher_case())
    return cases


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def varlen_case() -> Case:
    """A continuous-batching decode step: 8 packed sequences, one query each, as
    ``flash_attn_varlen_func`` gets it. Such calls take no cached plan (the packing changes every
    step), so every call is checked and dispatched afresh. Nothing stands beside it: on a GPU
    the row is the whole call, the Triton launch included; on the CPU, where the fallback would
    run the sequences one by one, it is the checks and the choice alone, index values included
    (read for free there; on a GPU they are not read at all)."""
    from fastattn import dispatch
    from fastattn.inputs import from_varlen_args

    lengths = [30 + 3 * i for i in range(8)]
    device = torch.device(_ON["device"])
    cu_q = torch.arange(9, dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    q = torch.randn(8, 4, 16, **_ON)
    k, v = torch.randn(sum(lengths), 2, 16, **_ON), torch.randn(sum(lengths), 2, 16, **_ON)
    if device.type == "cuda":
        return Case("flash_attn_varlen_func: decode, 8 seqs", "(none: the whole call)", None,
                    lambda: fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lengths), causal=True), None)

    def checks_and_choice():
        return dispatch.select(from_varlen_args(q, k, v, cu_q, cu_k, 1, max(lengths), causal=True))

    return Case("varlen: decode, 8 seqs (checks + choice)", "(none: fastattn's host work)", None,
                checks_and_choice, None)


@contextlib.contextmanager
def _triton_kernels_stubbed():
    """The Triton forward kernels replaced by no-ops, with dispatch choosing the Triton backend on
    the CPU (TRITON_INTERPRET=1, which then never runs), so that fastattn's host work on the
    way to Triton's launch can be timed where no GPU runs it."""
    from unittest import mock

    from fastattn.kernels.triton import flash_fwd

    class NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    with mock.patch.dict("os.environ", {"TRITON_INTERPRET": "1"}), \
            mock.patch.multiple(flash_fwd, _flash_fwd_kernel=NoKernel(), _combine_splits_kernel=NoKernel()):
        yield


def launcher_case() -> Case:
    """What a sliding-window decode step (Mistral's; B 4, 8 / 2 heads, hd 64, 256 keys, fp16)
    costs fastattn on the host before Triton's own launch: flash_attn_func's plan, the call, the
    backend and the launcher, with the kernel stubbed."""
    q = torch.randn(4, 1, 8, 64, dtype=torch.float16)
    k, v = torch.randn(4, 256, 2, 64, dtype=torch.float16), torch.randn(4, 256, 2, 64, dtype=torch.float16)
    return Case("flash_attn_func -> triton, kernel stubbed", "(none: fastattn's host work)", None,
                lambda: fastattn.flash_attn_func(q, k, v, causal=True, window_size=(64, 0)), None,
                context=_triton_kernels_stubbed)


def transformers_cases() -> list[Case]:
    """The "fastattn" attention and mask functions against Transformers' sdpa ones."""
    try:
        from transformers import LlamaConfig, masking_utils
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import LlamaAttention
    except ImportError as exc:
        print(f"Transformers cases skipped: {exc}", file=sys.stderr)
        return []
    from fastattn.integrations import transformers as hf

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, num_hidden_layers=1, vocab_size=100)
    module = LlamaAttention(config, layer_idx=0).eval().to(**_ON)  # real parameters: fastattn reads their dtype
    B, S = 2, 32
    dev = _ON["device"]
    padding = torch.ones(B, S, dtype=torch.bool, device=dev)  # as create_causal_mask hands it over
    padding[0, :9] = False  # left padding
    decode = dict(batch_size=B, q_length=1, kv_length=S, q_offset=S - 1, kv_offset=0, attention_mask=padding,
                  device=dev)
    ref_mask, our_mask = masking_utils.sdpa_mask(**decode), hf.mask_function(**decode)
    q, k, v = _qkv(B, 4, 2, 1, S, 16)
    pq, pk, pv = _qkv(B, 4, 2, 16, 16, 16)
    prefill = dict(batch_size=B, q_length=16, kv_length=16, attention_mask=padding[:, -16:], device=dev)
    ref_prefill, our_prefill = masking_utils.sdpa_mask(**prefill), hf.mask_function(**prefill)
    scaling = module.scaling
    # Groups of 4 query heads (Llama-3's): Transformers packs a masked GQA decode step as fastattn
    # does, so the two run the same torch call and the difference is host time alone.
    config4 = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                          intermediate_size=128, num_hidden_layers=1, vocab_size=100)
    module4 = LlamaAttention(config4, layer_idx=0).eval().to(**_ON)
    B4, S4 = 4, 40
    padding4 = torch.ones(B4, S4, dtype=torch.bool, device=dev)
    for row, n in enumerate((0, 5, 13, 21)):
        padding4[row, :n] = False
    decode4 = dict(batch_size=B4, q_length=1, kv_length=S4, q_offset=S4 - 1, kv_offset=0, attention_mask=padding4,
                   device=dev)
    ref4, our4 = masking_utils.sdpa_mask(**decode4), hf.mask_function(**decode4)
    q4, k4, v4 = _qkv(B4, 8, 2, 1, S4, 32)
    cases = [continuous_batching_case(module4)] if torch.device(dev).type == "cuda" else []
    return cases + [
        Case("transformers: decode, GQA 8/2, key-padding mask", "sdpa_attention_forward",
             lambda: sdpa_attention_forward(module4, q4, k4, v4, ref4, dropout=0.0, scaling=module4.scaling),
             lambda: hf.attention_forward(module4, q4, k4, v4, our4, dropout=0.0, scaling=module4.scaling), 5.0),
        Case("transformers: decode, GQA, key-padding mask", "sdpa_attention_forward",
             lambda: sdpa_attention_forward(module, q, k, v, ref_mask, dropout=0.0, scaling=scaling),
             lambda: hf.attention_forward(module, q, k, v, our_mask, dropout=0.0, scaling=scaling), 5.0),
        Case("transformers: decode, GQA, no mask", "sdpa_attention_forward",
             lambda: sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling),
             lambda: hf.attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling), 5.0),
        Case("transformers: prefill 16, causal, no mask", "sdpa_attention_forward",
             lambda: sdpa_attention_forward(module, pq, pk, pv, None, dropout=0.0, scaling=scaling),
             lambda: hf.attention_forward(module, pq, pk, pv, None, dropout=0.0, scaling=scaling), 5.0),
        Case("transformers: prefill 16, causal + padding", "sdpa_attention_forward",
             lambda: sdpa_attention_forward(module, pq, pk, pv, ref_prefill, dropout=0.0, scaling=scaling),
             lambda: hf.attention_forward(module, pq, pk, pv, our_prefill, dropout=0.0, scaling=scaling), None),
        Case("mask: decode step with left padding", "masking_utils.sdpa_mask",
             lambda: masking_utils.sdpa_mask(**decode), lambda: hf.mask_function(**decode), 0.0),
        Case("mask: decode step, no padding", "masking_utils.sdpa_mask",
             lambda: masking_utils.sdpa_mask(**dict(decode, attention_mask=torch.ones_like(padding))),
             lambda: hf.mask_function(**dict(decode, attention_mask=torch.ones_like(padding))), 0.0),
        Case("mask: prefill 16 with left padding", "masking_utils.sdpa_mask",
             lambda: masking_utils.sdpa_mask(**prefill), lambda: hf.mask_function(**prefill), None),
    ]


def continuous_batching_inputs(module, lengths=tuple(30 + 3 * i for i in range(8))):
    """One layer's call in a continuous-batching decode step as Transformers makes it: each
    sequence's new query against its cached keys, all packed in one row ((1, H, total, D)),
    with ``cu_seq_lens_q/k``; and the block mask Transformers' sdpa path builds for the same
    step instead (query b sees its own sequence's keys), shared by every layer."""
    dev = torch.device(_ON["device"])
    B, total = len(lengths), sum(lengths)
    cfg = module.config
    q = torch.randn(1, cfg.num_attention_heads, B, cfg.head_dim, **_ON)
    k, v = (torch.randn(1, cfg.num_key_value_heads, total, cfg.head_dim, **_ON) for _ in range(2))
    cu_k = torch.tensor((0,) + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_of_key = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))
    block = (seq_of_key[None, :] == torch.arange(B)[:, None]).view(1, 1, B, total).to(dev)
    kwargs = dict(cu_seq_lens_q=torch.arange(B + 1, dtype=torch.int32, device=dev), cu_seq_lens_k=cu_k.to(dev),
                  max_length_q=1, max_length_k=max(lengths))
    return q, k, v, block, kwargs


def continuous_batching_case(module) -> Case:
    """GPU only: on the CPU fastattn's fallback runs the sequences one by one, a comparison of
    two computations rather than of host costs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fastattn.integrations import transformers as hf

    q, k, v, block, kwargs = continuous_batching_inputs(module)
    return Case("transformers: continuous-batching decode, 8 seqs", "sdpa_attention_forward, block mask",
                lambda: sdpa_attention_forward(module, q, k, v, block, dropout=0.0, scaling=module.scaling),
                lambda: hf.attention_forward(module, q, k, v, None, dropout=0.0, scaling=module.scaling, **kwargs),
                None)


def measure(cases: list[Case], repeats: int, batch_s: float) -> list[dict]:
    rows = []
    for case in cases:
        fns = {"fastattn": case.fastattn} if case.reference is None else {"theirs": case.reference,
                                                                          "fastattn": case.fastattn}
        with torch.no_grad(), case.context():
            samples = {name: [t * 1e6 for t in times] for name, times in interleaved_samples(  # us per call
                fns, repeats, batch_s, warmup=20, calibrate=20).items()}
        ours, theirs = samples["fastattn"], samples.get("theirs")
        row = dict(case=case.name, counterpart=case.counterpart, theirs_min_us="", theirs_p50_us="",
                   fastattn_min_us=min(ours), fastattn_p50_us=statistics.median(ours), extra_us=min(ours), ratio="",
                   goal_us="" if case.goal_us is None else case.goal_us)
        if theirs is not None:
            row.update(theirs_min_us=min(theirs), theirs_p50_us=statistics.median(theirs),
                       extra_us=min(ours) - min(theirs), ratio=min(ours) / min(theirs))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<46} {'counterpart':<32} {'theirs min/p50':>15} {'fastattn min/p50':>17} {'extra':>7} "
            f"{'ratio':>6}  goal")
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = r["goal_us"]
        verdict = "" if goal == "" else (f"<= {goal:+g} us " + ("ok" if r["extra_us"] <= goal else "MISSED"))
        theirs = "-" if r["theirs_min_us"] == "" else f"{r['theirs_min_us']:7.1f}/{r['theirs_p50_us']:<7.1f}"
        lines.append(f"{r['case']:<46} {r['counterpart']:<32} {theirs:>15} "
                     f"{r['fastattn_min_us']:8.1f}/{r['fastattn_p50_us']:<8.1f} {r['extra_us']:+7.1f} "
                     + (f"{r['ratio']:5.2f}x" if r["ratio"] != "" else f"{'-':>6}") + f"  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--csv", type=Path, help="append one row per case to this CSV")
    parser.add_argument("--quick", action="store_true", help="a few short batches (smoke run; figures mean little)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the goals assume)")
    parser.add_argument("--no-transformers", action="store_true", help="only the SDPA and flash-attn front ends")
    parser.add_argument("--device", default="cpu", help="cpu (float32, the goals' setting) or cuda (bfloat16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    _ON.update(device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    cases = front_end_cases() + ([] if args.no_transformers else transformers_cases())
    info = run_info(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "-"
    print(f"host cost per call on {info['device']}, {args.threads} thread(s), torch {info['torch']}, "
          f"transformers {info['transformers']}, fastattn {fastattn.__version__} ({info['commit']})", flush=True)
    rows = measure(cases, repeats=3 if args.quick else 101, batch_s=0.0005 if args.quick else 0.002)
    print(table(rows))
    if args.csv:
        append_rows(args.csv, [dict(info, threads=args.threads, **r) for r in rows], COLUMNS)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
