"""Kernel accuracy on the grid of awkward sizes and features, for every backend.

Each case draws fresh random inputs, runs a backend on a validated
AttentionCall, and holds it to flash-attn's rule against an fp64 reference:
error <= 2 x (error of the same math in the input dtype) + a tiny floor.
The triton backend must accept every case here (on the GPU, or through the
Triton interpreter on the CPU); other backends skip with their reasons.
"""
import pytest
import torch

import fastattn
from fastattn.inputs import AttentionCall
from fastattn.testing import assert_close_by_rule, assert_lse_close, reference_attention

from .conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16]
KERNEL_BACKENDS = [name for name in fastattn.registered_backends() if name != "sdpa"] + ["sdpa"]


def run_backend(name, call):
    backend = fastattn.registered_backends()[name]
    reasons = backend.not_supported_reasons(call.features)
    if reasons:
        if name == "triton":  # the main kernel must run every case of this grid
            pytest.fail("triton refused a case it must support: " + "; ".join(reasons))
        pytest.skip(f"{name}: " + "; ".join(reasons))
    return backend.run(call)


def make(B, Hq, Hkv, L, S, E, Ev=None, dtype=torch.float16, layout="bhld"):
    """Random q, k, v in (B, H, L, E) shape; layout 'blhd' makes them transposed views of (B, L, H, E) buffers."""
    Ev = E if Ev is None else Ev

    def rand(b, h, n, d):
        if layout == "blhd":
            return torch.randn(b, n, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)

    return rand(B, Hq, L, E), rand(B, Hkv, S, E), rand(B, Hkv, S, Ev)


def check(name, q, k, v, **features):
    """Run backend ``name`` and hold out (and lse) to the accuracy rule.

    The call first goes without asking for the lse; a backend that then returns none
    (the sdpa backend's torch path) runs it again asking for it (its exact-math path),
    so every path of every backend meets the grid."""
    ref_kwargs = {key: val for key, val in features.items() if key != "scale"}
    scale = features.get("scale") or q.shape[-1] ** -0.5
    window = ref_kwargs.get("window", (-1, -1))
    plain = {key: val for key, val in ref_kwargs.items() if key != "window"}
    ref, ref_lse = reference_attention(q, k, v, scale=scale, window=window, **plain)
    ref_lowp, _ = reference_attention(q, k, v, scale=scale, window=window, compute_dtype=None, **plain)
    results = []
    for want_lse in (False, True):
        call = AttentionCall(q=q, k=k, v=v, scale=scale, want_lse=want_lse, **ref_kwargs)
        out, lse = run_backend(name, call)
        assert out.dtype == q.dtype and out.device == q.device
        assert_close_by_rule(out, ref.to(torch.float32), ref_lowp)
        assert lse is not None or not want_lse, f"{name} returned no lse when asked for it"
        if lse is not None:
            check_lse(lse, ref_lse)
            return out, lse
        results.append((out, lse))
    return results[-1]


check_lse = assert_lse_close


SHAPES = [(1, 239), (113, 203), (203, 113), (128, 128)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [59, 111, 256])
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_grid(backend, dtype, head_dim, L, S, causal):
    q, k, v = make(1, 2, 2, L, S, head_dim, dtype=dtype)
    check(backend, q, k, v, causal=causal != "none", lower_right=causal == "bottom_right")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [8, 16, 32, 64, 80, 96, 128, 160, 192, 224])
def test_head_dims(backend, dtype, head_dim):
    q, k, v = make(2, 2, 1, 37, 45, head_dim, dtype=dtype)
    check(backend, q, k, v, causal=True, lower_right=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("E,Ev", [(64, 40), (59, 128), (32, 256)])
def test_value_head_dim_differs(backend, dtype, E, Ev):
    q, k, v = make(1, 2, 2, 33, 50, E, Ev, dtype=dtype)
    check(backend, q, k, v)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_gqa(backend, dtype, kv_heads, monkeypatch):
    q, k, v = make(2, 8, kv_heads, 40, 51, 64, dtype=dtype)
    if backend != "sdpa" and kv_heads < 8:
        # A kernel reads each K/V head once for its whole group: nothing may repeat K/V into
        # Hq heads first (the fallback may; torch's SDPA does with enable_gqa on some paths).
        def refuse(*args, **kwargs):
            raise AssertionError(f"the {backend} backend repeated K/V heads instead of reading them per group")

        for owner in (torch, torch.Tensor):
            monkeypatch.setattr(owner, "repeat_interleave", refuse)
        monkeypatch.setattr(torch.Tensor, "repeat", refuse)
        monkeypatch.setattr(torch.Tensor, "expand", refuse)
    call = AttentionCall(q=q, k=k, v=v, scale=64 ** -0.5, causal=True)
    out, _ = run_backend(backend, call)
    monkeypatch.undo()
    ref, _ = reference_attention(q, k, v, causal=True)
    ref_lowp, _ = reference_attention(q, k, v, causal=True, compute_dtype=None)
    assert_close_by_rule(out, ref.float(), ref_lowp)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", ["B11S", "11LS", "BHLS", "1HL1"])
def test_masks(backend, dtype, kind, shape):
    B, H, L, S = 2, 3, 29, 47
    q, k, v = make(B, H, H, L, S, 64, dtype=dtype)
    dims = {"B11S": (B, 1, 1, S), "11LS": (1, 1, L, S), "BHLS": (B, H, L, S), "1HL1": (1, H, L, 1)}[shape]
    if kind == "bool":
        mask = torch.rand(dims, device=DEVICE) > 0.3
    else:
        mask = torch.randn(dims, device=DEVICE, dtype=dtype)
        mask = mask.masked_fill(torch.rand(dims, device=DEVICE) < 0.2, float("-inf"))
    check(backend, q, k, v, mask=mask)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_padding_mask_with_causal(backend, dtype):
    """Left padding as Transformers builds it: a (B, 1, 1, S) key mask on top of causal."""
    B, H, L = 3, 2, 37
    q, k, v = make(B, H, H, L, L, 64, dtype=dtype)
    lengths = torch.tensor([37, 20, 1], device=DEVICE)
    mask = (torch.arange(L, device=DEVICE)[None, :] >= L - lengths[:, None]).view(B, 1, 1, L)
    check(backend, q, k, v, mask=mask, causal=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("window", [(8, 0), (5, 3), (-1, 4), (16, -1), (0, 0)])
@pytest.mark.parametrize("lower_right", [False, True], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(45, 70), (70, 45)])
def test_window(backend, dtype, window, lower_right, L, S):
    q, k, v = make(1, 2, 2, L, S, 32, dtype=dtype)
    check(backend, q, k, v, window=window, lower_right=lower_right)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(backend, dtype, causal):
    q, k, v = make(1, 2, 2, 40, 57, 64, dtype=dtype)
    check(backend, q * 3, k * 3, v, softcap=5.0, causal=causal, lower_right=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(backend, dtype, per_batch, causal):
    B, H = 2, 4
    q, k, v = make(B, H, 2, 40, 57, 64, dtype=dtype)
    slopes = torch.rand((B if per_batch else 1), H, device=DEVICE, dtype=torch.float32)
    check(backend, q, k, v, alibi_slopes=slopes, causal=causal, lower_right=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_sinks(backend, dtype):
    q, k, v = make(2, 4, 2, 33, 41, 64, dtype=dtype)
    sinks = torch.randn(4, device=DEVICE, dtype=torch.float32) * 2
    check(backend, q, k, v, sinks=sinks, causal=True, window=(9, 0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_everything_at_once(backend, dtype):
    B, H = 2, 4
    q, k, v = make(B, H, 1, 50, 66, 80, 48, dtype=dtype)
    mask = torch.rand(B, 1, 50, 66, device=DEVICE) > 0.2
    check(backend, q, k, v, mask=mask, window=(20, 2), lower_right=True, softcap=4.0,
          alibi_slopes=torch.rand(B, H, device=DEVICE), scale=0.2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["blhd", "sliced", "expanded_batch", "last_dim_strided"])
def test_strides(backend, dtype, layout):
    B, H, L, S, E = 2, 2, 31, 43, 64
    if layout == "blhd":  # (B, L, H, E) buffers seen as (B, H, L, E), as Transformers and flash-attn pass them
        q, k, v = make(B, H, H, L, S, E, dtype=dtype, layout="blhd")
    elif layout == "sliced":  # heads taken out of a fused qkv projection
        qkv = torch.randn(B, L, 3, H, E, device=DEVICE, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        S = L
    elif layout == "expanded_batch":  # one K/V shared by every batch row (stride 0)
        q, k, v = make(B, H, H, L, S, E, dtype=dtype)
        k, v = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    else:  # the last dim is not contiguous
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in make(B, H, H, L, S, E, dtype=dtype))
    check(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("how", ["bool_rows", "additive_rows", "bottom_right_L_gt_S", "window_misses"])
def test_rows_with_no_visible_key(backend, dtype, how):
    B, H, L, S = 1, 2, 40, 24
    q, k, v = make(B, H, H, L, S, 32, dtype=dtype)
    features = {}
    if how == "bool_rows":
        mask = torch.rand(B, H, L, S, device=DEVICE) > 0.5
        mask[:, :, ::3] = False
        features["mask"] = mask
    elif how == "additive_rows":
        mask = torch.randn(B, 1, L, S, device=DEVICE, dtype=dtype)
        mask[:, :, 5:9] = float("-inf")
        features["mask"] = mask
    elif how == "bottom_right_L_gt_S":  # flash-attn: the first L - S query rows see no key
        features.update(causal=True, lower_right=True)
    else:
        features.update(window=(2, -1), lower_right=False, mask=torch.arange(S, device=DEVICE) < 10)
    out, lse = check(backend, q, k, v, **features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_triton_writes_every_output(dtype):
    """Poison a preallocated output: the kernel must overwrite every element."""
    from fastattn.kernels.triton.flash_fwd import flash_attn_forward

    q, k, v = make(2, 3, 3, 37, 29, 48, 24, dtype=dtype)
    out = torch.full((2, 3, 37, 24), float("nan"), device=DEVICE, dtype=dtype)
    got, lse = flash_attn_forward(q, k, v, scale=0.3, causal_bounds=(-1, 0), out=out)
    assert got.data_ptr() == out.data_ptr()
    ref, ref_lse = reference_attention(q, k, v, scale=0.3, causal=True)
    ref_lowp, _ = reference_attention(q, k, v, scale=0.3, causal=True, compute_dtype=None)
    assert_close_by_rule(out, ref.float(), ref_lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("L", [1, 5, 16])
@pytest.mark.parametrize("features", ["plain", "causal_window", "sinks_mask", "all_masked_row"])
def test_triton_split_kv(dtype, L, features):
    """Split-KV decode path: keys cut into chunks whose partial results are merged
    by their log-sum-exp; chunks that see no key (window, mask) must drop out cleanly."""
    from fastattn.kernels.triton.flash_fwd import flash_attn_forward

    S = 203
    q, k, v = make(2, 4, 2, L, S, 64, dtype=dtype)
    kwargs, ref_kwargs = {}, {}
    if features == "causal_window":
        kwargs = dict(causal_bounds=(40, 0), diag_offset=S - L)
        ref_kwargs = dict(window=(40, 0), lower_right=True)
    elif features in ("sinks_mask", "all_masked_row"):
        mask = torch.rand(2, 1, L, S, device=DEVICE) > 0.5
        if features == "all_masked_row":
            mask[0, :, 0] = False
        sinks = torch.randn(4, device=DEVICE)
        kwargs = dict(mask=mask, sinks=sinks if features == "sinks_mask" else None)
        ref_kwargs = dict(mask=mask, sinks=kwargs["sinks"])
    out, lse = flash_attn_forward(q, k, v, scale=0.125, num_splits=4, **kwargs)
    ref, ref_lse = reference_attention(q, k, v, scale=0.125, **ref_kwargs)
    ref_lowp, _ = reference_attention(q, k, v, scale=0.125, compute_dtype=None, **ref_kwargs)
    assert_close_by_rule(out, ref.float(), ref_lowp)
    check_lse(lse, ref_lse)


def test_split_count_follows_the_gpu(monkeypatch):
    from fastattn.kernels.triton import flash_fwd

    monkeypatch.setattr(flash_fwd._device, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert flash_fwd.choose_num_splits(programs=32, seqlen_k=65536, block_n=128, device=cuda) == 9
    assert flash_fwd.choose_num_splits(programs=32, seqlen_k=512, block_n=128, device=cuda) == 1
    assert flash_fwd.choose_num_splits(programs=4096, seqlen_k=65536, block_n=128, device=cuda) == 1
    assert flash_fwd.choose_num_splits(programs=1, seqlen_k=1 << 20, block_n=128, device=cuda) == 64
    assert flash_fwd.choose_num_splits(programs=1, seqlen_k=1 << 20, block_n=128, device=torch.device("cpu")) == 1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("lower_right", [False, True])
def test_causal_together_with_a_mask(backend, lower_right):
    """Integrations pass causal and a padding mask in one call (SDPA's front end cannot)."""
    q, k, v = make(2, 2, 2, 21, 30, 32)
    mask = torch.rand(2, 1, 1, 30, device=DEVICE) > 0.3
    check(backend, q, k, v, mask=mask, causal=True, lower_right=lower_right)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_additive_mask_at_float32_min(backend):
    """Eager-style masks use finfo(float32).min, not -inf. Keys so masked drop out
    like -inf ones; a row masked entirely that way is, as in torch, a softmax over
    equal scores (the mean of V), not a row of zeros."""
    if backend == "sdpa" and DEVICE == "cuda":
        pytest.xfail("torch's fused CUDA SDPA returns NaN for fp16 rows masked with finfo(float32).min "
                     "(seen on H100, torch 2.11); the sdpa backend passes torch's result through")
    q, k, v = make(1, 2, 2, 19, 23, 32)
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(1, 1, 19, 23, device=DEVICE)
    mask[..., 5:] = lowest
    mask[..., 3, :] = lowest
    call = AttentionCall(q=q, k=k, v=v, scale=32 ** -0.5, mask=mask)
    out, _ = run_backend(backend, call)
    as_bool = mask > lowest
    as_bool[..., 3, :] = True  # the reference for that row: every key, equal scores
    q_row3 = q.clone()
    q_row3[..., 3, :] = 0
    ref, _ = reference_attention(q_row3, k, v, mask=as_bool)
    ref_lowp, _ = reference_attention(q_row3, k, v, mask=as_bool, compute_dtype=None)
    assert_close_by_rule(out, ref.float(), ref_lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("group,L", [(2, 1), (4, 3), (8, 16), (4, 40)])
@pytest.mark.parametrize("features", ["causal_window", "head_mask_alibi_sinks", "key_padding"])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_pack_gqa(dtype, group, L, features, splits):
    """Packed GQA (decode): one program serves all query heads of a K/V head, rows
    running over (head, position). Per-head inputs (masks with a head dim, ALiBi
    slopes, sinks) must follow each row's own head."""
    from fastattn.kernels.triton.flash_fwd import flash_attn_forward

    B, Hkv, S = 2, 2, 150
    q, k, v = make(B, Hkv * group, Hkv, L, S, 64, dtype=dtype, layout="blhd")
    if features == "causal_window":
        kwargs = dict(causal_bounds=(60, 0), diag_offset=S - L)
        ref_kwargs = dict(window=(60, 0), lower_right=True)
    elif features == "key_padding":  # (B, 1, 1, S): read as one mask row per tile
        mask = (torch.arange(S, device=DEVICE) < torch.tensor([[S], [37]], device=DEVICE)).view(B, 1, 1, S)
        kwargs = ref_kwargs = dict(mask=mask)
    else:
        mask = torch.rand(B, Hkv * group, L, S, device=DEVICE) > 0.4
        slopes = torch.rand(B, Hkv * group, device=DEVICE)
        sinks = torch.randn(Hkv * group, device=DEVICE)
        kwargs = dict(mask=mask, alibi_slopes=slopes, sinks=sinks)
        ref_kwargs = dict(mask=mask, alibi_slopes=slopes, sinks=sinks)
    out, lse = flash_attn_forward(q, k, v, scale=0.125, pack_gqa=True, num_splits=splits, **kwargs)
    ref, ref_lse = reference_attention(q, k, v, scale=0.125, **ref_kwargs)
    ref_lowp, _ = reference_attention(q, k, v, scale=0.125, compute_dtype=None, **ref_kwargs)
    assert_close_by_rule(out, ref.float(), ref_lowp)
    check_lse(lse, ref_lse)
