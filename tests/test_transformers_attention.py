"""fastattn's Transformers attention function against Transformers' own attention
functions, argument by argument (no model): causality rules, cache alignments, the
kwargs real models pass, dtype handling; plus registration and patch/unpatch."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as hf  # noqa: E402
from transformers import masking_utils, modeling_utils  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from .conftest import DEVICE  # noqa: E402


class FakeAttention(torch.nn.Module):
    def __init__(self, hq=4, hkv=2, is_causal=True, training=False):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = hq // hkv
        self.train(training)


def qkv(B=2, Hq=4, Hkv=2, L=6, S=6, D=16, dtype=torch.float32):
    # Non-contiguous (B, H, S, D) views, as models make them with .view().transpose(1, 2).
    q = torch.randn(B, L, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    return q, k, v


def padding_mask(B, L, S, causal=True):
    keep = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    keep[0, :2] = False
    m = keep[:, None, None, :].expand(B, 1, L, S)
    if causal:
        i = torch.arange(L, device=DEVICE)[:, None] + (S - L)
        m = m & (torch.arange(S, device=DEVICE)[None, :] <= i)
    return m.contiguous()


def assert_same(out, ref, keep_rows=None, tol=1e-5):
    assert out.shape == ref.shape and out.is_contiguous()
    if keep_rows is not None:
        out, ref = out[keep_rows], ref[keep_rows]
    assert (out.double() - ref.double()).abs().max().item() <= tol


@pytest.mark.parametrize("L,S,with_mask,is_causal", [
    (6, 6, False, True),    # prefill, no padding: is_causal
    (1, 7, False, True),    # decode: not causal
    (4, 9, False, True),    # prefill into an empty static cache: top-left, as SDPA
    (6, 6, True, True),     # padded: the mask holds everything
    (3, 8, True, True),     # chunked prefill with a cache and padding
    (6, 6, False, False),   # encoder
])
def test_matches_transformers_sdpa(L, S, with_mask, is_causal):
    module = FakeAttention(is_causal=is_causal)
    q, k, v = qkv(L=L, S=S)
    mask = padding_mask(2, L, S) if with_mask else None
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    out, weights = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None
    keep = mask.any(-1)[:, 0] if mask is not None else None  # (B, L) rows that see a key
    assert_same(out, ref, keep)


def test_is_causal_kwarg_overrides_module():
    module = FakeAttention(is_causal=True)
    q, k, v = qkv()
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    out, _ = hf.attention_forward(module, q, k, v, None, is_causal=False)
    assert_same(out, ref)


def eager_reference(q, k, v, mask, scale, softcap=None, sinks=None, window=None, bias=None):
    """Attention from the definition (fp64): the eager math of Gemma2 / GPT-OSS / T5."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    L, S = s.shape[-2:]
    keep = torch.ones(L, S, dtype=torch.bool, device=s.device)
    if window is not None:  # causal + Transformers' window (includes the current token)
        i = torch.arange(L, device=s.device)[:, None]
        j = torch.arange(S, device=s.device)[None, :]
        keep = (j <= i) & (j > i - window)
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = torch.softmax(s, -1)
    if sinks is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("feature", ["softcap", "sinks", "window", "softcap+window+mask", "sinks+mask"])
def test_model_kwargs_exact(feature, dtype):
    module = FakeAttention()
    q, k, v = qkv(L=8, S=8, dtype=dtype)
    mask = padding_mask(2, 8, 8) if "mask" in feature else None
    kwargs, ref_kwargs = {}, {}
    if "softcap" in feature:
        kwargs["softcap"] = ref_kwargs["softcap"] = 2.0
    if "sinks" in feature:
        kwargs["s_aux"] = ref_kwargs["sinks"] = torch.randn(4, device=DEVICE)
    if "window" in feature:
        kwargs["sliding_window"] = 3
        if mask is None:
            ref_kwargs["window"] = 3
        else:  # Transformers' mask function folds the window into the mask
            mask = mask & (torch.arange(8, device=DEVICE)[None, :] > torch.arange(8, device=DEVICE)[:, None] - 3)
    if mask is None:
        ref_kwargs.setdefault("window", 10**6)  # causal
    ref = eager_reference(q, k, v, mask, 0.25, **ref_kwargs)
    # Half precision is forced onto the Triton kernel: on Hopper, plain calls would
    # otherwise go to torch's faster fused SDPA (see dispatch.priority).
    with fastattn.use_backend("auto" if dtype == torch.float32 else "triton"), hf.record_backends() as records:
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert records[0].backend == ("sdpa" if dtype == torch.float32 else "triton")
    keep = mask.any(-1)[:, 0] if mask is not None else None
    assert_same(out, ref.to(dtype), keep, tol=1e-5 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_position_bias_as_transformers(with_mask):
    module = FakeAttention(hq=2, hkv=2, is_causal=True)
    q, k, v = qkv(Hq=2, Hkv=2)
    bias = torch.randn(1, 2, 6, 6, device=DEVICE)
    mask = padding_mask(2, 6, 6) if with_mask else None
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    out, _ = hf.attention_forward(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    assert_same(out, ref, mask.any(-1)[:, 0] if with_mask else None)


def test_padding_free_cu_seq_lens():
    """Packed sequences of lengths 3, 5, 2 in one row; no mask, only cu_seq_lens."""
    module = FakeAttention()
    q, k, v = qkv(B=1, L=10, S=10)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32, device=DEVICE)
    out, _ = hf.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                                  max_length_k=5)
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref, _ = sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)
        pieces.append(ref)
    assert_same(out, torch.cat(pieces, dim=1))


def test_output_attentions_returns_eager_weights():
    module = FakeAttention()
    q, k, v = qkv()
    mask = padding_mask(2, 6, 6)
    from transformers.models.llama.modeling_llama import eager_attention_forward

    ref, ref_w = eager_attention_forward(module, q, k, v, torch.where(mask, 0.0, float("-inf")), scaling=0.25)
    hf._warned.discard("output_attentions")
    with pytest.warns(UserWarning, match="output_attentions"), hf.record_backends() as records:
        out, w = hf.attention_forward(module, q, k, v, mask, scaling=0.25, output_attentions=True)
    assert [(r.backend, r.why_not_triton) for r in records] == [("sdpa", (hf.WEIGHTS_REASON,))]
    keep = mask.any(-1)[:, 0]
    assert_same(out, ref, keep)
    assert (w[keep.unsqueeze(1).expand_as(w[..., 0])] - ref_w[keep.unsqueeze(1).expand_as(w[..., 0])]).abs().max() < 1e-5


def test_dropout_in_training_runs_on_the_kernel():
    module = FakeAttention(training=True)
    q, k, v = qkv(dtype=torch.float16)
    with hf.record_backends() as records:
        out, _ = hf.attention_forward(module, q, k, v, None, dropout=0.5)
    assert records[0].backend == "triton"
    no_drop, _ = hf.attention_forward(module, q, k, v, None, dropout=0.0)
    assert out.shape == no_drop.shape and not torch.equal(out, no_drop)
    # fp32 has no kernel: the fallback drops, and says why the kernel did not run
    with hf.record_backends() as records:
        out, _ = hf.attention_forward(module, *(t.float() for t in (q, k, v)), None, dropout=0.5)
    assert records[0].backend == "sdpa" and not torch.equal(out, no_drop.float())


def test_fp32_activations_in_half_model_run_in_half_once_warned():
    module = FakeAttention()
    module.proj = torch.nn.Linear(4, 4, dtype=torch.bfloat16)
    q, k, v = qkv()
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hf.record_backends() as records:
            for _ in range(3):  # three layers, one warning
                out, _ = hf.attention_forward(module, q, k, v, None)
    assert [str(w.message) for w in caught if "float32 activations" in str(w.message)].__len__() == 1
    assert out.dtype == torch.float32 and records[0].dtype == torch.bfloat16
    ref, _ = sdpa_attention_forward(module, q, k, v, None)
    assert (out - ref).abs().max().item() < 3e-2


def test_autocast_dtype_wins():
    module = FakeAttention()  # no parameters: would stay fp32 without autocast
    q, k, v = qkv()
    with torch.autocast(DEVICE, dtype=torch.bfloat16), hf.record_backends() as records:
        out, _ = hf.attention_forward(module, q, k, v, None)
    assert records[0].dtype == torch.bfloat16 and out.dtype == torch.float32


# --------------------------------------------------------------------------- registration, mask function


def test_registered_by_import():
    assert modeling_utils.AttentionInterface._global_mapping["fastattn"] is hf.attention_forward
    assert masking_utils.AttentionMaskInterface._global_mapping["fastattn"] is hf.mask_function


def test_import_registers_lazily_in_a_fresh_process():
    code = ("import sys, fastattn; assert 'transformers.modeling_utils' not in sys.modules; "
            "from transformers import AttentionInterface; from transformers.masking_utils import AttentionMaskInterface; "
            "assert 'fastattn' in AttentionInterface._global_mapping and 'fastattn' in AttentionMaskInterface._global_mapping")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mask_function_same_values_as_sdpa_mask():
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, :3] = False
    for factory in (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function,
                    masking_utils.sliding_window_causal_mask_function(3)):
        for skip in (True, False):
            args = dict(batch_size=2, q_length=7, kv_length=7, mask_function=factory, attention_mask=pad,
                        allow_is_causal_skip=skip, allow_is_bidirectional_skip=skip)
            ours, ref = hf.mask_function(**args), masking_utils.sdpa_mask(**args)
            assert (ours is None) == (ref is None)
            if ref is not None:
                assert torch.equal(ours.expand_as(ref), ref)
    # the padding-only (bidirectional) mask is a view of the (B, S) padding: nothing materialized
    m = hf.mask_function(batch_size=2, q_length=7, kv_length=7, mask_function=masking_utils.bidirectional_mask_function,
                         attention_mask=pad)
    assert m.shape == (2, 1, 7, 7) and m.stride(2) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L, S, q_offset, kv_offset", [
    (7, 7, 0, 0),    # prefill with left padding
    (3, 8, 5, 0),    # chunked prefill after 5 cached tokens (diagonal at S - L)
    (3, 10, 5, 0),   # static cache: keys past the queries are not filled yet (diagonal 5, not S - L)
    (2, 6, 9, 4),    # a cache window that starts at position 4
    (1, 8, 7, 0),    # decode: the diagonal bounds nothing
])
def test_causal_padding_mask_runs_compact_with_the_same_result(L, S, q_offset, kv_offset, dtype):
    """A causal mask with padding reaches the kernel as causal + one padding row per batch
    (blocks above the diagonal skipped, no (L, S) mask read), with the full mask's result."""
    pad = torch.ones(2, kv_offset + S, dtype=torch.bool, device=DEVICE)
    pad[0, :kv_offset + 3] = False  # left padding
    args = dict(batch_size=2, q_length=L, kv_length=S, q_offset=q_offset, kv_offset=kv_offset, attention_mask=pad,
                device=DEVICE)
    mask = hf.mask_function(**args)
    assert torch.equal(mask, masking_utils.sdpa_mask(**args))
    module = FakeAttention()
    q, k, v = qkv(L=L, S=S, D=32, dtype=dtype)
    call = hf._build_call(module, q, k, v, mask, 0.0, 0.3, {})
    diag = q_offset - kv_offset
    assert call.mask.shape == (2, 1, 1, S) and not call.lower_right
    assert call.key_bounds == ((-1, diag) if diag < S - 1 else (-1, -1))  # a bound past the last key is none
    full = mask.clone()  # a copy (as a device_map move makes) is read as the full mask
    assert hf._build_call(module, q, k, v, full, 0.0, 0.3, {}).mask.shape == (2, 1, L, S)
    with fastattn.use_backend("auto" if dtype == torch.float32 else "triton"):
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
        ref, _ = hf.attention_forward(module, q, k, v, full, scaling=0.3)
    keep = full.any(-1)[:, 0]  # rows that see a key
    assert_same(out, ref, keep, tol={torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])
    assert torch.count_nonzero(out[~keep]) == 0 and torch.count_nonzero(ref[~keep]) == 0


def test_causal_padding_mask_with_a_tensor_offset_stays_full():
    """StaticCache hands the query offset over as a device tensor: reading it would
    synchronize with the GPU, so that mask is used as the full mask it is."""
    pad = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    pad[0, :3] = False
    args = dict(batch_size=2, q_length=3, kv_length=8, q_offset=torch.tensor(2, device=DEVICE), kv_offset=0,
                attention_mask=pad, device=DEVICE)
    mask = hf.mask_function(**args)
    assert torch.equal(mask, masking_utils.sdpa_mask(**args))
    q, k, v = qkv(L=3, S=8)
    assert hf._build_call(FakeAttention(), q, k, v, mask, 0.0, 0.3, {}).mask.shape == (2, 1, 3, 8)


# --------------------------------------------------------------------------- patch / unpatch


def _snapshot():
    return (dict(modeling_utils.AttentionInterface._global_mapping),
            dict(masking_utils.AttentionMaskInterface._global_mapping),
            torch.nn.functional.scaled_dot_product_attention)


def test_patch_unpatch_round_trip_and_idempotent():
    before = _snapshot()
    try:
        fastattn.patch()
        fastattn.patch(torch_sdpa=True)
        fastattn.patch(torch_sdpa=True)
        assert modeling_utils.AttentionInterface._global_mapping["sdpa"] is hf.attention_forward
        assert torch.nn.functional.scaled_dot_product_attention is not before[2]
        # torch_sdpa=True: direct calls go through fastattn, and its fallback does not recurse
        q, k, v = qkv()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ref = before[2](q, k, v, is_causal=True, enable_gqa=True)
        assert (out - ref).abs().max().item() < 1e-5
    finally:
        fastattn.unpatch()
        fastattn.unpatch()
    after = _snapshot()
    assert after[0] == before[0] and after[1] == before[1] and after[2] is before[2]


def test_auto_import_patches_in_a_fresh_process():
    code = ("import torch, fastattn.auto, fastattn; from transformers import AttentionInterface as A; "
            "from fastattn.integrations.transformers import attention_forward as f; "
            "assert A._global_mapping['sdpa'] is f; fastattn.unpatch(); "
            "from transformers.integrations.sdpa_attention import sdpa_attention_forward as o; "
            "assert A._global_mapping['sdpa'] is o")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
