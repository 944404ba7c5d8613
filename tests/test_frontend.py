"""The SDPA-compatible and flash-attn-compatible front ends: same results as torch
on everything torch accepts, clear errors for what it rejects."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.testing import assert_close_by_rule, assert_lse_close, reference_attention

from .conftest import DEVICE

# --------------------------------------------------------------------------- the fallback is torch itself

SDPA_CASES = {
    "4d": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8), v=(2, 3, 7, 8)),
    "3d": dict(q=(4, 5, 8), k=(4, 7, 8), v=(4, 7, 8)),
    "2d": dict(q=(5, 8), k=(7, 8), v=(7, 8)),
    "5d": dict(q=(2, 2, 3, 5, 8), k=(2, 2, 3, 7, 8), v=(2, 2, 3, 7, 8)),
    "value_dim": dict(q=(2, 3, 5, 8), k=(2, 3, 7, 8), v=(2, 3, 7, 12)),
    "batch_broadcast": dict(q=(2, 3, 5, 8), k=(1, 3, 7, 8), v=(1, 3, 7, 8)),
    "L1": dict(q=(2, 3, 1, 8), k=(2, 3, 9, 8), v=(2, 3, 9, 8)),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("is_causal", [False, True])
def test_fp32_matches_torch_exactly(case, is_causal):
    shapes = SDPA_CASES[case]
    q, k, v = (torch.randn(shapes[n]) for n in "qkv")
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 1, 7), (1, 3, 5, 7), (2, 3, 5, 7)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fp32_masks_match_torch(mask_shape, kind):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(mask_shape) > 0.4 if kind == "bool" else torch.randn(mask_shape)
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fp32_gqa_matches_torch():
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    got = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fully_masked_rows_are_zero_like_torch():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(got[:, :, 2], torch.zeros_like(got[:, :, 2]))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)


def test_empty_sequences_match_torch():
    q, k, v = torch.randn(2, 3, 0, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    assert fastattn.scaled_dot_product_attention(q, k, v).shape == (2, 3, 0, 8)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_gradients_fall_back_and_flow():
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    assert fastattn.explain(q, k, v).chosen == "sdpa"
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------- the kernel behind the SDPA front end


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", [None, "padding", "full_float"])
def test_sdpa_front_end_runs_the_kernel(dtype, mask):
    B, H, L, S, E = 2, 4, 19, 26, 40
    q = torch.randn(B, H, L, E, device=DEVICE, dtype=dtype)
    k, v = torch.randn(B, 2, S, E, device=DEVICE, dtype=dtype), torch.randn(B, 2, S, E, device=DEVICE, dtype=dtype)
    attn_mask = None
    if mask == "padding":
        attn_mask = (torch.arange(S, device=DEVICE) < torch.tensor([[S], [11]], device=DEVICE)).view(B, 1, 1, S)
    elif mask == "full_float":
        attn_mask = torch.randn(B, H, L, S, device=DEVICE, dtype=dtype)
    assert fastattn.explain(q, k, v, attn_mask=attn_mask, enable_gqa=True).reasons("triton") == ()
    with fastattn.use_backend("triton"):
        got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=attn_mask if attn_mask is None or attn_mask.dtype == torch.bool
                                          else attn_mask.float(), enable_gqa=True)
    ref_lowp, _ = reference_attention(q, k, v, mask=attn_mask, compute_dtype=None)
    assert got.shape == want.shape and got.dtype == dtype
    assert_close_by_rule(got, want, ref_lowp)


# --------------------------------------------------------------------------- flash-attn front end


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_flash_attn_func(dtype):
    B, L, S, H, Hk, E = 2, 23, 31, 4, 2, 32
    q = torch.randn(B, L, H, E, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(B, S, Hk, E, device=DEVICE, dtype=dtype) for _ in range(2))
    slopes = torch.rand(H, device=DEVICE)
    out, lse, probs = fastattn.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), softcap=3.0,
                                               alibi_slopes=slopes, return_attn_probs=True)
    assert out.shape == (B, L, H, E) and out.is_contiguous() and lse.shape == (B, H, L) and probs is None
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    features = dict(causal=True, lower_right=True, window=(6, -1), softcap=3.0, alibi_slopes=slopes)
    ref, ref_lse = reference_attention(t(q), t(k), t(v), **features)
    ref_lowp, _ = reference_attention(t(q), t(k), t(v), compute_dtype=None, **features)
    assert_close_by_rule(t(out), ref.float(), ref_lowp)
    assert_lse_close(lse, ref_lse)


def test_flash_attn_func_plain_call_returns_tensor():
    q = torch.randn(1, 5, 2, 16)
    out = fastattn.flash_attn_func(q, q, q)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 2, 16)


# --------------------------------------------------------------------------- errors

q4 = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731

BAD_SDPA_CALLS = {
    "not_a_tensor": (TypeError, lambda: ([[1.0]], q4(1, 2, 3, 4), q4(1, 2, 3, 4)), {}),
    "dtype_mismatch": (ValueError, lambda: (q4(1, 2, 3, 4, dtype=torch.float16), q4(1, 2, 3, 4), q4(1, 2, 3, 4)), {}),
    "head_dim_mismatch": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 3, 5), q4(1, 2, 3, 4)), {}),
    "kv_len_mismatch": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 3, 4), q4(1, 2, 5, 4)), {}),
    "heads_without_gqa": (ValueError, lambda: (q4(1, 4, 3, 4), q4(1, 2, 3, 4), q4(1, 2, 3, 4)), {}),
    "heads_not_divisible": (ValueError, lambda: (q4(1, 3, 3, 4), q4(1, 2, 3, 4), q4(1, 2, 3, 4)), {"enable_gqa": True}),
    "batch_mismatch": (ValueError, lambda: (q4(2, 2, 3, 4), q4(3, 2, 3, 4), q4(3, 2, 3, 4)), {}),
    "rank_1": (ValueError, lambda: (q4(4), q4(4), q4(4)), {}),
    "mask_not_broadcastable": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 5, 4), q4(1, 2, 5, 4)),
                               {"attn_mask": torch.ones(2, 5, dtype=torch.bool)}),
    "mask_int": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 5, 4), q4(1, 2, 5, 4)),
                 {"attn_mask": torch.ones(3, 5, dtype=torch.int32)}),
    "mask_1d": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 5, 4), q4(1, 2, 5, 4)),
                {"attn_mask": torch.ones(5, dtype=torch.bool)}),
    "mask_and_causal": (ValueError, lambda: (q4(1, 2, 3, 4), q4(1, 2, 5, 4), q4(1, 2, 5, 4)),
                        {"attn_mask": torch.ones(3, 5, dtype=torch.bool), "is_causal": True}),
}


@pytest.mark.parametrize("case", list(BAD_SDPA_CALLS))
def test_bad_sdpa_input_is_rejected_like_torch(case):
    exc, args, kwargs = BAD_SDPA_CALLS[case]
    args = args()
    with pytest.raises(exc) as info:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    assert len(str(info.value)) > 20  # a sentence a user can act on, not a bare code
    if case == "kv_len_mismatch":
        return  # torch's CPU path silently accepts this one; we refuse it
    if case == "mask_and_causal" and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 12):
        return  # older torch (2.11 seen) accepts both on the CPU; we refuse the ambiguity, as newer torch does
    with pytest.raises((RuntimeError, TypeError, ValueError, IndexError)):  # torch rejects the same call
        F.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("kwargs,exc", [
    ({"dropout_p": -0.1}, ValueError),
    ({"dropout_p": 1.5}, ValueError),
    ({"scale": float("nan")}, ValueError),
    ({"scale": "big"}, TypeError),
    ({"is_causal": 1}, TypeError),
])
def test_absurd_arguments(kwargs, exc):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(exc):
        fastattn.scaled_dot_product_attention(q, q, q, **kwargs)


@pytest.mark.parametrize("kwargs,exc,fragment", [
    ({"window_size": (-2, 0)}, ValueError, ">= -1"),
    ({"window_size": 3}, TypeError, "pair"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"alibi_slopes": torch.rand(3)}, ValueError, "nheads"),
    ({"alibi_slopes": torch.rand(4, dtype=torch.float64)}, ValueError, "float32"),
])
def test_bad_flash_input(kwargs, exc, fragment):
    q = torch.randn(1, 5, 4, 16, dtype=torch.float16)
    with pytest.raises(exc, match=fragment):
        fastattn.flash_attn_func(q, q, q, **kwargs)


def test_flash_input_must_be_4d():
    with pytest.raises(ValueError, match="4-d"):
        fastattn.flash_attn_func(torch.randn(5, 4, 16), torch.randn(5, 4, 16), torch.randn(5, 4, 16))


def test_validation_errors_are_also_runtime_errors():
    """Code that caught torch's RuntimeError keeps working after switching to fastattn."""
    with pytest.raises(RuntimeError):
        fastattn.scaled_dot_product_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4))


def test_query_heads_broadcast_and_numpy_scalars_like_torch():
    import numpy as np

    q, k, v = torch.randn(3, 1, 5, 8), torch.randn(3, 4, 7, 8), torch.randn(3, 4, 7, 8)
    got = fastattn.scaled_dot_product_attention(q, k, v, scale=np.float32(0.3), dropout_p=np.float64(0.0))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,exc", [
    ({"window": (-2, 0)}, ValueError),
    ({"softcap": -1.0}, ValueError),
    ({"softcap": float("inf")}, ValueError),
    ({"sinks": torch.zeros(3)}, ValueError),
    ({"sinks": [0.0, 0.0]}, TypeError),
])
def test_extras_are_validated(kwargs, exc):
    from fastattn.inputs import from_sdpa_args, with_extras

    q = torch.randn(1, 2, 4, 8)
    call, _ = from_sdpa_args(q, q, q)
    with pytest.raises(exc):
        with_extras(call, **kwargs)


@pytest.mark.parametrize("dtype,allowed", [(torch.float32, "dtype torch.float32;"),
                                           (torch.float16, "dtype torch.float16 or torch.float32;")])
def test_mask_dtype_error_names_each_allowed_dtype_once(dtype, allowed):
    q = torch.randn(1, 2, 3, 4, dtype=dtype)
    with pytest.raises(ValueError, match="attn_mask must be bool") as err:
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(3, 3, dtype=torch.float64))
    assert allowed in str(err.value) and "got torch.float64" in str(err.value)
