"""torch.compile traces through fastattn: the Triton kernel is an opaque custom op
with a fake implementation (Transformers compiles the forward for StaticCache
generation, so this is not optional)."""
import pytest
import torch

import fastattn
from fastattn.ops.triton_fwd import triton_bwd, triton_fwd
from fastattn.testing import assert_close_by_rule, reference_attention

from .conftest import DEVICE


def inputs(dtype=torch.float16):
    q = torch.randn(2, 9, 4, 32, device=DEVICE, dtype=dtype).transpose(1, 2)  # (B, H, L, E) view of (B, L, H, E)
    k = torch.randn(2, 2, 13, 32, device=DEVICE, dtype=dtype)
    v = torch.randn(2, 2, 13, 32, device=DEVICE, dtype=dtype)
    mask = torch.rand(2, 1, 1, 13, device=DEVICE) > 0.3
    return q, k, v, mask


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_forward(grad):
    """Schema, fake tensor, autograd registration and AOT dispatch (the backward included)."""
    q, k, v, mask = inputs()
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))
    sinks = torch.randn(4, device=DEVICE).requires_grad_(grad)
    torch.library.opcheck(triton_fwd, (q, k, v, mask, None, sinks, 0.2, 5, 0, 4, 0.0))


def test_opcheck_backward():
    q, k, v, mask = inputs()
    sinks = torch.randn(4, device=DEVICE)
    out, lse = triton_fwd(q, k, v, mask, None, sinks, 0.2, 5, 0, 4, 0.0)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    torch.library.opcheck(triton_bwd, (dout, dlse, q, k, v, out, lse, mask, None, sinks, 0.2, 5, 0, 4, 0.0))
    torch.library.opcheck(triton_bwd, (dout, None, q, k, v, out, lse, None, None, None, 0.2, -1, -1, 4, 0.0))


def test_fake_outputs_match_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, mask = inputs()
    real_out, real_lse = triton_fwd(q, k, v, mask, None, None, 0.2, -1, 0, 4, 0.0)
    with FakeTensorMode() as mode:
        fq, fk, fv, fm = (mode.from_tensor(t) for t in (q, k, v, mask))
        fake_out, fake_lse = triton_fwd(fq, fk, fv, fm, None, None, 0.2, -1, 0, 4, 0.0)
    assert fake_out.shape == real_out.shape and fake_out.stride() == real_out.stride()
    assert fake_lse.shape == real_lse.shape and fake_lse.dtype == real_lse.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_compiled_sdpa_with_a_bool_mask(dtype):
    q, k, v, mask = inputs(dtype)

    def attend(q, k, v, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) * 2

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        got = torch.compile(attend, backend=recording_backend, fullgraph=True)(q, k, v, mask)
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.ops.fastattn.triton_fwd.default in targets, "the kernel did not enter the graph as its custom op"
    ref, _ = reference_attention(q, k, v, mask=mask)
    ref_lowp, _ = reference_attention(q, k, v, mask=mask, compute_dtype=None)
    assert_close_by_rule(got / 2, ref.float(), ref_lowp)


@pytest.mark.parametrize("front", ["sdpa", "flash"])
def test_front_ends_compile_without_graph_breaks(front):
    """fullgraph=True: the dispatch decision is made while tracing, none of it breaks the graph
    (Python 3.11's functools.cached_property lock and torch's SDPA flag getters once did)."""
    q, k, v, mask = inputs()

    def attend(q, k, v, mask):
        if front == "sdpa":
            return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) * 2
        return fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True) * 2

    torch._dynamo.reset()
    got = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(got, attend(q, k, v, mask))


def test_cuda_backend_traces_without_graph_breaks(monkeypatch):
    """The cuda backend's checks under torch.compile: the extension's status is read as a
    constant (first use included: a lock and file checks), and the inputs' start taken as
    aligned (fake tensors have no data pointer)."""
    from fastattn import _extension
    from fastattn.backends import cuda

    monkeypatch.setattr(_extension, "_status", None)  # the first use happens while tracing
    x = torch.randn(2, 3, 5, 64)[:, :, 1:]  # a view 64 elements in: 16-byte aligned

    def check(x):
        backend = fastattn.registered_backends()["cuda"]
        reasons = backend.availability()
        return cuda.prepare(x, 64) * (len(reasons) + len(backend.compiled_head_dims()))

    torch._dynamo.reset()
    got = torch.compile(check, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, check(x))


# --------------------------------------------------------------------------- training steps


def _recording_aot_backend(graphs):
    """aot_eager that keeps the forward and backward graphs it was given."""
    from torch._dynamo.backends.common import aot_autograd

    from functorch.compile import make_boxed_func

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


class _Attention(torch.nn.Module):
    """What Transformers hands its attention function as ``module``."""

    is_causal = True


def _transformers_attention(q, k, v, mask):
    from fastattn.integrations.transformers import attention_forward

    mask = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])  # as Transformers' mask functions make it
    out, _ = attention_forward(_ATTENTION, q, k, v, mask, scaling=0.2)
    return out


_ATTENTION = _Attention()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16_triton", "fp32_fallback"])
@pytest.mark.parametrize("front", ["sdpa", "flash", "transformers"])
def test_training_step_compiles_as_one_graph(front, dtype):
    """A training step through each front end: the loss compiles with fullgraph=True (no graph
    breaks), AOT autograd compiles its backward, the kernel's backward enters that graph as its
    custom op, and loss and gradients are eager's. (Dynamo does not trace ``.backward()`` itself:
    the step calls it on the compiled loss.)"""
    if front == "transformers":
        pytest.importorskip("transformers")
    q, k, v, mask = inputs(dtype)
    weights = torch.randn(2, 9, 4, 32, device=DEVICE, dtype=dtype)

    def loss_of(q, k, v, mask):
        if front == "sdpa":
            out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        elif front == "flash":
            out = fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                           softcap=3.0)
        else:
            out = _transformers_attention(q, k, v, mask)
        return (out.float() * weights.float()).sum()

    def step(loss_fn, q, k, v):
        loss = loss_fn(q, k, v, mask)
        loss.backward()
        return loss.detach()

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (q, k, v)]

    eager = leaves()
    want = step(loss_of, *eager)
    graphs = []
    torch._dynamo.reset()
    compiled = leaves()
    got = step(torch.compile(loss_of, backend=_recording_aot_backend(graphs), fullgraph=True), *compiled)
    assert len(graphs) == 2, "expected one forward and one backward graph"
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad)
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    if dtype == torch.float16:
        assert torch.ops.fastattn.triton_fwd.default in targets and torch.ops.fastattn.triton_bwd.default in targets
    else:
        assert torch.ops.fastattn.triton_fwd.default not in targets  # fp32: the fallback, differentiated by torch
