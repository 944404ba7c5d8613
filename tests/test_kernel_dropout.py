"""Attention dropout in the Triton forward kernel, and the forward and backward together.

The forward drops elements of the probabilities that multiply V with the Philox
keep-mask of fastattn/kernels/triton/dropout.py, element (b, h, i, j) of the
(B, Hq, L, S) scores whatever the kernel's tiling (packed GQA rows, split keys);
the backward regenerates the same mask. Every check here is against the mask
materialized by ``dropout_keep_mask``: the output's pattern of zeros with V = the
identity, the output against the fp64 reference applying that mask (flash-attn's
2x rule), and the gradients of forward + backward against fp64 autograd through
the same reference (3x rule). Under the interpreter the kernels use 16 x 16 blocks,
so these lengths cross several blocks, and L <= 16 with GQA takes the packed path.
"""
import pytest
import torch

from fastattn.kernels.triton.dropout import dropout_keep_mask
from fastattn.kernels.triton.flash_bwd import flash_attn_backward
from fastattn.kernels.triton.flash_fwd import Sequences, flash_attn_forward
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention, reference_gradients

from .conftest import DEVICE
from .test_kernel_bwd import kernel_kwargs, make, poisoned_like

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]

# (B, Hq, Hkv, L, S, E, launch options, features): each exercises one way the forward
# tiles the rows or the keys, which must not change which elements are dropped.
CASES = {
    "causal": (2, 2, 2, 45, 61, 32, {}, dict(causal=True)),
    "gqa_causal_lower_right": (1, 4, 2, 37, 50, 48, {}, dict(causal=True, lower_right=True)),
    "packed_gqa_decode": (2, 8, 2, 5, 70, 32, dict(pack_gqa=True), dict(causal=True, lower_right=True)),
    "split_kv_sinks": (1, 4, 1, 3, 83, 64, dict(num_splits=2), dict(sinks=True)),
    "packed_split_window": (1, 6, 2, 9, 77, 40, dict(pack_gqa=True, num_splits=2), dict(window=(40, 0),
                                                                                         lower_right=True)),
    "mask_softcap_alibi": (2, 2, 1, 30, 41, 32, {}, dict(mask=True, softcap=5.0, alibi_slopes=True)),
}


def features_for(features, B, Hq, L, S):
    """Draw the random parts of a case's features (sinks, mask, slopes) fresh for each run."""
    features = dict(features)
    if features.pop("sinks", False):
        features["sinks"] = torch.randn(Hq, device=DEVICE)
    if features.pop("mask", False):
        features["mask"] = torch.rand(B, 1, L, S, device=DEVICE) > 0.2
    if features.pop("alibi_slopes", False):
        features["alibi_slopes"] = torch.rand(B, Hq, device=DEVICE)
    return features


def forward(q, k, v, *, scale, p, seed, offset, launch=None, out=None, **features):
    kw = kernel_kwargs(q.shape[2], k.shape[2], **features)
    return flash_attn_forward(q, k, v, scale=scale, out=out, dropout_p=p, dropout_seed=seed, dropout_offset=offset,
                              **(launch or {}), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch", [{}, dict(pack_gqa=True, num_splits=2)], ids=["rows", "packed_split"])
def test_dropped_elements_are_the_mask(dtype, launch):
    """With V = the identity, out[b, h, i, j] = P[i, j] * keep[i, j] / (1 - p): the output's
    nonzero pattern is the kernel's keep-mask, element for element, and equals the
    materialized one; the kept fraction is within 1% of 1 - p."""
    B, Hq, Hkv, S, p = 2, 4, 2, 64, 0.3
    L = 16 if launch else 128  # the packed path serves short queries
    q = (0.3 * torch.randn(B, Hq, L, 32, device=DEVICE)).to(dtype)  # P well above the dtype's underflow
    k = torch.randn(B, Hkv, S, 32, device=DEVICE, dtype=dtype)
    v = torch.eye(S, device=DEVICE, dtype=dtype).expand(B, Hkv, S, S)
    seed, offset = 20261201, 5 * B * Hq * L * S
    out, _ = forward(q, k, v, scale=32 ** -0.5, p=p, seed=seed, offset=offset, launch=launch)
    kept = out != 0
    assert torch.equal(kept, dropout_keep_mask(B, Hq, L, S, dropout_p=p, seed=seed, offset=offset, device=DEVICE))
    if not launch:  # 65536 elements: the fraction's standard deviation is 0.0018
        assert abs(kept.float().mean().item() - (1 - p)) <= 0.01 * (1 - p)
    undropped, _ = forward(q, k, v, scale=32 ** -0.5, p=0.0, seed=seed, offset=offset, launch=launch)
    assert (undropped != 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_seed_and_offset_reproduce(dtype):
    """The same seed and offset give the same output bitwise (and the lse, which dropout
    does not touch, is the undropped one); another seed or the next call's offset
    (advanced by B * Hq * L * S) drops other elements."""
    B, Hq, Hkv, L, S, E = 1, 4, 2, 33, 47, 32
    q, k, v, _ = make(B, Hq, Hkv, L, S, E, dtype=dtype)
    run = dict(q=q, k=k, v=v, scale=E ** -0.5, p=0.2, causal=True)
    out, lse = forward(**run, seed=7, offset=0)
    again, lse_again = forward(**run, seed=7, offset=0)
    assert torch.equal(out, again) and torch.equal(lse, lse_again)
    _, lse_undropped = forward(**{**run, "p": 0.0}, seed=7, offset=0)
    assert torch.equal(lse, lse_undropped)
    assert not torch.equal(out, forward(**run, seed=8, offset=0)[0])
    assert not torch.equal(out, forward(**run, seed=7, offset=B * Hq * L * S)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_reference_with_the_mask(dtype, case):
    """The dropped output against fp64 attention applying the materialized mask, by
    flash-attn's rule (2x the error of the same math in the input dtype), written into a
    NaN-poisoned buffer; the lse is bitwise the undropped call's (dropout leaves it alone)."""
    B, Hq, Hkv, L, S, E, launch, features = CASES[case]
    features = features_for(features, B, Hq, L, S)
    q, k, v, _ = make(B, Hq, Hkv, L, S, E, dtype=dtype)
    p, seed, offset = 0.17, 1234, 99
    scale = E ** -0.5
    out, lse = forward(q, k, v, scale=scale, p=p, seed=seed, offset=offset, launch=launch,
                       out=poisoned_like(torch.empty(B, Hq, L, E, device=DEVICE, dtype=dtype)), **features)
    keep = dropout_keep_mask(B, Hq, L, S, dropout_p=p, seed=seed, offset=offset, device=DEVICE)
    dropped = dict(dropout_keep=keep, dropout_p=p)
    ref, _ = reference_attention(q, k, v, scale=scale, **dropped, **features)
    ref_lowp, _ = reference_attention(q, k, v, scale=scale, compute_dtype=None, **dropped, **features)
    assert_close_by_rule(out, ref, ref_lowp)
    _, undropped_lse = forward(q, k, v, scale=scale, p=0.0, seed=seed, offset=offset, launch=launch, **features)
    assert torch.equal(lse, undropped_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["gqa_causal_lower_right", "packed_gqa_decode", "split_kv_sinks",
                                  "mask_softcap_alibi"])
def test_forward_then_backward_match_reference_gradients(dtype, case):
    """Training with dropout on the kernels: the forward's dropped output and the backward's
    regenerated mask give dq, dk, dv (and d_sinks) within 3x of the same math in the
    input dtype, against fp64 autograd through the reference with the materialized mask."""
    B, Hq, Hkv, L, S, E, launch, features = CASES[case]
    features = features_for(features, B, Hq, L, S)
    q, k, v, do = make(B, Hq, Hkv, L, S, E, dtype=dtype)
    p, seed, offset = 0.25, 31, 2 * B * Hq * L * S
    scale = E ** -0.5
    drop = dict(dropout_p=p, dropout_seed=seed, dropout_offset=offset)
    kw = kernel_kwargs(L, S, **features)
    out, lse = flash_attn_forward(q, k, v, scale=scale, **launch, **drop, **kw)
    grads = flash_attn_backward(do, q, k, v, out, lse, scale=scale, **drop, **kw,
                                dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v))
    keep = dropout_keep_mask(B, Hq, L, S, dropout_p=p, seed=seed, offset=offset, device=DEVICE)
    dropped = dict(dropout_keep=keep, dropout_p=p)
    ref = reference_gradients(q, k, v, do, scale=scale, **dropped, **features)
    ref_lowp = reference_gradients(q, k, v, do, scale=scale, compute_dtype=None, **dropped, **features)
    for name, got, r, r_lowp in zip(("dq", "dk", "dv", "dsinks"), grads, ref, ref_lowp):
        if r is None:
            assert got is None, f"{name}: returned without sinks"
            continue
        assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=name)


def test_bad_dropout_arguments_are_refused():
    """dropout_p outside [0, 1), and dropout with a per-sequence layout, raise ValueError."""
    q, k, v, _ = make(1, 2, 2, 8, 8, 16)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            flash_attn_forward(q, k, v, scale=0.25, dropout_p=p)
    # Packed tokens have no position in the (B, Hq, L, S) numbering the backward uses.
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="per-sequence"):
        flash_attn_forward(q, k, v, scale=0.25, dropout_p=0.1,
                           seqs=Sequences(num_seqs=2, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5))
