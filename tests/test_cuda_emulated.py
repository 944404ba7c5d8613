"""The CUDA kernel's body (csrc/flash_fwd_kernel.cuh) run on the CPU through
csrc/emulation/, against the fp64 reference with flash-attn's accuracy rule.

This is where the CUDA kernel's logic is tested on machines without a GPU: tiling,
pack-GQA rows, the register-level softmax and its quad reductions, masks and
windows in both alignments, per-batch key lengths, split-KV partials, the epilogue
and the cp.async/barrier discipline (copies landing as late as the hardware may).
The same cases run on the real kernel in test_cuda_backend.py when a GPU is there.
Each case is small: every emulated lane is an OS thread.
"""
import pytest
import torch

from fastattn.testing import assert_close_by_rule, reference_attention

from . import _emulated_kernel as emulated

_reason = emulated.why_not()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture(scope="module", autouse=True)
def _built():
    emulated.load()


def _inputs(B, L, S, hq, hkv, D, dtype, *, flash_layout=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if flash_layout:  # (B, L, H, D) buffers seen as (B, H, L, D): the layout Transformers and flash-attn use
        q = torch.randn(B, L, hq, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, S, hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, hq, L, D, generator=g).to(dtype)
        k = torch.randn(B, hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, hkv, S, D, generator=g).to(dtype)
    return q, k, v


def _check(out, lse, q, k, v, *, scale, lower_right=False, window=(-1, -1), softcap=0.0):
    kw = dict(scale=scale, lower_right=lower_right, window=window, softcap=softcap)
    ref, ref_lse = reference_attention(q, k, v, **kw)
    ref_lowp, _ = reference_attention(q, k, v, compute_dtype=None, **kw)
    assert_close_by_rule(out, ref.to(out.dtype), ref_lowp)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-3, rtol=1e-3)  # +inf rows must match exactly


def _merge(out_accum, lse_accum, dtype):
    """The split-KV merge (flash_fwd_combine.cu's math), for the partial results."""
    lse = torch.logsumexp(lse_accum, dim=0)
    weights = torch.exp(lse_accum - lse).nan_to_num(0.0)  # rows no split saw: lse = -inf
    out = (weights[..., None] * out_accum).sum(0)
    return out.to(dtype), torch.where(torch.isneginf(lse), torch.inf, lse)


# One row per emulated tile configuration (dtype, head dim, bounded), each with the
# features that configuration is the natural place for. window: (left, right) around
# each query's diagonal, -1 = unbounded; causal is right = 0.
CASES = [
    # dtype, D, (B, L, S), (hq, hkv), window, lower_right, softcap
    (torch.float16, 64, (2, 77, 203), (4, 2), (-1, -1), False, 0.0),
    (torch.float16, 64, (1, 150, 300), (2, 1), (-1, 0), False, 0.0),
    (torch.float16, 64, (1, 130, 60), (2, 2), (-1, 0), True, 0.0),  # L > S: early rows see no key
    (torch.bfloat16, 96, (1, 77, 203), (3, 1), (20, 5), False, 0.0),
    (torch.bfloat16, 128, (2, 70, 130), (2, 2), (-1, -1), False, 0.0),
    (torch.float16, 128, (1, 130, 140), (4, 1), (-1, 0), True, 30.0),
    (torch.float16, 128, (1, 400, 400), (1, 1), (200, 0), False, 0.0),  # tiles inside the window skip the checks
    (torch.bfloat16, 256, (1, 65, 100), (2, 1), (30, 0), True, 0.0),
]


def _case_id(case) -> str:
    dtype, D, (B, L, S), (hq, hkv), window, lower_right, softcap = case
    name = f"{str(dtype)[6:]}-hd{D}-B{B}-{L}x{S}-heads{hq}:{hkv}-window{window[0]},{window[1]}"
    return name + ("-lower_right" if lower_right else "") + (f"-softcap{softcap:g}" if softcap else "")


@pytest.mark.parametrize("eager_copies", [False, True], ids=["copies-land-at-wait", "copies-land-at-issue"])
@pytest.mark.parametrize("dtype, D, sizes, heads, window, lower_right, softcap", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_kernel_matches_reference(dtype, D, sizes, heads, window, lower_right, softcap, eager_copies):
    B, L, S = sizes
    q, k, v = _inputs(B, L, S, *heads, D, dtype, seed=D + L)
    out, lse = emulated.fwd(q, k, v, 0.2, *window, lower_right, softcap, eager_copies=eager_copies)
    _check(out, lse, q, k, v, scale=0.2, lower_right=lower_right, window=window, softcap=softcap)


def test_flash_layout_in_and_out():
    q, k, v = _inputs(2, 33, 90, 4, 2, 64, torch.float16, flash_layout=True)
    out, lse = emulated.fwd(q, k, v, 0.125, -1, 0, True)
    assert out.transpose(1, 2).is_contiguous(), "out keeps q's (B, L, H, D) memory layout"
    _check(out, lse, q, k, v, scale=0.125, lower_right=True, window=(-1, 0))


@pytest.mark.parametrize("L, S, heads, splits", [
    (1, 700, (8, 2), 3),
    (4, 300, (2, 1), 2),
    (3, 130, (2, 1), 5),  # more splits than key tiles: empty splits must weigh nothing
])
def test_split_kv_partials_merge_to_the_reference(L, S, heads, splits):
    q, k, v = _inputs(1, L, S, *heads, 128, torch.bfloat16, seed=S)
    out, lse, out_accum, lse_accum = emulated.fwd(q, k, v, 0.1, -1, -1, False, 0.0, None, splits)
    assert out_accum.shape[0] == splits and not torch.isnan(out_accum).any() and not torch.isnan(lse_accum).any()
    out, lse = _merge(out_accum, lse_accum, q.dtype)
    _check(out, lse, q, k, v, scale=0.1)


@pytest.mark.parametrize("lower_right", [False, True])
def test_per_batch_key_lengths_never_read_padding(lower_right):
    used = [300, 17, 0]
    q, k, v = _inputs(3, 20, 300, 4, 2, 64, torch.float16)
    k[1, :, 17:] = float("nan")  # padding keys must never be read
    v[1, :, 17:] = float("nan")
    seqused = torch.tensor(used, dtype=torch.int32)
    out, lse = emulated.fwd(q, k, v, 0.125, -1, 0, lower_right, 0.0, seqused)
    for b, n in enumerate(used):
        if n == 0:
            assert torch.count_nonzero(out[b]) == 0 and torch.isinf(lse[b]).all() and (lse[b] > 0).all()
            continue
        _check(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=0.125,
               lower_right=lower_right, window=(-1, 0))


# (dtype, head dim) pairs from the emulated configurations: unbounded and bounded kernels in each dtype.
@pytest.mark.parametrize("batch_rows, window, splits, dtype, D", [
    (3, (-1, -1), 0, torch.float16, 64),   # (B, S) key padding, BERT-style
    (3, (-1, -1), 0, torch.bfloat16, 128),
    (3, (-1, 0), 0, torch.float16, 64),    # causal with padding, as Transformers' causal models send it
    (3, (-1, 0), 0, torch.bfloat16, 96),
    (1, (-1, 0), 0, torch.float16, 64),    # one row broadcast over the batch
    (3, (-1, -1), 3, torch.bfloat16, 128),  # decode with split-KV
])
def test_key_padding_mask(batch_rows, window, splits, dtype, D):
    L = 1 if splits else 37
    q, k, v = _inputs(3, L, 203, 4, 2, D, dtype, seed=7)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(batch_rows, 203, generator=g) > 0.3
    if batch_rows == 3:
        keep[1, :60] = False  # left padding
        keep[2] = False       # a sequence with no key at all: out 0, lse +inf
    result = emulated.fwd(q, k, v, 0.2, *window, False, 0.0, None, splits, keep)
    out, lse = _merge(*result[2:], q.dtype) if splits else result
    mask = keep[:, None, None, :]
    kw = dict(scale=0.2, window=window, mask=mask)
    ref, ref_lse = reference_attention(q, k, v, **kw)
    ref_lowp, _ = reference_attention(q, k, v, compute_dtype=None, **kw)
    assert_close_by_rule(out, ref.to(out.dtype), ref_lowp)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-3, rtol=1e-3)
