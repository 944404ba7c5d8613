"""Packed variable-length batches and KV caches (dense, indexed, left-padded, paged), through
the public flash-attn front ends, on the triton kernel and on the sdpa fallback.

Each case draws fresh inputs, poisons what the kernel writes, and holds outputs and
log-sum-exps to flash-attn's rule against an fp64 reference computed sequence by sequence
(``fastattn.testing.reference_attention`` on each sequence's own q/k/v, its own diagonal).
The rotary reference below is the tests' own, written from the definition as complex
multiplication, apart from ``fastattn.kvcache``.
"""
import pytest
import torch

import fastattn
from fastattn.inputs import InvalidInputError
from fastattn.testing import assert_close_by_rule, reference_attention

from .conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16]
BACKENDS = ["triton", "sdpa"]
LENGTHS = [1, 2, 0, 17, 113, 239]  # flash-attn's awkward lengths, with an empty sequence


def cu(lengths):
    return torch.tensor([0] + list(lengths), device=DEVICE).cumsum(0).to(torch.int32)


def per_sequence_reference(qs, ks, vs, **kw):
    """Reference (out, lse) and the same math in the input dtype, each sequence on its own:
    qs[b] (Lb, H, E), ks[b]/vs[b] (Sb, Hk, E). Returns packed (total, H, Ev) outputs and (H, total) lse."""
    outs, lses, lows = [], [], []
    for q, k, v in zip(qs, ks, vs):
        args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        ref, lse = reference_attention(*args, lower_right=True, **kw)
        low, _ = reference_attention(*args, lower_right=True, compute_dtype=None, **kw)
        outs.append(ref[0].transpose(0, 1))
        lows.append(low[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), torch.cat(lows)


def check_lse(lse, ref_lse):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: +inf exactly on rows with no visible key"
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-2, rtol=1e-3)


def check(out, lse, ref, ref_lse, low):
    assert_close_by_rule(out, ref.float(), low)
    check_lse(lse, ref_lse)


def causal_kwargs(kind):
    return {"none": {}, "causal": {"causal": True}, "window": {"window": (7, 3)}}[kind]


def api_kwargs(kind):
    return {"none": {}, "causal": {"causal": True}, "window": {"window_size": (7, 3)}}[kind]


# --------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["none", "causal", "window"])
def test_varlen(backend, dtype, kind):
    lens_q = LENGTHS
    lens_k = [n + extra for n, extra in zip(LENGTHS, [0, 5, 3, 0, 20, 1])]  # own diagonal per sequence
    H, Hk, E = 2, 1, 32
    qs = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens_q]
    ks = [torch.randn(n, Hk, E, device=DEVICE, dtype=dtype) for n in lens_k]
    vs = [torch.randn(n, Hk, E, device=DEVICE, dtype=dtype) for n in lens_k]
    with fastattn.use_backend(backend):
        out, lse, _ = fastattn.flash_attn_varlen_func(
            torch.cat(qs), torch.cat(ks), torch.cat(vs), cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
            return_attn_probs=True, **api_kwargs(kind))
    assert out.shape == (sum(lens_q), H, E) and lse.shape == (H, sum(lens_q))
    check(out, lse, *per_sequence_reference(qs, ks, vs, **causal_kwargs(kind)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_varlen_features(dtype):
    """Head dims that differ, GQA, softcap, ALiBi per sequence and sinks together, on short sequences."""
    lens = [3, 0, 40, 17]
    H, Hk, E, Ev = 4, 2, 59, 40
    qs = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens]
    ks = [torch.randn(n + 2, Hk, E, device=DEVICE, dtype=dtype) for n in lens]
    vs = [torch.randn(n + 2, Hk, Ev, device=DEVICE, dtype=dtype) for n in lens]
    slopes = torch.rand(len(lens), H, device=DEVICE)
    sinks = torch.randn(H, device=DEVICE)
    with fastattn.use_backend("triton"):
        out, lse = fastattn.flash_attn_varlen_func(
            torch.cat(qs), torch.cat(ks), torch.cat(vs), cu(lens), cu([n + 2 for n in lens]), 40, 42,
            causal=True, softcap=5.0, alibi_slopes=slopes, s_aux=sinks, return_lse=True)
    refs = [per_sequence_reference([q], [k], [v], causal=True, softcap=5.0, alibi_slopes=slopes[b:b + 1], sinks=sinks)
            for b, (q, k, v) in enumerate(zip(qs, ks, vs))]
    ref, ref_lse, low = (torch.cat([r[i] for r in refs], dim=1 if i == 1 else 0) for i in range(3))
    check(out, lse, ref, ref_lse, low)


@pytest.mark.parametrize("max_seqlen", ["int", "tensor", "unknown"])
def test_max_seqlen_forms(max_seqlen):
    """A Python int, a 0-d tensor, or (the GPU tensor case: never read) no value, where the
    storage bounds the launch: the same result."""
    from fastattn.kernels.triton.flash_fwd import Sequences, flash_attn_forward

    lens = [5, 0, 33]
    H, E, dtype = 2, 32, torch.float16
    qs = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens]
    ks = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens]
    vs = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens]
    q, k, v = (torch.cat(t) for t in (qs, ks, vs))
    if max_seqlen == "unknown":
        seqs = Sequences(len(lens), cu(lens), cu(lens), None, None, lower_right=True)
        out, lse = flash_attn_forward(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale=E ** -0.5,
                                      causal_bounds=(-1, 0), seqs=seqs)
        out, lse = out[0].transpose(0, 1), lse[0]
    else:
        m = 33 if max_seqlen == "int" else torch.tensor(33)
        with fastattn.use_backend("triton"):
            out, lse = fastattn.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), m, m, causal=True, return_lse=True)
    check(out, lse, *per_sequence_reference(qs, ks, vs, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_seqused(backend):
    """seqused_q/k: each sequence uses only its first tokens; unused query rows give 0 and lse +inf."""
    lens, used_q, used_k = [10, 20, 3], [4, 20, 0], [7, 0, 3]  # 20 queries with no key: 0, lse +inf
    H, E, dtype = 2, 32, torch.bfloat16
    q = torch.randn(sum(lens), H, E, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lens), H, E, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lens), H, E, device=DEVICE, dtype=dtype)
    c = cu(lens).tolist()
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attn_varlen_func(
            q, k, v, cu(lens), cu(lens), 20, 20, causal=True, return_lse=True,
            seqused_q=torch.tensor(used_q, dtype=torch.int32, device=DEVICE),
            seqused_k=torch.tensor(used_k, dtype=torch.int32, device=DEVICE))
    ref, ref_lse, low = per_sequence_reference([q[c[b]:c[b] + used_q[b]] for b in range(3)],
                                               [k[c[b]:c[b] + used_k[b]] for b in range(3)],
                                               [v[c[b]:c[b] + used_k[b]] for b in range(3)], causal=True)
    rows = torch.cat([torch.arange(c[b], c[b] + used_q[b]) for b in range(3)]).to(DEVICE)
    unused = torch.ones(sum(lens), dtype=torch.bool, device=DEVICE)
    unused[rows] = False
    check(out[rows], lse[:, rows], ref, ref_lse, low)
    assert (out[unused] == 0).all() and (lse[:, unused] == float("inf")).all()


# --------------------------------------------------------------------------- paged


def paged(keys_per_seq, page_size, Hk, E, dtype, spare_pages=3):
    """A shuffled paged cache holding the given per-sequence keys: (k_cache, v_cache, block_table, ks, vs)."""
    B = len(keys_per_seq)
    pages_per_seq = max(1, -(-max(keys_per_seq) // page_size))
    num_pages = B * pages_per_seq + spare_pages
    k_cache = torch.randn(num_pages, page_size, Hk, E, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(num_pages, page_size, Hk, E, device=DEVICE, dtype=dtype)
    table = torch.randperm(num_pages, device=DEVICE)[:B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    ks = [k_cache[table[b].long()].reshape(-1, Hk, E)[:n] for b, n in enumerate(keys_per_seq)]
    vs = [v_cache[table[b].long()].reshape(-1, Hk, E)[:n] for b, n in enumerate(keys_per_seq)]
    return k_cache, v_cache, table, ks, vs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_varlen_paged(backend, dtype, page_size):
    lens_q, lens_k = [3, 0, 17, 1], [40, 9, 17, 300]
    H, Hk, E = 2, 1, 32
    k_cache, v_cache, table, ks, vs = paged(lens_k, page_size, Hk, E, dtype)
    qs = [torch.randn(n, H, E, device=DEVICE, dtype=dtype) for n in lens_q]
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attn_varlen_func(torch.cat(qs), k_cache, v_cache, cu(lens_q), cu(lens_k), 17, 300,
                                                   causal=True, block_table=table, return_lse=True)
    check(out, lse, *per_sequence_reference(qs, ks, vs, causal=True))


@pytest.mark.parametrize("page_size,block_n", [(16, 64), (48, 32), (32, 64)])
def test_pages_smaller_than_a_key_block(page_size, block_n):
    """The kernel's per-key page lookup (pages smaller than, or not dividing, its key block:
    the GPU's 64/128-key blocks with 16-token pages), forced through a config."""
    from fastattn.kernels.triton.flash_fwd import Sequences, flash_attn_forward

    lens_k = [70, 0, 5]
    B, H, Hk, E, L, dtype = 3, 4, 2, 32, 2, torch.float16
    k_cache, v_cache, table, ks, vs = paged(lens_k, page_size, Hk, E, dtype)
    q = torch.randn(B, L, H, E, device=DEVICE, dtype=dtype)
    used = torch.tensor(lens_k, dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out, lse = flash_attn_forward(
            q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), scale=E ** -0.5,
            causal_bounds=(-1, 0), num_splits=splits,
            config=dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=1),
            seqs=Sequences(B, seqused_k=used, block_table=table, lower_right=True))
        ref, ref_lse, low = per_sequence_reference(list(q), ks, vs, causal=True)
        check(out.transpose(1, 2).reshape(-1, H, E), lse.transpose(0, 1).reshape(H, -1), ref, ref_lse, low)


# --------------------------------------------------------------------------- KV cache


def rotary_reference(x, cos, sin, positions, interleaved):
    """Rotation as complex multiplication: channel pairs (2i, 2i+1) when interleaved, (i, i + d/2)
    otherwise, times exp(i * angle) at each token's position."""
    d = 2 * cos.shape[1]
    x64 = x.double()
    rot = x64[..., :d]
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], d // 2, 2).contiguous())
    else:
        z = torch.complex(rot[..., :d // 2], rot[..., d // 2:])
    angle = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))[positions]
    z = z * angle.unsqueeze(2)
    if interleaved:
        rot = torch.view_as_real(z).reshape(*rot.shape)
    else:
        rot = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rot, x64[..., d:]), dim=-1).to(x.dtype)


def kvcache_case(B, L, H, Hk, E, new_len, seqlens, *, capacity, dtype, page_size=None, batch_idx=None, leftpad=None,
                 rotary=None, causal=True, window=(-1, -1), num_splits=0, backend="triton"):
    """Run flash_attn_with_kvcache and check the cache after the append and the output."""
    rotary_dim = 16
    q = torch.randn(B, L, H, E, device=DEVICE, dtype=dtype)
    k_new = torch.randn(B, new_len, Hk, E, device=DEVICE, dtype=dtype) if new_len else None
    v_new = torch.randn(B, new_len, Hk, E, device=DEVICE, dtype=dtype) if new_len else None
    seqlens_t = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    entries = batch_idx if batch_idx is not None else list(range(B))
    if page_size:
        k_cache, v_cache, table, _, _ = paged([capacity] * B, page_size, Hk, E, dtype)
        logical_k = lambda cache: [cache[table[b].long()].reshape(-1, Hk, E) for b in range(B)]  # noqa: E731
    else:
        table = None
        k_cache = torch.randn(max(entries) + 2 if batch_idx else B, capacity, Hk, E, device=DEVICE, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        logical_k = lambda cache: [cache[entries[b]] for b in range(B)]  # noqa: E731
    before_k, before_v = logical_k(k_cache.clone()), logical_k(v_cache.clone())
    kwargs = {}
    positions_q = positions_k = None
    if rotary is not None:
        angles = torch.rand(capacity + L, rotary_dim // 2, device=DEVICE, dtype=torch.float32) * 6.3
        kwargs.update(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype),
                      rotary_interleaved=rotary == "interleaved")
        start = torch.tensor(seqlens, device=DEVICE)  # cache indices, left padding included (flash-attn's rule)
        per_row = causal or window != (-1, -1)
        positions_q = start[:, None] + (torch.arange(L, device=DEVICE) if per_row else torch.zeros(L, dtype=torch.long, device=DEVICE))
        positions_k = start[:, None] + torch.arange(new_len, device=DEVICE)
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens_t, block_table=table, causal=causal,
            window_size=window, num_splits=num_splits, return_softmax_lse=True,
            cache_batch_idx=None if batch_idx is None else torch.tensor(batch_idx, dtype=torch.int32, device=DEVICE),
            cache_leftpad=None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32, device=DEVICE), **kwargs)
    if rotary is not None:
        cos, sin = kwargs["rotary_cos"], kwargs["rotary_sin"]
        q = rotary_reference(q, cos.float(), sin.float(), positions_q, kwargs["rotary_interleaved"])
        if new_len:
            k_new = rotary_reference(k_new, cos.float(), sin.float(), positions_k, kwargs["rotary_interleaved"])
    after_k, after_v = logical_k(k_cache), logical_k(v_cache)
    ks, vs = [], []
    for b, s in enumerate(seqlens):
        want_k, want_v = before_k[b].clone(), before_v[b].clone()
        if new_len:
            want_k[s:s + new_len], want_v[s:s + new_len] = k_new[b], v_new[b]
        # The new keys are rotated in the input dtype by both (fp32 math, one rounding): allow one ulp.
        torch.testing.assert_close(after_k[b], want_k, atol=0, rtol=1e-2 if rotary else 0)
        torch.testing.assert_close(after_v[b], want_v, atol=0, rtol=0)
        first = leftpad[b] if leftpad else 0
        ks.append(after_k[b][first:s + new_len])
        vs.append(after_v[b][first:s + new_len])
    ref, ref_lse, low = per_sequence_reference(list(q), ks, vs, causal=causal, window=window)
    check(out.reshape(-1, H, E), lse.transpose(0, 1).reshape(H, -1), ref, ref_lse, low)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("new_len", [1, 3])
def test_kvcache_append_positions(backend, dtype, new_len):
    """Appends at several positions, from an empty cache up to its last slot."""
    capacity = 40
    seqlens = [0, 5, 17, capacity - new_len]
    kvcache_case(4, 1 if new_len == 1 else 3, 4, 2, 32, new_len, seqlens, capacity=capacity, dtype=dtype,
                 backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_paged(dtype, page_size, num_splits):
    kvcache_case(3, 2, 4, 1, 32, 2, [0, 30, 254], capacity=256, dtype=dtype, page_size=page_size,
                 num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_batch_idx_and_leftpad(backend):
    kvcache_case(3, 1, 2, 2, 32, 1, [9, 20, 4], capacity=24, dtype=torch.float16, batch_idx=[4, 0, 2],
                 leftpad=[3, 0, 4], backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rotary", ["interleaved", "halves"])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(dtype, rotary, causal):
    kvcache_case(2, 3, 2, 1, 32, 3, [0, 11], capacity=30, dtype=dtype, rotary=rotary, causal=causal,
                 leftpad=[0, 4])


def test_kvcache_rotary_paged_window():
    kvcache_case(2, 2, 2, 2, 32, 2, [5, 40], capacity=64, dtype=torch.bfloat16, page_size=16, rotary="halves",
                 causal=False, window=(8, 0))


def test_kvcache_without_seqlens_is_flash_attn_func():
    q = torch.randn(2, 3, 4, 32, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 20, 2, 32, device=DEVICE, dtype=torch.float16)
    v = torch.randn(2, 20, 2, 32, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(fastattn.flash_attn_with_kvcache(q, k, v, causal=True),
                               fastattn.flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)


# --------------------------------------------------------------------------- the rest of the API


def test_merge_attention_states():
    """Attention over two disjoint key halves, merged, is attention over all keys; a part
    that saw no key for a row (here: the causal half after the diagonal) contributes nothing."""
    q = torch.randn(2, 9, 4, 32, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 30, 2, 32, device=DEVICE, dtype=torch.float16)
    v = torch.randn(2, 30, 2, 32, device=DEVICE, dtype=torch.float16)
    full, full_lse, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True)
    a, lse_a, _ = fastattn.flash_attn_func(q, k[:, :13], v[:, :13], return_attn_probs=True)
    b, lse_b, _ = fastattn.flash_attn_func(q, k[:, 13:], v[:, 13:], return_attn_probs=True)
    out, lse = fastattn.merge_attention_states([a, b], [lse_a, lse_b])
    torch.testing.assert_close(out, full, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-4, rtol=0)
    empty = torch.full_like(lse_b, float("inf"))
    out, lse = fastattn.merge_attention_states([a, torch.zeros_like(b)], [lse_a, empty])
    torch.testing.assert_close(out, a, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse, lse_a)
    out, lse = fastattn.merge_attention_states([torch.zeros_like(a)], [empty])
    assert (out == 0).all() and (lse == float("inf")).all()


def test_packed_front_ends():
    qkv = torch.randn(2, 17, 3, 2, 32, device=DEVICE, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    want = fastattn.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(fastattn.flash_attn_qkvpacked_func(qkv, causal=True), want, atol=0, rtol=0)
    torch.testing.assert_close(fastattn.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), causal=True), want,
                               atol=0, rtol=0)
    lens = [17, 17]
    packed = qkv.reshape(34, 3, 2, 32)
    out = fastattn.flash_attn_varlen_qkvpacked_func(packed, cu(lens), 17, causal=True)
    torch.testing.assert_close(out, want.reshape(34, 2, 32), atol=2e-3, rtol=0)
    out = fastattn.flash_attn_varlen_kvpacked_func(packed[:, 0], packed[:, 1:], cu(lens), cu(lens), 17, 17, causal=True)
    torch.testing.assert_close(out, want.reshape(34, 2, 32), atol=2e-3, rtol=0)


def test_window_size_as_a_tensor():
    """flash-attn's own tests pass torch.randint(0, seqlen_k, (2,))."""
    q = torch.randn(1, 20, 2, 32, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 30, 2, 32, device=DEVICE, dtype=torch.float16)
    window = torch.randint(0, 30, (2,))
    torch.testing.assert_close(fastattn.flash_attn_func(q, k, k, window_size=window),
                               fastattn.flash_attn_func(q, k, k, window_size=tuple(window.tolist())), atol=0, rtol=0)
    out = fastattn.flash_attn_varlen_func(q[0], k[0], k[0], cu([20]), cu([30]), 20, 30, window_size=[4, 0])
    torch.testing.assert_close(out, fastattn.flash_attn_func(q, k, k, window_size=(4, 0))[0], atol=0, rtol=0)
    with pytest.raises(TypeError, match="window_size"):
        fastattn.flash_attn_func(q, k, k, window_size=torch.tensor([1.0, 2.0]))


def test_layouts_in_features_and_explain():
    lens = [3, 4]
    q = torch.randn(7, 2, 32, device=DEVICE, dtype=torch.float16)
    decision = fastattn.explain_varlen(q, q, q, cu(lens), cu(lens), 4, 4, causal=True)
    assert decision.features.layout == "varlen"
    assert any("varlen layout" in r for r in decision.reasons("cuda"))
    assert decision.chosen == "triton"
    k_cache, v_cache, table, _, _ = paged([20, 5], 16, 2, 32, torch.float16)
    decision = fastattn.explain_varlen(q, k_cache, v_cache, cu(lens), cu([20, 5]), 4, 20, block_table=table)
    assert decision.features.layout == "paged" and decision.features.page_size == 16


def test_poisoned_output_rows_are_all_written():
    from fastattn.kernels.triton.flash_fwd import Sequences, flash_attn_forward

    lens = [0, 19, 1, 40]
    q = torch.randn(sum(lens), 2, 32, device=DEVICE, dtype=torch.float16)
    out = torch.full((1, 2, sum(lens), 32), float("nan"), device=DEVICE, dtype=torch.float16)
    view = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    flash_attn_forward(view(q), view(q), view(q), scale=0.2, causal_bounds=(-1, 0), out=out,
                       seqs=Sequences(4, cu(lens), cu(lens), 40, 40, lower_right=True))
    assert not torch.isnan(out).any()


# --------------------------------------------------------------------------- bad input


def varlen_args(**change):
    lens = [3, 5, 2]
    q = torch.randn(10, 2, 32, device=DEVICE, dtype=torch.float16)
    args = dict(q=q, k=q, v=q, cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    return args


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("change,error,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8, 10])), InvalidInputError, r"cu_seqlens_q must have dtype torch.int32, got torch.int64"),
    (dict(cu_seqlens_k=[0, 3, 8, 10]), TypeError, r"cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=int32([0, 6, 5, 10])), InvalidInputError, r"non-decreasing.*cu_seqlens_q\[1\] = 6 > cu_seqlens_q\[2\] = 5"),
    (dict(cu_seqlens_q=int32([1, 3, 8, 10])), InvalidInputError, r"must start at 0, got cu_seqlens_q\[0\] = 1"),
    (dict(cu_seqlens_k=int32([0, 3, 8, 9])), InvalidInputError, r"end at the number of tokens \(10\), got cu_seqlens_k\[-1\] = 9"),
    (dict(cu_seqlens_k=int32([0, 3, 10])), InvalidInputError, r"cu_seqlens_k must have shape"),
    (dict(max_seqlen_q=4), InvalidInputError, r"max_seqlen_q=4 is smaller than sequence 1, which has 5 tokens"),
    (dict(max_seqlen_k=torch.tensor(2)), InvalidInputError, r"max_seqlen_k=2 is smaller than sequence 1, which has 5 tokens"),
    (dict(max_seqlen_k=5.0), TypeError, r"max_seqlen_k must be an int or a 0-d integer tensor"),
    (dict(seqused_k=int32([3, 6, 2])), InvalidInputError, r"seqused_k\[1\] = 6 is outside \[0, 5\]"),
])
def test_bad_varlen_input(change, error, match):
    with pytest.raises(error, match=match):
        fastattn.flash_attn_varlen_func(**varlen_args(**change))


def test_bad_paged_input():
    q = torch.randn(4, 2, 32, device=DEVICE, dtype=torch.float16)
    k_cache, v_cache, table, _, _ = paged([20, 30], 16, 2, 32, torch.float16, spare_pages=0)
    args = (q, k_cache, v_cache, cu([2, 2]), cu([20, 30]), 2, 30)
    bad = table.clone()
    bad[1, 1] = k_cache.shape[0]
    with pytest.raises(InvalidInputError, match=r"block_table\[1, 1\] = 4 points outside the cache \(pages 0..3\)"):
        fastattn.flash_attn_varlen_func(*args, block_table=bad)
    bad = table.clone()
    bad[1, 1] = -1  # outside the cache, but on a page sequence 1 does not use when it has 16 keys
    fastattn.flash_attn_varlen_func(q, k_cache, v_cache, cu([2, 2]), cu([20, 16]), 2, 30, block_table=bad)
    with pytest.raises(InvalidInputError, match="block_table"):
        fastattn.flash_attn_varlen_func(*args, block_table=bad)
    small = torch.randn(6, 8, 2, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(InvalidInputError, match=r"pages of 8 tokens.*multiple of 16"):
        fastattn.flash_attn_varlen_func(q, small, small, cu([2, 2]), cu([8, 8]), 2, 8, block_table=int32([[0], [1]]))
    with pytest.raises(InvalidInputError, match=r"pages of 24 tokens"):
        fastattn.flash_attn_with_kvcache(q.view(2, 2, 2, 32), torch.randn(4, 24, 2, 32, dtype=torch.float16, device=DEVICE),
                                         torch.randn(4, 24, 2, 32, dtype=torch.float16, device=DEVICE),
                                         cache_seqlens=3, block_table=int32([[0], [1]]))


@pytest.mark.parametrize("page_size", [None, 16])
def test_refused_append_leaves_the_cache_untouched(page_size):
    B, capacity = 2, 32
    q = torch.randn(B, 3, 2, 32, device=DEVICE, dtype=torch.float16)
    new = torch.randn(B, 3, 2, 32, device=DEVICE, dtype=torch.float16)
    if page_size:
        k_cache, v_cache, table, _, _ = paged([capacity] * B, page_size, 2, 32, torch.float16)
    else:
        k_cache = torch.randn(B, capacity, 2, 32, device=DEVICE, dtype=torch.float16)
        v_cache, table = torch.randn_like(k_cache), None
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(InvalidInputError, match=r"cache_seqlens\[1\] = 30 is outside \[0, 29\] \(appending 3 tokens"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=int32([29, 30]),
                                         block_table=table)
    with pytest.raises(InvalidInputError, match=r"cache_seqlens must have dtype torch.int32"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=torch.tensor([1, 2]),
                                         block_table=table)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    with pytest.raises(InvalidInputError, match=r"rotary_cos has 20 positions but position 22 is needed"):
        angles = torch.rand(20, 8, device=DEVICE)
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, angles.cos(), angles.sin(),
                                         cache_seqlens=int32([20, 1]), block_table=table, causal=True)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    if page_size is None:
        with pytest.raises(InvalidInputError, match=r"cache_batch_idx\[0\] = 2 is outside \[0, 1\]"):
            fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1,
                                             cache_batch_idx=int32([2, 0]))
        assert torch.equal(k_cache, before[0])


# --------------------------------------------------------------------------- torch.compile


def test_compiled_decode_step_appends_in_place_and_does_not_recompile():
    """A kvcache decode step under torch.compile (fullgraph): the in-place append is traced as
    the mutation it is (the caller's cache changes), the kernel enters as its custom op, and
    new cache lengths (tensors) reuse the graph."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q, k_cache, v_cache, k, v, seqlens, table):
        return fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                causal=True)

    dtype = torch.float16
    k_cache, v_cache, table, _, _ = paged([64, 64], 16, 2, 32, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    for lengths in ([3, 40], [9, 0], [63, 20]):
        q = torch.randn(2, 1, 4, 32, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(2, 1, 2, 32, device=DEVICE, dtype=dtype) for _ in range(2))
        cache_k, cache_v = k_cache.clone(), v_cache.clone()
        with fastattn.use_backend("triton"):
            got = compiled(q, k_cache, v_cache, k, v, int32(lengths), table)
        want = step(q, cache_k, cache_v, k, v, int32(lengths), table)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert torch.equal(k_cache, cache_k) and torch.equal(v_cache, cache_v)  # both appended the same token
    assert len(graphs) == 1, f"recompiled for new cache lengths: {len(graphs)} graphs"
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.fastattn.triton_varlen_fwd.default in targets


def test_compiled_varlen():
    lens = [5, 0, 12]
    q = torch.randn(17, 2, 32, device=DEVICE, dtype=torch.bfloat16)

    def attend(q, cu_q):
        return fastattn.flash_attn_varlen_func(q, q, q, cu_q, cu_q, 12, 12, causal=True) * 2

    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        got = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, cu(lens))
        torch.testing.assert_close(got, attend(q, cu(lens)), atol=0, rtol=0)
