"""Training through the public front ends: gradients against an fp64 reference.

Each case makes fresh leaves, runs a front end forced onto a backend (so a refusal
fails instead of falling back), backpropagates a random dO (non-contiguous on
purpose), and holds dq, dk, dv and d_sinks to flash-attn's gradient rule:
max |g - g_ref| <= 3 x max |g_pt - g_ref| + a tiny floor, where g_ref comes from
fp64 math and g_pt from the same math in the input dtype. For the triton backend
the backward must be the kernel's (the custom op's registered backward), never
torch's autograd through something else.
"""
import pytest
import torch

import fastattn
from fastattn.functional import attention
from fastattn.inputs import from_sdpa_args, with_extras
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention

from .conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


def leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def dout_like(out):
    """A random dO with the output's shape but not its strides."""
    return torch.randn(out.shape[::-1], device=out.device, dtype=out.dtype).permute(*range(out.dim() - 1, -1, -1))


def autograd_graph_has(out, op_name: str) -> bool:
    """The output's autograd graph holds a node of the custom op ``op_name`` (e.g.
    "fastattn_triton_fwd", whose registered backward is the kernel's)."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if op_name in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def backward_ran_on_triton(out) -> bool:
    return autograd_graph_has(out, "fastattn_triton_fwd")


def check_grads(run, reference, tensors, *, backend="triton", names=("q", "k", "v", "sinks")):
    """``run(*leaves)`` returns the output, ``reference(*leaves, compute_dtype=...)`` the output
    and the lse; the gradients of every leaf that is not None are compared by the rule."""
    got_leaves = leaves(*tensors)
    with fastattn.use_backend(backend):
        out = run(*got_leaves)
    if backend == "triton":
        assert backward_ran_on_triton(out), "the triton backend's output is not differentiated by its own backward"
    dout = dout_like(out)
    out.backward(dout)
    ref_leaves = leaves(*tensors, dtype=torch.float64)
    reference(*ref_leaves, compute_dtype=torch.float64)[0].backward(dout.double())
    lowp_leaves = leaves(*tensors)
    lowp_out, lowp_lse = reference(*lowp_leaves, compute_dtype=None)
    lowp_out.backward(dout)
    lowp_grads = [None if t is None else t.grad for t in lowp_leaves]
    if len(tensors) > 3 and tensors[3] is not None:
        lowp_grads[3] = sinks_grad_from_stored_output(lowp_leaves[3], lowp_out, dout, lowp_lse)
    for name, got, ref, lowp in zip(names, got_leaves, ref_leaves, lowp_grads):
        if got is None:
            continue
        assert got.grad is not None, f"d{name}: no gradient"
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, f"d{name}: {got.grad.dtype} {got.grad.shape}"
        assert torch.isfinite(got.grad).all(), f"d{name}: not finite"
        assert_close_by_rule(got.grad, ref.grad, lowp, factor=GRADIENT_FACTOR, what=f"d{name}")
    return out


def sinks_grad_from_stored_output(sinks, out, dout, lse):
    """d_sinks as the same math in the input dtype does it: a sink is a logit without a value,
    so d_sink[h] = -sum over rows of p_sink * rowsum(dO * O), and O is the output *stored in
    the input dtype* (every flash backward reads it so). Autograd through the reference instead
    sums p * dP from fp32 probabilities, which never rounds O: its error leaves out the one
    rounding that dominates d_sinks (in bf16 about 1% of it, a random walk over the rows)."""
    delta = (dout.float() * out.detach().float()).sum(-1)  # (B, H, L): (B, H, L, Ev) layout
    p_sink = torch.exp(sinks.detach().float().view(1, -1, 1) - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def bhld(x):
    return x.transpose(1, 2)


# --------------------------------------------------------------------------- flash_attn_func


FLASH_CASES = {  # (B, L, S, Hq, Hkv, E, Ev) and flash_attn_func keywords
    "hd59_causal_gqa": ((1, 113, 203, 4, 2, 59, 59), dict(causal=True)),
    "hd111_causal_L_gt_S": ((1, 203, 113, 2, 2, 111, 111), dict(causal=True)),  # first rows see no key
    "decode_mqa": ((2, 1, 239, 8, 1, 64, 64), dict(causal=True)),
    "square_hd128": ((1, 128, 128, 2, 2, 128, 128), dict()),
    "long_keys": ((1, 3, 799, 2, 1, 64, 64), dict(window_size=(300, 0))),
    "hd256_window": ((1, 40, 57, 2, 2, 256, 256), dict(window_size=(8, 2))),
    "ev_differs_softcap": ((2, 33, 50, 4, 2, 64, 40), dict(causal=True, softcap=4.0)),
    "alibi_per_batch": ((2, 40, 57, 4, 2, 64, 64), dict(causal=True, alibi="per_batch")),
    "everything": ((2, 50, 66, 4, 1, 80, 48), dict(window_size=(20, 2), softcap=4.0, alibi="per_head",
                                                   softmax_scale=0.2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attn_func_gradients(dtype, case):
    (B, L, S, Hq, Hkv, E, Ev), kw = FLASH_CASES[case]
    kw = dict(kw)
    q = torch.randn(B, L, Hq, E, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hkv, E, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, Hkv, Ev, device=DEVICE, dtype=dtype)
    alibi = kw.pop("alibi", None)
    slopes = None if alibi is None else torch.rand(B if alibi == "per_batch" else 1, Hq, device=DEVICE)
    if alibi == "per_head":
        slopes = slopes[0]
    scale = kw.get("softmax_scale")
    ref_kw = dict(scale=scale, causal=kw.get("causal", False), lower_right=True,
                  window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0), alibi_slopes=slopes)

    def run(q, k, v):
        return fastattn.flash_attn_func(q, k, v, alibi_slopes=slopes, **kw)

    def reference(q, k, v, compute_dtype):
        out, lse = reference_attention(bhld(q), bhld(k), bhld(v), compute_dtype=compute_dtype, **ref_kw)
        return bhld(out), lse

    out = check_grads(run, reference, (q, k, v))
    if case == "hd111_causal_L_gt_S":
        assert torch.count_nonzero(out[:, :L - S]) == 0


# --------------------------------------------------------------------------- the SDPA front end and sinks


def _mask(kind, B, H, L, S):
    dims = {"bool_B11S": (B, 1, 1, S), "bool_BHLS": (B, H, L, S), "additive_11LS": (1, 1, L, S),
            "additive_1HL1": (1, H, L, 1)}[kind]
    if kind.startswith("bool"):
        mask = torch.rand(dims, device=DEVICE) > 0.3
        if kind == "bool_BHLS":
            mask[:, :, ::7] = False  # rows that see no key
        return mask
    mask = torch.randn(dims, device=DEVICE)
    return mask.masked_fill(torch.rand(dims, device=DEVICE) < 0.2, float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask_kind", ["bool_B11S", "bool_BHLS", "additive_11LS", "additive_1HL1"])
def test_sdpa_gradients_with_masks(dtype, mask_kind):
    B, H, Hkv, L, S, E = 2, 4, 2, 29, 47, 64
    q = torch.randn(B, L, H, E, device=DEVICE, dtype=dtype).transpose(1, 2)  # as models pass it
    k = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=dtype)
    mask = _mask(mask_kind, B, H, L, S)
    if mask.dtype != torch.bool:
        mask = mask.to(dtype)

    def run(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def reference(q, k, v, compute_dtype):
        return reference_attention(q, k, v, mask=mask, compute_dtype=compute_dtype)

    check_grads(run, reference, (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sinks_dtype", [torch.float32, "input"])
def test_sinks_have_their_own_gradient(dtype, sinks_dtype):
    """GPT-OSS: one trainable logit per head joins each row's softmax; d_sinks by the rule."""
    B, H, Hkv, L, S, E = 2, 4, 2, 33, 41, 64
    q = torch.randn(B, H, L, E, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=dtype)
    sinks = (torch.randn(H, device=DEVICE) * 2).to(dtype if sinks_dtype == "input" else torch.float32)

    def run(q, k, v, sinks):
        call, _ = from_sdpa_args(q, k, v, enable_gqa=True)
        return attention(with_extras(call, causal=True, window=(9, 0), sinks=sinks))[0]

    def reference(q, k, v, sinks, compute_dtype):
        return reference_attention(q, k, v, causal=True, window=(9, 0), sinks=sinks, compute_dtype=compute_dtype)

    check_grads(run, reference, (q, k, v, sinks))


# --------------------------------------------------------------------------- rows that see no key, every path


@pytest.mark.parametrize("path", ["triton", "sdpa_math_alibi", "sdpa_math_softcap", "sdpa_torch_mask"])
def test_rows_with_no_key_give_zero_and_finite_gradients(path):
    """The issue's repro: flash_attn_func(causal=True, alibi_slopes=..., return_attn_probs=True)
    with seqlen_q > seqlen_k and inputs that require grad gave NaN in dq and dk on the fp32
    math fallback (logsumexp over an all -inf row; ALiBi or softcap carried it into q, k)."""
    B, L, S, H = 1, 12, 5, 2  # the first L - S = 7 query rows see no key (bottom-right causal)
    dtype = torch.float16 if path == "triton" else torch.float32
    q = torch.randn(B, L, H, 16, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, H, 16, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, H, 16, device=DEVICE, dtype=dtype)
    slopes = torch.rand(H, device=DEVICE)
    backend = "triton" if path == "triton" else "sdpa"
    if path == "sdpa_torch_mask":  # torch's own SDPA (no lse asked): a bool mask with empty rows
        mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L)

        def run(q, k, v):
            return bhld(fastattn.scaled_dot_product_attention(bhld(q), bhld(k), bhld(v), attn_mask=mask))

        ref_kw = dict(mask=mask)
    else:
        kw = dict(causal=True, alibi_slopes=slopes) if path != "sdpa_math_softcap" else dict(causal=True, softcap=2.0)

        def run(q, k, v):
            out, lse, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
            assert torch.isinf(lse[:, :, :L - S]).all() and torch.isfinite(lse[:, :, L - S:]).all()
            return out

        ref_kw = dict(causal=True, lower_right=True, alibi_slopes=kw.get("alibi_slopes"),
                      softcap=kw.get("softcap", 0.0))

    def reference(q, k, v, compute_dtype):
        out, lse = reference_attention(bhld(q), bhld(k), bhld(v), compute_dtype=compute_dtype, **ref_kw)
        return bhld(out), lse

    got = leaves(q, k, v)
    with fastattn.use_backend(backend):
        out = run(*got)
    out.backward(dout_like(out))
    assert torch.count_nonzero(out[:, :L - S]) == 0
    for name, t in zip("qkv", got):
        assert torch.isfinite(t.grad).all(), f"d{name} is not finite on the {path} path"
    assert torch.count_nonzero(got[0].grad[:, :L - S]) == 0, "rows that see no key must get a zero dq"
    check_grads(run, reference, (q, k, v), backend=backend)


# --------------------------------------------------------------------------- what the kernel's backward leaves to the fallback


def test_trainable_alibi_slopes_and_bias_get_their_gradients_from_the_fallback():
    """The triton backward gives ALiBi slopes and masks no gradient: such calls run on
    the fallback (explain says why), and their gradients match the fp64 reference."""
    B, L, H, E = 1, 9, 2, 16
    q = torch.randn(B, L, H, E, device=DEVICE, dtype=torch.float16, requires_grad=True)
    slopes = torch.rand(H, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, H, L, L, device=DEVICE, dtype=torch.float16, requires_grad=True)
    assert fastattn.explain_flash(q, q, q, alibi_slopes=slopes).chosen == "sdpa"
    out = fastattn.flash_attn_func(q, q, q, alibi_slopes=slopes)
    dout = dout_like(out).double()
    (out.double() * dout).sum().backward()
    ref_q, ref_slopes = q.detach().double().requires_grad_(), slopes.detach().double().requires_grad_()
    ref, _ = reference_attention(bhld(ref_q), bhld(ref_q), bhld(ref_q), alibi_slopes=ref_slopes, lower_right=True)
    (bhld(ref) * dout).sum().backward()
    torch.testing.assert_close(slopes.grad.double(), ref_slopes.grad, atol=2e-3, rtol=2e-3)

    x = bhld(q.detach()).requires_grad_()
    assert fastattn.explain(x, x, x, attn_mask=bias).chosen == "sdpa"
    out = fastattn.scaled_dot_product_attention(x, x, x, attn_mask=bias)
    out.backward(torch.ones_like(out))
    ref_x, ref_bias = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref, _ = reference_attention(ref_x, ref_x, ref_x, mask=ref_bias)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(bias.grad.double(), ref_bias.grad, atol=2e-3, rtol=2e-3)


def test_no_grad_calls_keep_no_graph():
    q = torch.randn(1, 2, 8, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        out = fastattn.scaled_dot_product_attention(q, q, q)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("uses", ["lse", "out_and_lse"])
def test_the_lse_has_its_gradient(backend, uses):
    """flash_attn_func(return_attn_probs=True)'s lse is differentiable on every backend (a
    loss on it, e.g. a z-loss, trains q and k), alone or beside the output."""
    B, L, S, H, E = 2, 21, 34, 2, 32
    q, k, v = (torch.randn(B, n, H, E, device=DEVICE, dtype=torch.float16) for n in (L, S, S))
    dlse = torch.randn(B, H, L, device=DEVICE)
    got = leaves(q, k, v)
    with fastattn.use_backend(backend):
        out, lse, _ = fastattn.flash_attn_func(*got, causal=True, return_attn_probs=True)
    dout = dout_like(out) if uses == "out_and_lse" else None
    torch.autograd.backward([lse] + ([out] if dout is not None else []), [dlse] + ([dout] if dout is not None else []))

    def grads(compute_dtype):
        ref = leaves(q, k, v, dtype=compute_dtype or q.dtype)
        o, lse_ref = reference_attention(*map(bhld, ref), causal=True, lower_right=True, compute_dtype=compute_dtype)
        outputs, output_grads = [lse_ref], [dlse.to(lse_ref.dtype)]
        if dout is not None:
            outputs.append(bhld(o))
            output_grads.append(dout.to(o.dtype))
        torch.autograd.backward(outputs, output_grads)
        return [t.grad for t in ref]

    for name, g, ref, lowp in zip("qkv", got, grads(torch.float64), grads(None)):
        if uses == "lse" and name == "v":
            assert g.grad is None or torch.count_nonzero(g.grad) == 0
            continue
        assert_close_by_rule(g.grad, ref, lowp, factor=GRADIENT_FACTOR, what=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gradients_are_bitwise_reproducible(dtype):
    """GQA (dk/dv summed over each group) and sinks: two runs give identical bits."""
    q = torch.randn(2, 37, 8, 64, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(2, 45, 2, 64, device=DEVICE, dtype=dtype) for _ in range(2))
    sinks = torch.randn(8, device=DEVICE)
    dout = torch.randn(2, 8, 37, 64, device=DEVICE, dtype=dtype)

    def grads():
        got = leaves(bhld(q), bhld(k), bhld(v), sinks)
        call, _ = from_sdpa_args(*got[:3], enable_gqa=True)
        with fastattn.use_backend("triton"):
            out, _ = attention(with_extras(call, causal=True, sinks=got[3]))
        out.backward(dout)
        return [t.grad for t in got]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["fused_qkv", "expanded_batch"])
def test_gradients_of_strided_inputs(layout):
    """Heads sliced out of a fused qkv projection, and one K/V shared by the batch (stride 0):
    each gradient comes back in its input's shape, and autograd sums the broadcast."""
    B, H, L, E = 2, 2, 31, 64
    if layout == "fused_qkv":
        qkv = torch.randn(B, L, 3, H, E, device=DEVICE, dtype=torch.float16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn(B, H, L, E, device=DEVICE, dtype=torch.float16)
        k, v = (torch.randn(1, H, 43, E, device=DEVICE, dtype=torch.float16) for _ in range(2))

    def run(q, k, v):
        if layout == "expanded_batch":
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    def reference(q, k, v, compute_dtype):
        if layout == "expanded_batch":
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        return reference_attention(q, k, v, causal=True, compute_dtype=compute_dtype)

    check_grads(run, reference, (q, k, v))


# --------------------------------------------------------------------------- dropout on the kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("front", ["sdpa", "flash"])
def test_dropout_trains_on_the_kernel_with_its_own_keep_mask(front, dtype):
    """The front ends run dropout on the kernel, forward and backward, with one keep-mask drawn
    per call from torch's generator: out and gradients match the fp64 reference given that mask."""
    from fastattn.kernels.triton.dropout import dropout_keep_mask
    from fastattn.ops.triton_fwd import dropout_seed

    B, Hq, Hkv, L, S, E, p = 2, 4, 2, 37, 45, 32, 0.3
    q = torch.randn(B, Hq, L, E, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, E, device=DEVICE, dtype=dtype) for _ in range(2))
    torch.manual_seed(123)
    keep = dropout_keep_mask(B, Hq, L, S, dropout_p=p, seed=int(dropout_seed()[0]), device=DEVICE)

    def run(q, k, v, seed=123):
        torch.manual_seed(seed)  # 123: the call draws the seed the mask above was made from
        if front == "sdpa":
            return fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        return bhld(fastattn.flash_attn_func(bhld(q), bhld(k), bhld(v), dropout_p=p, causal=True))

    def reference(q, k, v, compute_dtype):
        lower_right = front == "flash"
        return reference_attention(q, k, v, causal=True, lower_right=lower_right, dropout_keep=keep, dropout_p=p,
                                   compute_dtype=compute_dtype)

    out = check_grads(run, reference, (q, k, v))
    ref, _ = reference(q, k, v, torch.float64)
    lowp, _ = reference(q, k, v, None)
    assert_close_by_rule(out.detach(), ref.float(), lowp)
    with fastattn.use_backend("triton"):
        assert not torch.equal(run(q, k, v, seed=124), out), "another seed should drop other elements"
