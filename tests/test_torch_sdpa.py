"""fastattn behind torch's flash SDPA ops (fastattn/torch_sdpa.py): the registration, activate and
restore, the op implementations' signatures against the ops' schemas, and the implementations
called directly (CPU tensors, the Triton interpreter) against the fp64 reference, returning what
the ops' schemas say in the layouts torch's kernel returns. On a GPU: torch's own SDPA with the
flash backend forced runs fastattn's kernels."""
import inspect
import subprocess
import sys

import pytest
import torch

from fastattn import torch_sdpa
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention, reference_gradients

from .conftest import DEVICE

attention = torch.nn.attention
pytestmark = pytest.mark.skipif(torch_sdpa.missing() is not None, reason=str(torch_sdpa.missing()))

IMPLS = {
    "_scaled_dot_product_flash_attention": torch_sdpa.sdpa_flash_forward,
    "_scaled_dot_product_flash_attention_backward": torch_sdpa.sdpa_flash_backward,
    "_flash_attention_forward": torch_sdpa.flash_attention_forward,
    "_flash_attention_backward": torch_sdpa.flash_attention_backward,
}
KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _kernel(name):
    return torch.library.get_kernel(getattr(torch.ops.aten, name).default, "CUDA")


def test_registered_on_import_and_not_active():
    code = ("import torch, fastattn.torch_sdpa; a = torch.nn.attention; "
            "print('fastattn' in a.list_flash_attention_impls(), a.current_flash_attention_impl())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "None"]


def test_activate_overrides_the_ops_and_restore_puts_torch_back():
    before = {name: repr(_kernel(name)) for name in IMPLS}
    assert all("torch_sdpa" not in k for k in before.values()), before
    attention.activate_flash_attention_impl("fastattn")
    try:
        assert attention.current_flash_attention_impl() == "fastattn"
        for name in IMPLS:
            assert "fastattn/torch_sdpa.py" in repr(_kernel(name)), name
            assert repr(torch_sdpa._original[name]) == before[name], name  # torch's kernel, kept for fallbacks
        # Left to torch: the in-place forward.
        assert "torch_sdpa" not in repr(_kernel("_flash_attention_forward_no_dropout_inplace"))
        attention.activate_flash_attention_impl("fastattn")  # again: torch's kernels are still the fallbacks
        assert all(repr(torch_sdpa._original[n]) == before[n] for n in IMPLS)
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
    assert {name: repr(_kernel(name)) for name in IMPLS} == before
    assert torch_sdpa._original == {}


@pytest.mark.parametrize("name", list(IMPLS))
def test_impls_take_the_ops_schema(name):
    schema = getattr(torch.ops.aten, name).default._schema
    params = list(inspect.signature(IMPLS[name]).parameters.values())
    assert params[0].name == "keyset"
    params = params[1:]
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        assert (p.kind == p.KEYWORD_ONLY) == a.kwarg_only, p.name
        if a.has_default_value():
            assert p.default == a.default_value, (p.name, p.default, a.default_value)


def _inputs(dtype, b, hq, hkv, l, s, e):
    q = torch.randn(b, hq, l, e, dtype=dtype, device=DEVICE)
    k = torch.randn(b, hkv, s, e, dtype=dtype, device=DEVICE)
    v = torch.randn(b, hkv, s, e, dtype=dtype, device=DEVICE)
    do = torch.randn(b, hq, l, e, dtype=dtype, device=DEVICE)
    return q, k, v, do


CASES = [  # dtype, causal, (B, Hq, Hkv, L, S, E)
    (torch.float16, False, (2, 2, 2, 37, 37, 32)),
    (torch.bfloat16, True, (1, 4, 2, 45, 45, 16)),
    (torch.float16, True, (1, 2, 1, 19, 40, 64)),  # L != S: the diagonal bottom-right, as torch's kernel has it
]


@pytest.mark.parametrize("dtype,causal,shape", CASES)
def test_sdpa_flash_ops_direct(dtype, causal, shape):
    b, hq, hkv, l, s, e = shape
    q, k, v, do = _inputs(dtype, b, hq, hkv, l, s, e)
    res = torch_sdpa.sdpa_flash_forward(KEYSET, q, k, v, 0.0, causal, False)
    assert len(res) == len(torch.ops.aten._scaled_dot_product_flash_attention.default._schema.returns)
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, debug = res
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == q.stride()
    assert lse.shape == (b, hq, l) and lse.dtype == torch.float32
    assert cum_q is None and cum_k is None and (max_q, max_k) == (l, s)
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,) and unused.dtype == torch.uint64
    assert debug.numel() == 0
    lr = dict(causal=causal, lower_right=True)
    ref, ref_lse = reference_attention(q, k, v, **lr)
    ref_lowp, _ = reference_attention(q, k, v, compute_dtype=None, **lr)
    assert_close_by_rule(out, ref, ref_lowp)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)

    grads = torch_sdpa.sdpa_flash_backward(KEYSET, do, q, k, v, out, lse, None, None, l, s, 0.0, causal,
                                           rng_state, unused)
    ref_g = reference_gradients(q, k, v, do, **lr)
    ref_g_lowp = reference_gradients(q, k, v, do, compute_dtype=None, **lr)
    for n, got, like, r, r_lowp in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_g, ref_g_lowp):
        assert got.shape == like.shape and got.dtype == like.dtype, n
        assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=n)


@pytest.mark.parametrize("window", [(None, None), (5, 0)])
def test_flash_attention_ops_direct(window):
    """flash-attn layout (B, L, H, E); window sizes as torch passes them (None = unbounded)."""
    dtype, (b, hq, hkv, l, s, e) = torch.bfloat16, (1, 2, 1, 33, 33, 32)
    q, k, v, do = (t.transpose(1, 2).contiguous() for t in _inputs(dtype, b, hq, hkv, l, s, e))
    left, right = window
    causal = right == 0
    res = torch_sdpa.flash_attention_forward(KEYSET, q, k, v, None, None, l, s, 0.0, causal, False,
                                             window_size_left=left, window_size_right=None if causal else right)
    assert len(res) == len(torch.ops.aten._flash_attention_forward.default._schema.returns)
    out, lse, rng_state, unused, debug = res
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, hq, l)
    t = [x.transpose(1, 2) for x in (q, k, v, do)]
    kw = dict(causal=causal, lower_right=True, window=(-1 if left is None else left, -1))
    ref, ref_lse = reference_attention(*t[:3], **kw)
    ref_lowp, _ = reference_attention(*t[:3], compute_dtype=None, **kw)
    assert_close_by_rule(out.transpose(1, 2), ref, ref_lowp)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    grads = torch_sdpa.flash_attention_backward(KEYSET, do, q, k, v, out, lse, None, None, l, s, 0.0, causal,
                                                rng_state, unused, window_size_left=left, window_size_right=None)
    ref_g = reference_gradients(*t, **kw)
    ref_g_lowp = reference_gradients(*t, compute_dtype=None, **kw)
    for n, got, like, r, r_lowp in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_g, ref_g_lowp):
        assert got.shape == like.shape and got.dtype == like.dtype, n
        assert_close_by_rule(got.transpose(1, 2), r, r_lowp, factor=GRADIENT_FACTOR, what=n)


def test_calls_fastattn_cannot_run_go_to_torchs_kernel(monkeypatch):
    handed = []

    class TorchKernel:
        def call_boxed(self, keyset, *args, **kwargs):
            handed.append((keyset, args, kwargs))
            return "torch's result"

    monkeypatch.setattr(torch_sdpa, "_original", {n: TorchKernel() for n in IMPLS})
    q, k, v, _ = _inputs(torch.float16, 1, 2, 2, 8, 8, 16)
    assert torch_sdpa.sdpa_flash_forward(KEYSET, q, k, v, 0.1, True, False, scale=0.3) == "torch's result"
    assert handed[-1] == (KEYSET, (q, k, v, 0.1, True, False), dict(scale=0.3))
    assert torch_sdpa.sdpa_flash_forward(KEYSET, q.float(), k.float(), v.float()) == "torch's result"
    fl = [t.transpose(1, 2) for t in (q, k, v)]
    cu = torch.tensor([0, 8], dtype=torch.int32)
    assert torch_sdpa.flash_attention_forward(KEYSET, *fl, cu, cu, 8, 8, 0.0, False, False) == "torch's result"
    assert handed[-1][1][3] is cu
    slopes = torch.ones(2)
    assert torch_sdpa.flash_attention_forward(KEYSET, *fl, None, None, 8, 8, 0.0, False, False,
                                              alibi_slopes=slopes) == "torch's result"
    assert handed[-1][2]["alibi_slopes"] is slopes
    assert len(handed) == 4


def test_reasons_name_the_value():
    q = torch.randn(1, 2, 8, 320, dtype=torch.float16)
    assert torch_sdpa._reasons(q, q, q, dropout_p=0.25) == ["head_dim=320 (supported: <= 256)", "dropout_p=0.25"]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_torch_sdpa_flash_backend_runs_fastattn(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, do = (t.requires_grad_() for t in _inputs(torch.float16, 2, 4, 4, 300, 300, 64))
    attention.activate_flash_attention_impl("fastattn")
    try:
        torch_sdpa.counts.clear()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            out.backward(do.detach())
        ran = dict(torch_sdpa.counts)
    finally:
        attention.restore_flash_attention_impl()
    assert ran == {("_scaled_dot_product_flash_attention", "fastattn"): 1,
                   ("_scaled_dot_product_flash_attention_backward", "fastattn"): 1}, ran
    ref, _ = reference_attention(q.detach(), k.detach(), v.detach(), causal=causal)
    ref_lowp, _ = reference_attention(q.detach(), k.detach(), v.detach(), causal=causal, compute_dtype=None)
    assert_close_by_rule(out.detach(), ref, ref_lowp)
    ref_g = reference_gradients(q, k, v, do, causal=causal)
    ref_g_lowp = reference_gradients(q, k, v, do, causal=causal, compute_dtype=None)
    for n, got, r, r_lowp in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_g, ref_g_lowp):
        assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=n)
    # Restored: torch's own kernel runs again, and fastattn's counts stay as they were.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=causal)
    assert dict(torch_sdpa.counts) == ran
