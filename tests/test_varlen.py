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
    lens, used_q, used_k = [10, 20, 3], [4, 20, 0], [7, 1, 3]
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
        start = torch.tensor([s - (leftpad[b] if leftpad else 0) for b, s in enumerate(seqlens)], device=DEVICE)
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
