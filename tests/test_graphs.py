"""fastattn's calls capture into CUDA graphs (issue #12, section 3): a plain ``torch.cuda.graph``
capture and replay of an attention call at decode shapes, with and without a key-padding mask,
gives what the same call gives eagerly; and Transformers' StaticCache generation with the
forward under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs by torch) gives eager
attention's tokens. GPU only (``benchmarks/gpu_check.sh`` runs this file; the no-sync property
behind it is checked on the CPU too, in tests/test_hostcost.py).

No test name contains "cuda": the GPU check's first pytest run deselects such names (-k "not
cuda") and hands them to its second run, which has the CUDA extension built; the backend
parameter "cuda" below goes there.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.testing import assert_close_by_rule, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, HQ, HKV, S, D = 4, 16, 4, 333, 128  # a decode step of a GQA model, an awkward key count


def _skip_unless_runnable(backend: str, q, k, v, mask):
    if backend == "auto":
        return
    reasons = fastattn.explain(q, k, v, attn_mask=mask, enable_gqa=True).reasons(backend)
    if reasons:
        pytest.skip(f"{backend} cannot run this call here: {'; '.join(reasons)}")


def _fill(q, k, v, mask, generator):
    """New inputs in the graph's static buffers (a replay reads whatever they hold)."""
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=generator, device="cpu", dtype=torch.float32).to(t.device, t.dtype))
    if mask is not None:
        lengths = torch.randint(1, S + 1, (B,), generator=generator)
        starts = S - lengths  # left padding, at least one key per row
        mask.copy_((torch.arange(S)[None, :] >= starts[:, None]).view(B, 1, 1, S).to(mask.device))


def _capture(fn):
    """Warm up on a side stream (kernels compile, plans are made), then capture one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _front(front: str, q, k, v, mask):
    """The call, through one of fastattn's front ends, on (B, H, S, D) buffers."""
    if front == "sdpa":
        return lambda: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if front == "flash":
        assert mask is None
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views: the buffers stay static
        return lambda: fastattn.flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)
    from fastattn.integrations import transformers as hf

    module = torch.nn.Module()
    module.is_causal = True
    return lambda: hf.attention_forward(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5)[0].transpose(1, 2)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("front,masked", [("sdpa", False), ("sdpa", True), ("flash", False),
                                          ("transformers", False), ("transformers", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_replay_of_a_decode_step_matches_eager(front, masked, backend, dtype):
    device = "cuda"
    q = torch.empty(B, HQ, 1, D, device=device, dtype=dtype)
    k, v = (torch.empty(B, HKV, S, D, device=device, dtype=dtype) for _ in range(2))
    mask = torch.empty(B, 1, 1, S, device=device, dtype=torch.bool) if masked else None
    generator = torch.Generator().manual_seed(12)
    _fill(q, k, v, mask, generator)
    _skip_unless_runnable(backend, q, k, v, mask)
    fn = _front(front, q, k, v, mask)
    with fastattn.use_backend(backend):
        graph, out = _capture(fn)
        for _ in range(3):  # replays on new data in the same buffers
            _fill(q, k, v, mask, generator)
            graph.replay()
            torch.cuda.synchronize()
            replayed = out.clone()
            ref, _ = reference_attention(q, k, v, mask=mask)
            ref_lowp, _ = reference_attention(q, k, v, mask=mask, compute_dtype=None)
            # Against the new data: a replay that read stale inputs (or a stale mask) fails here.
            assert_close_by_rule(replayed, ref.float(), ref_lowp, what=f"{front} replayed")
            torch.testing.assert_close(replayed, fn())  # and what the same call gives eagerly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_generation_under_reduce_overhead_compile(dtype):
    """Transformers' compiled decoding with CUDA graphs: StaticCache, left padding, the forward
    under torch.compile(mode="reduce-overhead"). fp32: eager attention's tokens and logits within
    1e-4; bf16: the same kernels eagerly (fastattn without compile) give the same tokens, and the
    first step's logits agree within bf16's tolerance."""
    pytest.importorskip("transformers")
    from .test_transformers import TOL, make_model
    from .test_transformers_generate import generate, left_padded

    model = make_model("llama", dtype)
    ids, mask = left_padded()
    ref_impl = "eager" if dtype == torch.float32 else "fastattn"
    ref_tokens, ref_logits = generate(model, ref_impl, ids, mask, "static")
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    try:
        tokens, logits = generate(model, "fastattn", ids, mask, "static")
        tokens_again, _ = generate(model, "fastattn", ids, mask, "static")  # replays the captured graphs
    finally:
        del model.forward
        torch._dynamo.reset()
    if dtype == torch.float32:
        assert torch.equal(tokens, ref_tokens) and torch.equal(tokens_again, ref_tokens)
        assert (logits - ref_logits).abs().max().item() <= 1e-4
    else:
        atol, rtol = TOL[dtype]
        first = (logits[:, 0].float() - ref_logits[:, 0].float()).abs().max().item()
        assert first <= atol + rtol * ref_logits[:, 0].float().abs().max().item()
        assert torch.equal(tokens_again, tokens)
