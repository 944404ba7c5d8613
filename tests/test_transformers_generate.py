"""Greedy generation with attn_implementation="fastattn": same tokens as Transformers'
attention in fp32 (DynamicCache and StaticCache, left-padded batches), close
logits in half precision."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

from fastattn.integrations import transformers as hf  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers import TOL, VOCAB, make_model  # noqa: E402


def left_padded(batch: int = 3, seq: int = 8, pad: tuple = (3, 0, 1)):
    ids = torch.randint(1, VOCAB, (batch, seq), device=DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generate(model, impl, ids, mask, cache, new_tokens=5):
    hf.set_attn_implementation(model, impl)
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt_oss"])
@pytest.mark.parametrize("padding", ["left", "none"])
def test_greedy_generate_fp32_same_tokens(arch, cache, padding):
    model = make_model(arch, torch.float32)
    ids, mask = left_padded(pad=(3, 0, 1) if padding == "left" else (0, 0, 0))
    ref_impl = "sdpa" if model._supports_sdpa else "eager"
    ref_tokens, ref_logits = generate(model, ref_impl, ids, mask, cache)
    tokens, logits = generate(model, "fastattn", ids, mask, cache)
    assert torch.equal(tokens, ref_tokens), f"{arch}/{cache}: tokens differ:\n{tokens}\nvs {ref_impl}\n{ref_tokens}"
    assert (logits - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_half_close_logits(cache):
    dtype = torch.float16 if cache == "dynamic" else torch.bfloat16
    model = make_model("llama", dtype)
    ids, mask = left_padded()
    ref_tokens, ref_logits = generate(model, "sdpa", ids, mask, cache, new_tokens=3)
    with hf.record_backends() as records:
        tokens, logits = generate(model, "fastattn", ids, mask, cache, new_tokens=3)
    assert {r.backend for r in records} == {"triton"}
    # Compare the logits of the first step (same prompt), and later steps where the tokens agree.
    atol, rtol = TOL[dtype]
    same = (tokens == ref_tokens).all(dim=1)
    diff = (logits[same].float() - ref_logits[same].float()).abs().max().item()
    first = (logits[:, 0].float() - ref_logits[:, 0].float()).abs().max().item()
    bound = atol + rtol * ref_logits.float().abs().max().item()
    assert first <= bound and diff <= bound, (first, diff, bound)


def test_static_cache_generation_under_torch_compile():
    """Transformers' compiled decoding: the forward under torch.compile with a StaticCache,
    left padding, fastattn's attention: the same tokens as eager attention without compile."""
    model = make_model("llama", torch.float32)
    ids, mask = left_padded()
    ref_tokens, ref_logits = generate(model, "eager", ids, mask, "static")
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager")
    try:
        tokens, logits = generate(model, "fastattn", ids, mask, "static")
    finally:
        del model.forward
        torch._dynamo.reset()
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_attention_forward_compiles_without_graph_breaks():
    """The attention function Transformers calls, as a decode step calls it (one query,
    a key-padding mask), traces as one graph."""
    module = make_model("llama", torch.float32).model.layers[0].self_attn
    heads, kv_heads, dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    q = torch.randn(3, heads, 1, dim, device=DEVICE)
    k, v = (torch.randn(3, kv_heads, 9, dim, device=DEVICE) for _ in range(2))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :3] = False

    def attend(q, k, v, mask):
        return hf.attention_forward(module, q, k, v, mask, dropout=0.0, scaling=dim ** -0.5)[0]

    torch._dynamo.reset()
    got = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(got, attend(q, k, v, mask))
