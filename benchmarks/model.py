"""A Llama-shaped model with random weights: prefill and decode tokens/s, and the
peak memory of a padded batch, with torch SDPA vs fastattn as the attention.

    python -m benchmarks.model                      # GPU: 4 layers of Llama-3-8B, bf16
    python -m benchmarks.model --layers 2 --prefill 2x2048 --decode 8x4096
    python -m benchmarks.model --transformers       # the same with Transformers' LlamaForCausalLM,
                                                    # attn_implementation "sdpa" vs "fastattn"
    python -m benchmarks.model --tiny               # CPU-sized dry run of the same code
    python -m benchmarks.model --generate --threads 1   # greedy generate per step, sdpa vs fastattn
                                                    # (a tiny 8-layer Llama, 2 Llama-3-8B layers; CPU too)

By default the model is written out here (embedding, RMSNorm, RoPE, GQA attention, SwiGLU
MLP, a static KV cache) so that the one thing that differs between the two runs
is the attention function: ``torch.nn.functional.scaled_dot_product_attention``
or ``fastattn.scaled_dot_product_attention``, called with the same arguments.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn

from .cases import padded_lengths, padded_row_mask
from .measure import peak_memory_mb, run_info, time_cuda
from .report import append_rows

ATTENTION = {"sdpa": F.scaled_dot_product_attention, "fastattn": fastattn.scaled_dot_product_attention}
ROUNDS = 5  # turns per measure and attention (see main)


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096  # Llama-3-8B
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    layers: int = 4
    rope_theta: float = 500000.0


TINY = Shape(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=1000, layers=2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    """Rotate-half RoPE on (B, H, L, D) with cos/sin (L, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.q = nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.k = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.v = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.o = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.gate = nn.Linear(s.hidden, s.ffn, bias=False)
        self.up = nn.Linear(s.hidden, s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.hidden, bias=False)
        self.norm1, self.norm2 = RMSNorm(s.hidden), RMSNorm(s.hidden)

    def forward(self, x, cos, sin, cache, pos: int, attn, mask):
        B, L, _ = x.shape
        s = self.s
        h = self.norm1(x)
        # (B, L, H, D) -> (B, H, L, D) views, as Transformers hands them to SDPA.
        q = rope(self.q(h).view(B, L, s.heads, s.head_dim).transpose(1, 2), cos, sin)
        k = rope(self.k(h).view(B, L, s.kv_heads, s.head_dim).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, L, s.kv_heads, s.head_dim).transpose(1, 2)
        if cache is not None:  # static cache (B, Hkv, max_len, D): write this step, attend to all so far
            cache[0][:, :, pos:pos + L] = k
            cache[1][:, :, pos:pos + L] = v
            k, v = cache[0][:, :, :pos + L], cache[1][:, :, :pos + L]
        causal = mask is None and L > 1
        a = attn(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=s.heads != s.kv_heads)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, s.heads * s.head_dim))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)

    def rope_tables(self, positions, device, dtype):
        inv = 1.0 / (self.s.rope_theta ** (torch.arange(0, self.s.head_dim, 2, device=device).float() / self.s.head_dim))
        ang = positions.float()[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, ids, pos: int = 0, caches=None, attn=F.scaled_dot_product_attention, mask=None):
        x = self.embed(ids)
        cos, sin = self.rope_tables(torch.arange(pos, pos + ids.shape[1], device=ids.device), ids.device, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i], pos, attn, mask)
        return self.lm_head(self.norm(x[:, -1:]))  # last position's logits, as generation needs


# --------------------------------------------------------------------------- the Transformers model


def transformers_measures(shape: Shape, device, dtype, ids, lengths, step_ids, dctx: int):
    """The same measures with Transformers' LlamaForCausalLM (random weights), switching
    ``attn_implementation`` between "sdpa" and "fastattn" on one model; decode uses a
    StaticCache of ``dctx + 1`` slots filled by a prefill of ``dctx`` tokens, and every timed
    step is rewound to position ``dctx`` first, so that it rewrites the one free slot."""
    import inspect

    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from fastattn.integrations import transformers as hf
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         vocab_size=shape.vocab, rope_theta=shape.rope_theta,
                         max_position_embeddings=max(ids.shape[1], dctx + 1))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    pb, pl = ids.shape
    pad_mask = (torch.arange(pl, device=device)[None, :] < lengths[:, None]).long()
    ones = torch.ones_like(pad_mask)
    db = step_ids.shape[0]
    # Exactly one free slot, as in our own model's cache: a step that is not rewound fails at
    # once (on the CPU too) instead of after the 16 spare slots a GPU timing loop runs through.
    try:
        cache = StaticCache(config=config, max_cache_len=dctx + 1)
    except TypeError:  # transformers 4.x spelling
        cache = StaticCache(config=config, max_batch_size=db, max_cache_len=dctx + 1, device=device, dtype=dtype)
    # The cache keyword: `past_key_values` up to 5.2x, `cache` since (the old name warns, then goes).
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    context = torch.randint(0, shape.vocab, (db, dctx), device=device)
    filled = []

    def with_cache(start: int, length: int) -> dict:
        kwargs = {cache_kw: cache, "position_ids": torch.arange(start, start + length, device=device).expand(db, -1)}
        if "cache_position" in params:  # 4.x: the write position is an argument
            kwargs["cache_position"] = torch.arange(start, start + length, device=device)
        return kwargs

    def rewind(length: int) -> None:
        # Transformers 5.x StaticCache layers ignore `cache_position`: each update writes at the
        # layer's own counter (`cumulative_length`) and advances it, so a repeated step would
        # walk off the end of the cache (the device-side "index_copy_(): index out of bounds"
        # of the GPU check, transformers 5.17). Set the counter back; one tiny fill per layer,
        # timed alike for both attentions. 4.x caches have no counter and need nothing.
        for layer in getattr(cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(length)
            elif isinstance(counter, int):
                layer.cumulative_length = length

    def setup(impl):
        hf.set_attn_implementation(model, impl)
        if not filled:
            with torch.no_grad():
                model(context, **with_cache(0, dctx), logits_to_keep=1)
            filled.append(True)

    step = with_cache(dctx, 1)

    def decode():
        rewind(dctx)
        return model(step_ids, **step, logits_to_keep=1)

    def measures(impl):
        return {
            "prefill": (lambda: model(ids, attention_mask=ones, logits_to_keep=1), pb, pl, 0, pb * pl),
            "prefill padded": (lambda: model(ids, attention_mask=pad_mask, logits_to_keep=1), pb, pl, 0,
                               int(lengths.sum())),
            "decode": (decode, db, 1, dctx, db),
        }
    return setup, measures


def timed(fn, device) -> float:
    """ms per call, one turn: the median of CUDA events via do_bench on the GPU; on the CPU the
    fastest of 10 wall-clock runs after a warm-up one."""
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=50, rep_ms=100)[1]
    fn()
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return min(samples)


def profile_step(name: str, fn, device) -> None:
    """One call of ``fn`` under torch.profiler: the host's wall time, the device kernels and the
    host ops that took longest (why a launch-bound decode step is slower), printed."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        sync()
    events = prof.key_averages()
    kernels = sorted((e for e in events if getattr(e, "self_device_time_total", 0) > 0),
                     key=lambda e: -e.self_device_time_total)
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)
    print(f"profile {name}: the host took {host_ms:.2f} ms to issue one step; the device ran "
          f"{sum(e.count for e in kernels)} kernels for {sum(e.self_device_time_total for e in kernels) / 1e3:.2f} ms")
    for e in kernels[:6]:
        print(f"  device {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<3} {e.key[:90]}")
    for e in ops[:6]:
        print(f"  host   {e.self_cpu_time_total / 1e3:7.3f} ms  x{e.count:<3} {e.key[:90]}")


def fastattn_choices(fn) -> list[str]:
    """The fastattn backend of every attention call ``fn`` makes (running it once)."""
    seen: list[str] = []
    original = fastattn.scaled_dot_product_attention

    def noting(q, k, v, **kwargs):
        seen.append(fastattn.explain(q, k, v, **kwargs).chosen)
        return original(q, k, v, **kwargs)

    ATTENTION["fastattn"] = noting
    try:
        fn()
    finally:
        ATTENTION["fastattn"] = original
    return seen


# --------------------------------------------------------------------------- greedy generation (CPU or GPU)

# The models of issue #12's CPU benchmark: a tiny Llama with 8 layers and GQA, and 2 layers of
# Llama-3-8B's dimensions (the vocabulary cut to 32k so that the fp32 model fits a dev box: it
# only sizes the embedding and the head, which do not touch attention).
GENERATE_MODELS = {
    "tiny-llama-8L": Shape(hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=1000, layers=8),
    "llama3-8b-dims-2L": Shape(layers=2, vocab=32000),
}


def generate_steps_ms(model, impl: str, ids, mask, new_tokens: int) -> tuple[list[float], torch.Tensor]:
    """One greedy ``generate`` with ``attn_implementation=impl``: the milliseconds of each decode
    step's forward (mask creation included; the prefill and the token choice left out), and the
    tokens. On a GPU wall-clock time, synchronized; on the CPU the CPU time of this thread (torch
    runs on it alone with ``--threads 1``), so that what other processes take of a shared machine
    is not counted."""
    from fastattn.integrations import transformers as hf

    hf.set_attn_implementation(model, impl)
    cuda = ids.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda or torch.get_num_threads() > 1 else time.thread_time
    starts, times = [], []

    def before(module, args, kwargs):
        sync()
        starts.append(clock())

    def after(module, args, kwargs, output):
        sync()
        times.append((clock() - starts[-1]) * 1e3)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        for hook in hooks:
            hook.remove()
    return times[1:], tokens  # the first forward is the prefill


def generate_main(args, device, info) -> int:
    """``--generate``: per-step time of greedy generation, sdpa vs fastattn, each model with and
    without left padding, the two attentions alternating in one run; a table and CSV rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, prompt, steps = 4, 32, max(args.generate_steps, 2)  # the first new token comes from the prefill
    rows = []
    for name, shape in GENERATE_MODELS.items():
        if args.generate_models and name not in args.generate_models:
            continue
        config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             head_dim=shape.head_dim, vocab_size=shape.vocab, rope_theta=shape.rope_theta,
                             max_position_embeddings=prompt + steps + 1, eos_token_id=None, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        model.generation_config.eos_token_id = None
        ids = torch.randint(1, shape.vocab, (batch, prompt), device=device)
        for padding in ("none", "left"):
            mask = torch.ones(batch, prompt, dtype=torch.long, device=device)
            if padding == "left":
                for row, n in enumerate((0, 5, 13, 21)):
                    mask[row, :n] = 0
            # sdpa, fastattn, sdpa, fastattn, ...: drift hits both alike. Each step's time is its
            # fastest over the runs (a shared machine only ever adds time), averaged over the steps.
            # --control: "fastattn"'s turns run sdpa too, so the ratio shows the harness's own spread.
            run_as = {"sdpa": "sdpa", "fastattn": "sdpa" if args.control else "fastattn"}
            steps_ms: dict[str, list[list[float]]] = {"sdpa": [], "fastattn": []}
            tokens = {}
            for run in range(args.repeats + 1):
                for impl in ("sdpa", "fastattn") if run % 2 else ("fastattn", "sdpa"):  # neither always first
                    t, tokens[impl] = generate_steps_ms(model, run_as[impl], ids.masked_fill(mask == 0, 0), mask,
                                                        steps)
                    steps_ms[impl].append(t)
            ms = {impl: statistics.mean(min(step) for step in zip(*runs[1:]))  # the first run warms up
                  for impl, runs in steps_ms.items()}
            same = torch.equal(tokens["sdpa"], tokens["fastattn"])
            for impl in ("sdpa", "fastattn"):
                label = "sdpa (control)" if args.control and impl == "fastattn" else impl
                rows.append(dict(info, model=name, layers=shape.layers, dtype=str(dtype).split(".")[-1], attention=label,
                                 measure=f"generate step, {padding} padding", batch=batch, seqlen=prompt,
                                 context=prompt + steps, status="ok", reason="" if same else "tokens differ",
                                 p50_ms=ms[impl], tokens_per_s=batch / (ms[impl] * 1e-3),
                                 speed_vs_sdpa=ms["sdpa"] / ms[impl]))
            other = "sdpa again" if args.control else "fastattn"
            print(f"{name:18} {padding:5} padding: sdpa {ms['sdpa']:8.2f} ms/step  {other} {ms['fastattn']:8.2f} "
                  f"ms/step  {other}/sdpa {ms['fastattn'] / ms['sdpa']:.3f}x  same tokens: {same}", flush=True)
            append_rows(args.csv, rows[-2:], COLUMNS)
        del model
    print(f"csv: {args.csv}")
    return 0 if all(r["reason"] == "" for r in rows) else 1


COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "cuda", "model", "layers", "dtype", "attention",
           "measure", "batch", "seqlen", "context", "status", "reason", "p50_ms", "tokens_per_s", "peak_mem_mb",
           "speed_vs_sdpa"]


def pair(text: str) -> tuple[int, int]:
    b, n = text.lower().split("x")
    return int(b), int(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=pair, help="BATCHxSEQLEN of the prefill (default 4x2048; tiny: 2x128)")
    parser.add_argument("--decode", type=pair, help="BATCHxCONTEXT of one decode step (default 16x4096; tiny: 2x256)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model (CPU dry run); sizes given with --prefill/--decode are kept")
    parser.add_argument("--transformers", action="store_true",
                        help="Transformers' LlamaForCausalLM with attn_implementation sdpa vs fastattn")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: profile one decode step per attention (host time, top kernels and host ops)")
    parser.add_argument("--generate", action="store_true",
                        help="greedy generate with Transformers' Llama (a tiny 8-layer one and 2 Llama-3-8B-shaped "
                             "layers), with and without left padding: time per step, sdpa vs fastattn (CPU too)")
    parser.add_argument("--generate-steps", type=int, default=16, help="new tokens per generate run (default 16)")
    parser.add_argument("--generate-models", nargs="*", choices=list(GENERATE_MODELS), help="only these models")
    parser.add_argument("--repeats", type=int, default=5, help="--generate: timed runs per attention (default 5)")
    parser.add_argument("--control", action="store_true",
                        help="--generate: sdpa against sdpa, in fastattn's turns too (the harness's own spread)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "out" / "model.csv")
    parser.add_argument("--run-timestamp", help="label the rows with this run timestamp (to join runs of one check)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        info = run_info(device)
        if args.run_timestamp:
            info["timestamp"] = args.run_timestamp
        print(f"greedy generate on {info['device']} ({torch.get_num_threads()} threads): ms per new token, "
              f"batch 4, prompt 32", flush=True)
        return generate_main(args, device, info)
    tiny = args.tiny or device.type == "cpu"
    shape = TINY if tiny else Shape(layers=args.layers)
    pb, pl = args.prefill or ((2, 128) if tiny else (4, 2048))
    db, dctx = args.decode or ((2, 256) if tiny else (16, 4096))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    info = run_info(device)
    if args.run_timestamp:
        info["timestamp"] = args.run_timestamp
    name = ("hf-" if args.transformers else "") + ("tiny-llama" if tiny else f"llama3-8b-dims-{shape.layers}L")
    print(f"{name} on {info['device']}: prefill {pb}x{pl}, decode {db} sequences at context {dctx}", flush=True)

    ids = torch.randint(0, shape.vocab, (pb, pl), device=device)
    lengths = padded_lengths(pb, pl, device)  # half padding
    mask = padded_row_mask(lengths, pl)
    step_ids = torch.randint(0, shape.vocab, (db, 1), device=device)
    kv_shape = (db, shape.kv_heads, dctx + 1, shape.head_dim)
    caches = None if args.transformers else [
        (torch.randn(kv_shape, device=device, dtype=dtype), torch.randn(kv_shape, device=device, dtype=dtype))
        for _ in range(shape.layers)]

    if args.transformers:
        setup, measures_of = transformers_measures(shape, device, dtype, ids, lengths, step_ids, dctx)
    else:
        with torch.device(device):
            model = Llama(shape).to(dtype).eval()

        def setup(attn_name):
            pass

        def measures_of(attn_name):
            attn = ATTENTION[attn_name]
            return {
                "prefill": (lambda: model(ids, attn=attn), pb, pl, 0, pb * pl),
                "prefill padded": (lambda: model(ids, attn=attn, mask=mask), pb, pl, 0, int(lengths.sum())),
                # one decode step at position dctx, every sequence adds one token (rewrites the same slot)
                "decode": (lambda: model(step_ids, pos=dctx, caches=caches, attn=attn), db, 1, dctx, db),
            }

    # Each measure's attentions are timed in turns, ROUNDS times, alternating which goes first,
    # and each keeps its fastest turn: a machine that speeds up or slows down over the run (a
    # shared CPU box, a GPU's clocks) then favours neither. Timed one after the other, a tiny
    # Llama's decode step read 0.71-1.15x between two CPU runs of the same code.
    rows, measures = [], {}
    for attn_name in ATTENTION:
        try:
            setup(attn_name)
            measures[attn_name] = measures_of(attn_name)
        except Exception as exc:
            rows.append(dict(info, model=name, layers=shape.layers, attention=attn_name, measure="setup",
                             status="error", reason=f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
            append_rows(args.csv, rows[-1:], COLUMNS)
    names = list(next(iter(measures.values()), {}))
    for measure in names:
        timings = {attn_name: [] for attn_name in measures}
        errors = {}
        for turn in range(ROUNDS):
            order = list(measures) if turn % 2 == 0 else list(reversed(measures))
            for attn_name in order:
                if attn_name in errors:
                    continue
                try:
                    setup(attn_name)
                    with torch.no_grad():
                        timings[attn_name].append(timed(measures[attn_name][measure][0], device))
                except Exception as exc:
                    errors[attn_name] = f"{type(exc).__name__}: " + (
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        for attn_name in measures:
            fn, batch, seqlen, context, tokens = measures[attn_name][measure]
            row = dict(info, model=name, layers=shape.layers, dtype=str(dtype).split(".")[-1], attention=attn_name,
                       measure=measure, batch=batch, seqlen=seqlen, context=context, status="error",
                       reason=errors.get(attn_name, ""))
            rows.append(row)
            if attn_name not in errors:
                ms = min(timings[attn_name])
                setup(attn_name)
                with torch.no_grad():
                    row.update(status="ok", p50_ms=ms, tokens_per_s=tokens / (ms * 1e-3),
                               peak_mem_mb=peak_memory_mb(fn, device))
            base = next((r for r in rows if r["attention"] == "sdpa" and r["measure"] == measure), None)
            if row["status"] == "ok" and base and base["status"] == "ok":
                row["speed_vs_sdpa"] = base["p50_ms"] / row["p50_ms"]
            append_rows(args.csv, [row], COLUMNS)  # one at a time: a run cut short keeps what it measured

    if args.profile and not args.transformers:  # one decode step, each attention
        def step(attn_name):
            return lambda: model(step_ids, pos=dctx, caches=caches, attn=ATTENTION[attn_name])

        with torch.no_grad():
            print(f"fastattn backends in decode: {', '.join(dict.fromkeys(fastattn_choices(step('fastattn'))))}")
            for attn_name in ATTENTION:
                profile_step(f"decode {attn_name}", step(attn_name), device)
    print(f"csv: {args.csv}\n")
    print(f"{'measure':15} {'attention':9} {'p50 ms':>9} {'tokens/s':>11} {'peak MiB':>9} {'vs sdpa':>8}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['measure']:15} {r['attention']:9} {r['p50_ms']:9.2f} {r['tokens_per_s']:11.0f} "
                  f"{r['peak_mem_mb']:9.0f} {r.get('speed_vs_sdpa', math.nan):7.2f}x")
        else:
            print(f"{r['measure']:15} {r['attention']:9} error: {r['reason'][:100]}")
    # Any measure that could not run is a failure of the run (the GPU check's stage shows it).
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
