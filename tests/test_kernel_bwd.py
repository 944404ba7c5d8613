"""The Triton backward kernel, called directly after the forward.

Each case draws fresh random inputs, runs flash_attn_forward then
flash_attn_backward into NaN-poisoned gradient buffers, and holds dq, dk, dv
(and d_sinks) to flash-attn's gradient rule against fp64 autograd through
fastattn.testing.reference_attention: error <= 3 x (error of the same math in
the input dtype) + a tiny floor. Under the interpreter the kernels use 16 x 16
blocks, so these lengths cross several blocks and every edge run executes.
"""
import pytest
import torch

from fastattn.kernels.triton.dropout import dropout_keep_mask
from fastattn.kernels.triton.flash_bwd import flash_attn_backward
from fastattn.kernels.triton.flash_fwd import flash_attn_forward
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention, reference_gradients

from .conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


def make(B, Hq, Hkv, L, S, E, Ev=None, dtype=torch.float16, layout="bhld"):
    """Random q, k, v, do in (B, H, L, E) shape; layout 'blhd' makes them transposed views of (B, L, H, E) buffers."""
    Ev = E if Ev is None else Ev

    def rand(b, h, n, d):
        if layout == "blhd":
            return torch.randn(b, n, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)

    return rand(B, Hq, L, E), rand(B, Hkv, S, E), rand(B, Hkv, S, Ev), rand(B, Hq, L, Ev)


def kernel_kwargs(L, S, *, causal=False, lower_right=False, window=(-1, -1), **features):
    """The forward/backward launchers' keywords for reference_attention's."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return dict(causal_bounds=(left, right), diag_offset=S - L if lower_right else 0, **features)


def poisoned_like(t):
    """A NaN-filled buffer shaped like ``t``, in a (B, L, H, D) layout for contrast with the inputs'."""
    B, H, N, D = t.shape
    return torch.full((B, N, H, D), float("nan"), device=t.device, dtype=t.dtype).transpose(1, 2)


def run(q, k, v, do, *, scale=None, dlse=None, poison=True, config=None, **features):
    """Forward, then backward into poisoned buffers; returns (dq, dk, dv, dsinks) and the forward's lse."""
    scale = scale or q.shape[-1] ** -0.5
    kw = kernel_kwargs(q.shape[2], k.shape[2], **features)
    out, lse = flash_attn_forward(q, k, v, scale=scale, **kw)
    buffers = dict(dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v)) if poison else {}
    grads = flash_attn_backward(do, q, k, v, out, lse, scale=scale, dlse=dlse, config=config, **kw, **buffers)
    if poison:
        for name, got in zip(("dq", "dk", "dv"), grads):
            assert got.data_ptr() == buffers[name].data_ptr(), f"{name}: not written into the given buffer"
    return grads, lse


def check(q, k, v, do, *, scale=None, dlse=None, config=None, **features):
    """Run the kernels and hold every gradient to the rule; returns the kernel's gradients."""
    scale = scale or q.shape[-1] ** -0.5
    grads, lse = run(q, k, v, do, scale=scale, dlse=dlse, config=config, **features)
    ref = reference_gradients(q, k, v, do, scale=scale, dlse=dlse, **features)
    ref_lowp = reference_gradients(q, k, v, do, scale=scale, dlse=dlse, compute_dtype=None, **features)
    for name, got, like, r, r_lowp in zip(("dq", "dk", "dv", "dsinks"), grads, (q, k, v, None), ref, ref_lowp):
        if r is None:
            assert got is None, f"{name}: returned without sinks"
            continue
        if like is not None:
            assert got.shape == like.shape and got.dtype == like.dtype, f"{name}: {got.shape} {got.dtype}"
        else:
            assert got.dtype == torch.float32
        assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=name)
    return grads


# (head dim, L, S, causal): a representative cut through the forward's grid.
GRID = [
    (59, 1, 239, "none"),
    (64, 113, 203, "top_left"),
    (111, 203, 113, "bottom_right"),
    (128, 128, 128, "top_left"),
    (256, 3, 79, "bottom_right"),
    (64, 203, 113, "top_left"),
    (128, 113, 203, "bottom_right"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim,L,S,causal", GRID)
def test_grid(dtype, head_dim, L, S, causal):
    q, k, v, do = make(1, 2, 2, L, S, head_dim, dtype=dtype)
    check(q, k, v, do, causal=causal != "none", lower_right=causal == "bottom_right")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("E,Ev", [(64, 40), (59, 128)])
def test_value_head_dim_differs(dtype, E, Ev):
    q, k, v, do = make(1, 2, 1, 33, 50, E, Ev, dtype=dtype)
    check(q, k, v, do, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_gqa(dtype, kv_heads):
    """dK/dV summed over each group of query heads in the kernel, K/V read as they are."""
    q, k, v, do = make(1, 8, kv_heads, 40, 51, 64, dtype=dtype)
    dq, dk, dv, _ = check(q, k, v, do, causal=True, lower_right=True)
    assert dk.shape[1] == kv_heads and dv.shape[1] == kv_heads


def random_mask(dims, kind, dtype):
    if kind == "bool":
        return torch.rand(dims, device=DEVICE) > 0.3
    mask = torch.randn(dims, device=DEVICE, dtype=dtype)
    return mask.masked_fill(torch.rand(dims, device=DEVICE) < 0.2, float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind,shape", [("bool", "BHLS"), ("additive", "11LS"), ("bool", "B11S"),
                                        ("additive", "B11S"), ("additive", "1HL1")])
def test_masks(dtype, kind, shape):
    """Masks read with their broadcast dims; per-head ones must follow each query head of a GQA group."""
    B, H, L, S = 2, 4, 29, 47
    q, k, v, do = make(B, H, 2, L, S, 64, dtype=dtype)
    dims = {"B11S": (B, 1, 1, S), "11LS": (1, 1, L, S), "BHLS": (B, H, L, S), "1HL1": (1, H, L, 1)}[shape]
    check(q, k, v, do, mask=random_mask(dims, kind, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_key_padding_with_causal(dtype):
    """Left padding as Transformers builds it: a (B, 1, 1, S) key mask on top of causal, with GQA."""
    B, L = 3, 37
    q, k, v, do = make(B, 4, 2, L, L, 64, dtype=dtype)
    lengths = torch.tensor([37, 20, 1], device=DEVICE)
    mask = (torch.arange(L, device=DEVICE)[None, :] >= L - lengths[:, None]).view(B, 1, 1, L)
    check(q, k, v, do, mask=mask, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("window,lower_right,L,S", [((8, 0), True, 70, 45), ((5, 3), False, 45, 70),
                                                     ((-1, 4), True, 45, 70), ((16, -1), False, 70, 45)])
def test_window(dtype, window, lower_right, L, S):
    q, k, v, do = make(1, 2, 1, L, S, 32, dtype=dtype)
    check(q, k, v, do, window=window, lower_right=lower_right)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(dtype, causal):
    """Scores pushed into tanh's curved part, so the derivative's 1 - tanh^2 matters."""
    q, k, v, do = make(1, 2, 2, 40, 57, 64, dtype=dtype)
    check(q * 3, k * 3, v, do, softcap=5.0, causal=causal, lower_right=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(dtype, per_batch):
    B, H = 2, 4
    q, k, v, do = make(B, H, 2, 40, 57, 64, dtype=dtype)
    slopes = torch.rand((B if per_batch else 1), H, device=DEVICE, dtype=torch.float32)
    check(q, k, v, do, alibi_slopes=slopes, causal=per_batch, lower_right=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sinks(dtype):
    """d_sinks against autograd through the reference's extra logit, with GQA and a window."""
    q, k, v, do = make(2, 4, 2, 33, 41, 64, dtype=dtype)
    sinks = torch.randn(4, device=DEVICE, dtype=torch.float32) * 2
    check(q, k, v, do, sinks=sinks, causal=True, window=(9, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lse_gradient(dtype):
    """A gradient on the lse output (dlse) shifts delta; with sinks and a bool mask with empty rows."""
    q, k, v, do = make(1, 2, 2, 35, 30, 32, dtype=dtype)
    mask = torch.rand(1, 2, 35, 30, device=DEVICE) > 0.4
    mask[:, :, 4] = False
    dlse = torch.randn(1, 2, 35, device=DEVICE)
    check(q, k, v, do, dlse=dlse, mask=mask, sinks=torch.randn(2, device=DEVICE))
    check(q, k, v, do, dlse=dlse, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_everything_at_once(dtype):
    B, H = 2, 4
    q, k, v, do = make(B, H, 1, 50, 66, 80, 48, dtype=dtype)
    mask = torch.randn(B, 1, 50, 66, device=DEVICE, dtype=dtype)
    check(q, k, v, do, mask=mask, window=(20, 2), lower_right=True, softcap=4.0,
          alibi_slopes=torch.rand(B, H, device=DEVICE), sinks=torch.randn(H, device=DEVICE), scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["blhd", "sliced", "expanded_batch", "last_dim_strided", "do_of_a_sum"])
def test_strides(dtype, layout):
    B, H, L, S, E = 2, 2, 31, 43, 64
    if layout == "blhd":  # (B, L, H, E) buffers seen as (B, H, L, E), dO too, as Transformers and flash-attn pass them
        q, k, v, do = make(B, H, H, L, S, E, dtype=dtype, layout="blhd")
    elif layout == "sliced":  # heads taken out of a fused qkv projection
        qkv = torch.randn(B, L, 3, H, E, device=DEVICE, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        do = torch.randn(B, L, 2, H, E, device=DEVICE, dtype=dtype)[:, :, 1].transpose(1, 2)
    elif layout == "expanded_batch":  # one K/V shared by every batch row (stride 0): gradients per batch row
        q, k, v, do = make(B, H, H, L, S, E, dtype=dtype)
        k, v = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    elif layout == "last_dim_strided":
        q, k, v, do = (t.transpose(-1, -2).contiguous().transpose(-1, -2)
                       for t in make(B, H, H, L, S, E, dtype=dtype))
    else:  # out.sum().backward() hands the backward an expanded scalar: every stride 0
        q, k, v, _ = make(B, H, H, L, S, E, dtype=dtype)
        do = torch.ones((), device=DEVICE, dtype=dtype).expand(B, H, L, E)
    check(q, k, v, do, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", ["bool_rows", "additive_rows", "bottom_right_L_gt_S", "window_misses"])
def test_rows_with_no_visible_key(dtype, how):
    """Rows that see no key: zero and finite gradients, and nothing leaks into dK/dV."""
    B, H, L, S = 1, 2, 40, 24
    q, k, v, do = make(B, H, H, L, S, 32, dtype=dtype)
    features = {}
    if how == "bool_rows":
        mask = torch.rand(B, H, L, S, device=DEVICE) > 0.5
        mask[:, :, ::3] = False
        features["mask"] = mask
        empty = (slice(None), slice(None), slice(0, L, 3))
    elif how == "additive_rows":
        mask = torch.randn(B, 1, L, S, device=DEVICE, dtype=dtype)
        mask[:, :, 5:9] = float("-inf")
        features["mask"] = mask
        empty = (slice(None), slice(None), slice(5, 9))
    elif how == "bottom_right_L_gt_S":  # flash-attn: the first L - S query rows see no key
        features.update(causal=True, lower_right=True)
        empty = (slice(None), slice(None), slice(0, L - S))
    else:  # keys >= 10 are masked, and rows >= 12 see only keys within 2 to their left
        features.update(window=(2, -1), mask=torch.arange(S, device=DEVICE) < 10)
        empty = (slice(None), slice(None), slice(13, L))
    dq, dk, dv, _ = check(q, k, v, do, **features)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name}: not finite"
    assert (dq[empty] == 0).all(), "dq: rows that see no key must get zero gradients"
    # Their dO must not matter: change it there and dK/dV stay bitwise the same.
    do2 = do.clone()
    do2[empty] = torch.randn_like(do2[empty]) * 100
    (_, dk2, dv2, _), _ = run(q, k, v, do2, **features)
    assert torch.equal(dk, dk2) and torch.equal(dv, dv2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic(dtype):
    """Two runs give bitwise-identical dq, dk, dv, d_sinks (GQA, a mask and sinks included)."""
    q, k, v, do = make(2, 4, 2, 45, 61, 48, dtype=dtype)
    features = dict(causal=True, lower_right=True, mask=torch.rand(2, 1, 45, 61, device=DEVICE) > 0.2,
                    sinks=torch.randn(4, device=DEVICE))
    first, _ = run(q, k, v, do, **features)
    second, _ = run(q, k, v, do, **features)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), first, second):
        assert torch.equal(a, b), f"{name}: differs between two runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_unequal_block_sizes(dtype):
    """Configs where the two kernels' query and key blocks differ (as on the GPU), under a window."""
    q, k, v, do = make(1, 4, 2, 77, 90, 32, dtype=dtype)
    config = {"dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
              "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)}
    check(q, k, v, do, window=(21, 5), lower_right=True, config=config)


def test_allocated_gradients_follow_the_inputs():
    """Without buffers: gradients in the inputs' dtypes, shapes and (dense) layouts."""
    q, k, v, do = make(2, 4, 2, 20, 30, 32, dtype=torch.bfloat16, layout="blhd")
    (dq, dk, dv, dsinks), _ = run(q, k, v, do, poison=False)
    assert dsinks is None
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.stride() == t.stride()
    ref = reference_gradients(q, k, v, do, scale=32 ** -0.5)
    ref_lowp = reference_gradients(q, k, v, do, scale=32 ** -0.5, compute_dtype=None)
    for name, g, r, r_lowp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, ref_lowp):
        assert_close_by_rule(g, r, r_lowp, factor=GRADIENT_FACTOR, what=name)


def test_bad_buffer_is_refused():
    q, k, v, do = make(1, 2, 2, 8, 8, 16)
    out, lse = flash_attn_forward(q, k, v, scale=0.25)
    with pytest.raises(ValueError, match="dk must be"):
        flash_attn_backward(do, q, k, v, out, lse, scale=0.25, dk=torch.empty(1, 2, 8, 15, dtype=k.dtype))


def test_gpu_block_configs(monkeypatch):
    """The GPU table (not the interpreter's): both kernels for every head dim, power-of-two
    blocks, and the resident fp32 accumulators within 128 registers a thread."""
    from fastattn.kernels.triton import flash_bwd

    monkeypatch.setattr(flash_bwd, "interpreting", lambda: False)
    for d in (16, 59, 64, 96, 111, 128, 192, 256):
        cfg = flash_bwd.block_config(d, d)
        padded = max(16, 1 << (d - 1).bit_length())
        for kernel, rows, width in (("dkdv", "BLOCK_N", 2 * padded), ("dq", "BLOCK_M", padded)):
            c = cfg[kernel]
            assert all(c[key] & (c[key] - 1) == 0 and c[key] >= 16 for key in ("BLOCK_M", "BLOCK_N"))
            assert c[rows] * width // (32 * c["num_warps"]) <= 128, (d, kernel, c)


def test_dropout_keep_mask():
    """The kernels' keep-mask: kept fraction within 1% of 1 - p on a large tensor, the same
    seed and offset give the same mask, another seed or offset another; the draw is a
    function of the element's position (an offset of S shifts the mask by one row)."""
    big = dropout_keep_mask(2, 2, 256, 256, dropout_p=0.3, seed=1234, device=DEVICE)
    assert big.shape == (2, 2, 256, 256) and big.dtype == torch.bool
    assert abs(big.float().mean().item() - 0.7) <= 0.01 * 0.7
    B, H, L, S = 2, 2, 40, 64
    keep = dropout_keep_mask(B, H, L, S, dropout_p=0.3, seed=1234, device=DEVICE)
    assert torch.equal(keep, dropout_keep_mask(B, H, L, S, dropout_p=0.3, seed=1234, device=DEVICE))
    assert not torch.equal(keep, dropout_keep_mask(B, H, L, S, dropout_p=0.3, seed=1235, device=DEVICE))
    next_call = dropout_keep_mask(B, H, L, S, dropout_p=0.3, seed=1234, offset=B * H * L * S, device=DEVICE)
    assert not torch.equal(keep, next_call)
    shifted = dropout_keep_mask(1, 1, 9, S, dropout_p=0.3, seed=1234, offset=S, device=DEVICE)
    assert torch.equal(shifted[0, 0], keep[0, 0, 1:10])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("features", ["causal_gqa", "everything"])
def test_dropout_gradients(dtype, features):
    """With dropout the backward regenerates the forward's keep-mask: its gradients match a
    reference that applies the same (materialized) mask, under other block sizes too.
    The output it needs is the reference's dropped output (lse does not depend on dropout)."""
    B, Hq, Hkv, L, S, E = 2, 4, 2, 45, 61, 48
    q, k, v, do = make(B, Hq, Hkv, L, S, E, dtype=dtype)
    p, seed, offset = 0.25, 17, 3 * B * Hq * L * S
    keep = dropout_keep_mask(B, Hq, L, S, dropout_p=p, seed=seed, offset=offset, device=DEVICE)
    features = dict(causal=True, lower_right=True) if features == "causal_gqa" else dict(
        mask=torch.rand(B, 1, L, S, device=DEVICE) > 0.2, window=(30, 3), softcap=4.0,
        alibi_slopes=torch.rand(B, Hq, device=DEVICE), sinks=torch.randn(Hq, device=DEVICE))
    config = None if "softcap" in features else {"dkdv": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
                                                   "dq": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)}
    scale = E ** -0.5
    dropped = dict(dropout_keep=keep, dropout_p=p)
    out, _ = reference_attention(q, k, v, scale=scale, **dropped, **features)
    kw = kernel_kwargs(L, S, **features)
    _, lse = flash_attn_forward(q, k, v, scale=scale, **kw)
    grads = flash_attn_backward(do, q, k, v, out.to(dtype), lse, scale=scale, config=config,
                                dropout_p=p, dropout_seed=seed, dropout_offset=offset, **kw)
    ref = reference_gradients(q, k, v, do, scale=scale, **dropped, **features)
    ref_lowp = reference_gradients(q, k, v, do, scale=scale, compute_dtype=None, **dropped, **features)
    for name, got, r, r_lowp in zip(("dq", "dk", "dv", "dsinks"), grads, ref, ref_lowp):
        if r is not None:
            assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=name)
    again = flash_attn_backward(do, q, k, v, out.to(dtype), lse, scale=scale, config=config,
                                dropout_p=p, dropout_seed=seed, dropout_offset=offset, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, again):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: differs between two runs"


@pytest.mark.parametrize("L,S", [(0, 20), (20, 0)])
def test_empty_lengths(L, S):
    """No queries: dK/dV are zeros. No keys: every row sees nothing, dQ is zeros (d_sinks too)."""
    q, k, v, do = make(1, 2, 1, L, S, 32)
    out = torch.zeros(1, 2, L, 32, device=DEVICE, dtype=q.dtype)
    lse = torch.full((1, 2, L), float("inf"), device=DEVICE)
    sinks = torch.randn(2, device=DEVICE)
    if S == 0:
        lse = sinks.view(1, 2, 1).expand(1, 2, L).contiguous()  # the sink is all a row sees
    dq, dk, dv, dsinks = flash_attn_backward(do, q, k, v, out, lse, scale=0.2, sinks=sinks, causal_bounds=(-1, 0),
                                             dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v))
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and (g == 0).all()
    assert torch.equal(dsinks, torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_from_split_kv_and_packed_gqa_forward(dtype):
    """The forward's split-KV and packed-GQA paths give the out and lse the backward reads."""
    B, Hq, Hkv, L, S, E = 2, 8, 2, 5, 150, 64
    q, k, v, do = make(B, Hq, Hkv, L, S, E, dtype=dtype, layout="blhd")
    features = dict(causal=True, lower_right=True, sinks=torch.randn(Hq, device=DEVICE))
    kw = kernel_kwargs(L, S, **features)
    out, lse = flash_attn_forward(q, k, v, scale=0.125, num_splits=3, pack_gqa=True, **kw)
    grads = flash_attn_backward(do, q, k, v, out, lse, scale=0.125, **kw)
    ref = reference_gradients(q, k, v, do, scale=0.125, **features)
    ref_lowp = reference_gradients(q, k, v, do, scale=0.125, compute_dtype=None, **features)
    for name, got, r, r_lowp in zip(("dq", "dk", "dv", "dsinks"), grads, ref, ref_lowp):
        assert_close_by_rule(got, r, r_lowp, factor=GRADIENT_FACTOR, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_additive_mask_at_float32_min(dtype):
    """Eager-style padding masks use finfo(float32).min. With left padding and causal, the
    padded query rows see only keys so masked: the forward gives them the mean of V as torch
    does, and in a model their dO is zero (nothing downstream reads them). Gradients must be
    right elsewhere and finite everywhere, also when such a row's dO is not zero. (The lse
    cannot carry such a row's softmax exactly: near -3.4e38 in log2 units, exp2(s - lse)
    recomputes P with errors far above the dtype's there, and dQ of those rows is off;
    with dO = 0 on them, as in a model, the gradients agree.)"""
    B, H, L, pad = 2, 2, 37, 17
    q, k, v, do = make(B, H, H, L, L, 32, dtype=dtype)
    mask = torch.zeros(B, 1, 1, L, device=DEVICE)
    mask[1, :, :, :pad] = torch.finfo(torch.float32).min
    do[1, :, :pad] = 0
    check(q, k, v, do, mask=mask, causal=True)
    do[1, :, :pad] = torch.randn_like(do[1, :, :pad])
    grads, _ = run(q, k, v, do, mask=mask, causal=True)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g).all(), f"{name}: not finite"
