"""Training on packed variable-length batches: the Triton backward with per-sequence layouts.

Each case draws fresh inputs, runs ``flash_attn_varlen_func`` (or the kernels' launchers)
forced onto the triton backend, backpropagates a random dO (and a dLSE where the lse is
used), and holds dq, dk, dv (and d_sinks) to flash-attn's gradient rule against fp64
autograd through ``fastattn.testing.reference_attention`` applied to each sequence on its
own (its own lengths, its own bottom-right diagonal): error <= 3 x the error of the same
math in the input dtype + a tiny floor. The lengths cross the interpreter's 16 x 16 blocks;
sequences with no queries, no keys, and more queries than keys are among them.
"""
import pytest
import torch

import fastattn
from fastattn.kernels.triton.flash_bwd import flash_attn_backward
from fastattn.kernels.triton.flash_fwd import Sequences, flash_attn_forward
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention

from .conftest import DEVICE
from .test_backward import autograd_graph_has, dout_like, leaves
from .test_compile import _recording_aot_backend

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
LENGTHS_Q = [1, 2, 0, 17, 113]
LENGTHS_K = [1, 7, 3, 9, 133]  # keys != queries per sequence; 0 queries with 3 keys; 17 queries, 9 keys


def cu(lengths):
    return torch.tensor([0] + list(lengths), device=DEVICE).cumsum(0).to(torch.int32)


def packed_reference(q, k, v, lens_q, lens_k, *, compute_dtype, alibi_slopes=None, **kw):
    """(out (total_q, H, Ev), lse (H, total_q)) of reference_attention on each sequence's own
    rows, differentiable back to the packed q, k, v (and sinks)."""
    outs, lses = [], []
    for b, (qb, kb, vb) in enumerate(zip(q.split(lens_q), k.split(lens_k), v.split(lens_k))):
        slopes = None if alibi_slopes is None else alibi_slopes[b:b + 1]
        out, lse = reference_attention(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                                       lower_right=True, compute_dtype=compute_dtype, alibi_slopes=slopes, **kw)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def ran_on_the_varlen_kernel(out) -> bool:
    """The output's autograd graph holds the varlen op's node (its registered backward is the kernel's)."""
    return autograd_graph_has(out, "fastattn_triton_varlen_fwd")


def backward(out, lse, dout, dlse):
    outputs, grads = [out], [dout.to(out.dtype)]
    if dlse is not None:
        outputs.append(lse)
        grads.append(dlse.to(lse.dtype))
    torch.autograd.backward(outputs, grads)


def check_varlen_grads(tensors, lens_q, lens_k, *, use_lse=False, max_seqlen=None, **kw):
    """flash_attn_varlen_func on fresh leaves of ``tensors`` (q, k, v[, sinks]) against the
    per-sequence reference. ``kw``: causal, window, softcap, alibi_slopes (both take them;
    the front end's window is window_size) and softmax_scale (the reference's scale)."""
    sinks_given = len(tensors) > 3 and tensors[3] is not None
    api = {("window_size" if key == "window" else key): value for key, value in kw.items()}
    ref_kw = {key: value for key, value in kw.items() if key != "softmax_scale"}
    ref_kw["scale"] = kw.get("softmax_scale")
    max_q, max_k = max_seqlen or (max(lens_q), max(lens_k))

    got = leaves(*tensors)
    with fastattn.use_backend("triton"):
        out, lse = fastattn.flash_attn_varlen_func(
            got[0], got[1], got[2], cu(lens_q), cu(lens_k), max_q, max_k, return_lse=True,
            learnable_sink=got[3] if sinks_given else None, **api)
    assert ran_on_the_varlen_kernel(out), "the triton backend's output is not differentiated by its own backward"
    dout = dout_like(out)
    dlse = torch.randn_like(lse) if use_lse else None
    backward(out, lse, dout, dlse)

    def reference(dtype):
        ts = leaves(*tensors, dtype=dtype)
        out, lse = packed_reference(*ts[:3], lens_q, lens_k, compute_dtype=dtype,
                                    sinks=ts[3] if sinks_given else None, **ref_kw)
        backward(out, lse, dout, dlse)
        return ts, out, lse

    ref, _, _ = reference(torch.float64)
    lowp, lowp_out, lowp_lse = reference(None)
    lowp_grads = [t.grad for t in lowp[:3]]
    if sinks_given:
        # As the kernels do it (tests/test_backward.py's sinks_grad_from_stored_output): from the
        # output stored in the input dtype, with the lse's gradient shifting rowsum(dO * O).
        delta = (dout.float() * lowp_out.detach().float()).sum(-1).T  # (H, total_q)
        if dlse is not None:
            delta = delta - dlse
        p_sink = torch.exp(lowp[3].detach().float()[:, None] - lowp_lse.detach())
        lowp_grads.append(-(p_sink * delta).sum(1).to(lowp[3].dtype))
    for name, g, r, lp in zip(("dq", "dk", "dv", "dsinks"), got, ref, lowp_grads):
        assert g.grad is not None, f"{name}: no gradient"
        assert g.grad.dtype == g.dtype and g.grad.shape == g.shape, f"{name}: {g.grad.dtype} {tuple(g.grad.shape)}"
        assert_close_by_rule(g.grad, r.grad, lp, factor=GRADIENT_FACTOR, what=name)
    return got


def packed_inputs(lens_q, lens_k, H, Hk, E, Ev, dtype):
    return (torch.randn(sum(lens_q), H, E, device=DEVICE, dtype=dtype),
            torch.randn(sum(lens_k), Hk, E, device=DEVICE, dtype=dtype),
            torch.randn(sum(lens_k), Hk, Ev, device=DEVICE, dtype=dtype))


# --------------------------------------------------------------------------- flash_attn_varlen_func


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["none", "causal", "window"])
def test_varlen_gradients(dtype, kind):
    """GQA, lengths 0..133 with each sequence's own bottom-right diagonal."""
    kw = {"none": {}, "causal": {"causal": True}, "window": {"window": (7, 3)}}[kind]
    got = check_varlen_grads(packed_inputs(LENGTHS_Q, LENGTHS_K, 2, 1, 32, 32, dtype), LENGTHS_Q, LENGTHS_K, **kw)
    # The sequence with 3 keys and no query: its keys get exactly zero gradients.
    keys = slice(sum(LENGTHS_K[:2]), sum(LENGTHS_K[:3]))
    assert (got[1].grad[keys] == 0).all() and (got[2].grad[keys] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_gradients_with_features(dtype):
    """Head dims 59/40, softcap, ALiBi per sequence, trained sinks and the lse's own gradient, in a window."""
    lens_q, lens_k = [3, 0, 40, 17], [5, 2, 40, 30]
    slopes = torch.rand(len(lens_q), 4, device=DEVICE)
    q, k, v = packed_inputs(lens_q, lens_k, 4, 1, 59, 40, dtype)
    sinks = torch.randn(4, device=DEVICE)
    check_varlen_grads((q, k, v, sinks), lens_q, lens_k, use_lse=True, causal=True, window=(11, 0), softcap=5.0,
                       alibi_slopes=slopes, softmax_scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_lse_gradient(dtype):
    lens = [20, 0, 35]
    check_varlen_grads(packed_inputs(lens, lens, 2, 2, 64, 64, dtype), lens, lens, use_lse=True, causal=True)


@pytest.mark.parametrize("max_seqlen", ["int", "tensor"])
def test_max_seqlen_forms_with_grad(max_seqlen):
    lens_q, lens_k = [5, 0, 33], [9, 4, 33]
    bounds = (33, 33) if max_seqlen == "int" else (torch.tensor(33), torch.tensor(33))
    check_varlen_grads(packed_inputs(lens_q, lens_k, 2, 1, 32, 32, torch.float16), lens_q, lens_k, causal=True,
                       max_seqlen=bounds)


def test_packed_front_ends_share_the_gradients():
    """The qkv- and kv-packed varlen functions are the varlen one on views: the same gradients, bitwise."""
    lens = [9, 1, 30]
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE, dtype=torch.bfloat16)
    dout = torch.randn(sum(lens), 2, 32, device=DEVICE, dtype=torch.bfloat16)
    with fastattn.use_backend("triton"):
        packed = qkv.clone().requires_grad_()
        fastattn.flash_attn_varlen_qkvpacked_func(packed, cu(lens), 30, causal=True).backward(dout)
        q, kv = qkv[:, 0].clone().requires_grad_(), qkv[:, 1:].clone().requires_grad_()
        fastattn.flash_attn_varlen_kvpacked_func(q, kv, cu(lens), cu(lens), 30, 30, causal=True).backward(dout)
        q2, k2, v2 = (qkv[:, i].clone().requires_grad_() for i in range(3))
        fastattn.flash_attn_varlen_func(q2, k2, v2, cu(lens), cu(lens), 30, 30, causal=True).backward(dout)
    want = torch.stack([q2.grad, k2.grad, v2.grad], 1)
    assert torch.equal(packed.grad, want)
    assert torch.equal(q.grad, q2.grad) and torch.equal(kv.grad, want[:, 1:])


def test_varlen_gradients_are_bitwise_reproducible():
    lens = [17, 40]
    q, k, v = packed_inputs(lens, lens, 4, 2, 32, 32, torch.float16)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        ts = leaves(q, k, v)
        with fastattn.use_backend("triton"):
            fastattn.flash_attn_varlen_func(*ts, cu(lens), cu(lens), 40, 40, causal=True).backward(dout)
        runs.append([t.grad for t in ts])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------- the launchers


def poisoned(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bounds", ["tight", "storage"])
def test_seqused_into_poisoned_buffers(dtype, bounds):
    """seqused_q/k beside cu_seqlens: queries and keys past a sequence's used ones get zero
    gradients, everything else the reference's; every element of the given buffers is
    written. ``storage``: max_seqlen unknown (a GPU tensor), the launch sized by the storage."""
    lens, used_q, used_k = [10, 20, 3, 33], [4, 20, 0, 33], [7, 0, 3, 30]
    H, Hk, E = 2, 1, 32
    q, k, v = packed_inputs(lens, lens, H, Hk, E, E, dtype)
    dout = torch.randn_like(q)
    view = lambda t: t.transpose(0, 1)[None]  # noqa: E731  (total, H, E) -> (1, H, total, E)
    maxes = (33, 33) if bounds == "tight" else (None, None)
    seqs = Sequences(len(lens), cu(lens), cu(lens), *maxes, seqused_q=torch.tensor(used_q, dtype=torch.int32, device=DEVICE),
                     seqused_k=torch.tensor(used_k, dtype=torch.int32, device=DEVICE), lower_right=True)
    out, lse = flash_attn_forward(view(q), view(k), view(v), scale=E ** -0.5, causal_bounds=(-1, 0), seqs=seqs)
    bufs = [poisoned(view(t)) for t in (q, k, v)]
    dq, dk, dv, _ = flash_attn_backward(view(dout), view(q), view(k), view(v), out, lse, scale=E ** -0.5,
                                        causal_bounds=(-1, 0), seqs=seqs, dq=bufs[0], dk=bufs[1], dv=bufs[2])
    assert all(g.data_ptr() == b.data_ptr() for g, b in zip((dq, dk, dv), bufs))
    got = [g[0].transpose(0, 1) for g in (dq, dk, dv)]  # back to (total, H, E)

    used = lambda lengths, used: torch.cat([torch.arange(n) < u for n, u in zip(lengths, used)])  # noqa: E731
    rows_q, rows_k = used(lens, used_q), used(lens, used_k)
    for g, rows in zip(got, (rows_q, rows_k, rows_k)):
        assert (g[~rows] == 0).all(), "past seqused: zero gradients"

    def reference(dtype):
        ts = [t[rows] for t, rows in zip(leaves(q, k, v, dtype=dtype), (rows_q, rows_k, rows_k))]
        ref_leaves = [t.detach().requires_grad_() for t in ts]
        out, _ = packed_reference(*ref_leaves, used_q, used_k, compute_dtype=dtype, causal=True)
        out.backward(dout[rows_q].to(out.dtype))
        return [t.grad for t in ref_leaves]

    for name, g, rows, r, lp in zip(("dq", "dk", "dv"), got, (rows_q, rows_k, rows_k), reference(torch.float64),
                                    reference(None)):
        assert_close_by_rule(g[rows], r, lp, factor=GRADIENT_FACTOR, what=name)


def test_dense_cache_with_seqused_k():
    """q dense, keys in a (B, S) cache of which sequence b uses its first seqused_k[b] (a
    KV-cache call without pages, left padding or batch indices): dq and the cache's dK/dV."""
    B, L, S, H, E = 2, 5, 40, 2, 32
    q = torch.randn(B, H, L, E, device=DEVICE, dtype=torch.float16)
    k = torch.randn(B, H, S, E, device=DEVICE, dtype=torch.float16)
    v = torch.randn(B, H, S, E, device=DEVICE, dtype=torch.float16)
    dout = torch.randn_like(q)
    used = [27, 5]
    seqs = Sequences(B, seqused_k=torch.tensor(used, dtype=torch.int32, device=DEVICE), max_seqlen_q=L, lower_right=True)
    out, lse = flash_attn_forward(q, k, v, scale=0.3, causal_bounds=(-1, 0), seqs=seqs)
    got = flash_attn_backward(dout, q, k, v, out, lse, scale=0.3, causal_bounds=(-1, 0), seqs=seqs,
                              dq=poisoned(q), dk=poisoned(k), dv=poisoned(v))[:3]
    for b, n in enumerate(used):
        def reference(dtype):
            ts = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q[b:b + 1], k[b:b + 1, :, :n],
                                                                               v[b:b + 1, :, :n])]
            out, _ = reference_attention(*ts, scale=0.3, causal=True, lower_right=True, compute_dtype=dtype)
            out.backward(dout[b:b + 1].to(out.dtype))
            return [t.grad for t in ts]

        for name, g, r, lp in zip(("dq", "dk", "dv"), (got[0][b:b + 1], got[1][b:b + 1, :, :n], got[2][b:b + 1, :, :n]),
                                  reference(torch.float64), reference(None)):
            assert_close_by_rule(g, r, lp, factor=GRADIENT_FACTOR, what=f"{name}[{b}]")
        assert (got[1][b, :, n:] == 0).all() and (got[2][b, :, n:] == 0).all()


def test_cache_layouts_have_no_backward():
    q = torch.randn(1, 2, 4, 32, device=DEVICE, dtype=torch.float16)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    seqs = Sequences(1, seqused_k=torch.tensor([4], dtype=torch.int32, device=DEVICE), block_table=table)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_backward(q, q, q, q, q, q[..., 0].float(), scale=0.2, seqs=seqs)


# --------------------------------------------------------------------------- dispatch, compile


def test_explain_picks_triton_for_varlen_training():
    lens = [3, 4]
    q = torch.randn(7, 2, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    decision = fastattn.explain_varlen(q, q, q, cu(lens), cu(lens), 4, 4, causal=True)
    assert decision.needs_grad and decision.features.layout == "varlen"
    assert decision.chosen == "triton", str(decision)
    assert decision.backward_reasons("triton") == ()
    assert "triton (forward and backward)" in str(decision)
    # Paged KV caches stay inference only: a call that needs grad goes to the fallback, which says why.
    from .test_varlen import paged

    k_cache, v_cache, table, _, _ = paged([20, 5], 16, 2, 32, torch.float16)
    decision = fastattn.explain_varlen(q, k_cache, v_cache, cu(lens), cu([20, 5]), 4, 20, block_table=table)
    assert decision.chosen == "sdpa"
    assert any("paged layout has no backward" in r for r in decision.backward_reasons("triton"))


def test_varlen_ops_pass_opcheck():
    from fastattn.ops.triton_varlen import triton_varlen_bwd, triton_varlen_fwd

    lens = [5, 0, 12]
    q = torch.randn(1, 2, 17, 32, device=DEVICE, dtype=torch.float16)
    sinks = torch.randn(2, device=DEVICE)
    index = (cu(lens), cu(lens), None, None)
    fwd_args = (q, q, q, None, sinks, *index, None, None, None, 3, 12, 12, 0.2, -1, 0, True, 0.0, 0)
    torch.library.opcheck(triton_varlen_fwd, tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor)
                                                   and t.is_floating_point() else t for t in fwd_args))
    out, lse = triton_varlen_fwd(*fwd_args)
    torch.library.opcheck(triton_varlen_bwd, (torch.randn_like(out), torch.randn_like(lse), q, q, q, out, lse, None,
                                              sinks, *index, 3, 12, 12, 0.2, -1, 0, True, 0.0))


def test_compiled_varlen_training_step():
    """A varlen training step compiles with fullgraph=True; the backward graph holds the varlen
    backward op, loss and gradients are eager's, bitwise (the same kernels run), and a batch
    with other lengths (the same token count) reuses both graphs."""
    lens = [5, 0, 12, 30]
    q, k, v = packed_inputs(lens, lens, 4, 2, 32, 32, torch.bfloat16)
    weights = torch.randn_like(q)

    def loss_of(q, k, v, cu_q):
        out = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_q, 30, 30, causal=True)
        return (out.float() * weights.float()).sum()

    def step(loss_fn, lengths):
        ts = leaves(q, k, v)
        loss = loss_fn(*ts, cu(lengths))
        loss.backward()
        return loss.detach(), [t.grad for t in ts]

    with fastattn.use_backend("triton"):
        graphs = []
        torch._dynamo.reset()
        compiled = torch.compile(loss_of, backend=_recording_aot_backend(graphs), fullgraph=True)
        for lengths in (lens, [30, 17, 0, 0]):
            want, want_grads = step(loss_of, lengths)
            got, got_grads = step(compiled, lengths)
            assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    assert len(graphs) == 2, "expected one forward and one backward graph, for both batches"
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.ops.fastattn.triton_varlen_fwd.default in targets
    assert torch.ops.fastattn.triton_varlen_bwd.default in targets
