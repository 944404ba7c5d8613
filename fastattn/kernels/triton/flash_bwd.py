"""Flash-attention backward in Triton.

Same conventions as flash_fwd.py: scores in log2 units (exp2), fp32 accumulation,
explicit strides, masks read with their broadcast dims unexpanded, and the key
range of a tile visited in up to three runs (the left window edge, the interior
with no per-element bound checks, the causal/right edge and the end of the keys).
The probabilities are recomputed from the forward's log-sum-exp; nothing of size
L x S is kept.

The split: three kernels, no atomics.
- preprocess: delta = rowsum(dO * O) (minus dLSE when the LSE has a gradient), and
  with sinks each row block's share of d_sinks (summed by torch afterwards);
- dK/dV: one program per (key block, batch, K/V head) holds its dK/dV tile and loops
  over the query blocks that can see it, of every query head of its GQA group, so
  the group sum happens in registers, K/V are never repeated in memory;
- dQ: one program per (query block, batch, query head) loops over key blocks.
Per-sequence layouts (packed cu_seqlens, seqused) use the forward's constexpr flags:
programs are launched for the longest sequence, read their sequence's offsets and
lengths, and exit when past its end; the preprocess runs over the stored rows as they
are, whatever sequence they belong to.
Every gradient element is written by exactly one program in a fixed order, so the
results are bitwise identical from run to run by construction: the deterministic
mode costs nothing. The price is computing Q K^T and dO V^T twice (once in each
kernel), about 1.4x the matmul work of the one-kernel split that accumulates dQ
with atomic adds (flash-attn 2's). That split would be faster but
non-deterministic, and would need this one anyway as its deterministic mode;
measuring the difference on the GPU is left to the benchmarks.

The derivative, in natural units: with P = softmax(S) and dP = dO V^T,
dS = P * (dP - delta); dV = P^T dO; dQ = scale * dS' K; dK = scale * dS'^T Q,
where dS' = dS, or dS * (1 - tanh^2) with softcap (S = softcap * tanh(scale * QK^T / softcap)).
ALiBi and masks add to the scores and take no gradient. A sink is a logit with no
value (dP = 0 there): d_sink_h = -sum_(b, i) exp(sink_h - lse_(b,h,i)) * delta_(b,h,i).
Dropout (keep-mask Z regenerated from a seed and an offset, dropout.py): O = (P * Z')V
with Z' = Z / (1 - p), so dV = (P * Z')^T dO, and dP is multiplied by Z' before dS;
delta = rowsum(dO * O) is unchanged, the lse is the undropped softmax's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._env import interpreting
from .dropout import _dropout_keep
from .flash_fwd import (MASK_ADD, MASK_BOOL, MASK_NONE, Sequences, _smaller, _tanh, _to_dtype, cdiv, device_guard,
                        next_power_of_2)

LOG2E = 1.4426950408889634


@triton.jit
def _log2_scores(
    qk, rows, cols, M_base, stride_mm, stride_mn,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, slope,
    CHECK_BOUNDS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """The forward's scores for a tile of raw q.k products, in log2 units, -inf where hidden.

    ``rows`` and ``cols`` are query and key positions shaped to broadcast against
    ``qk``: (M, 1) and (1, N) in the dQ kernel, (1, M) and (N, 1) in the transposed
    dK/dV kernel. Also returns tanh's value (the softcap derivative needs it)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_in)
        s = t * softcap_out
    else:
        t = qk  # unused
        s = qk * qk_scale
    rel = cols - (rows + diag_offset)  # key position relative to the query's diagonal
    if HAS_ALIBI:
        s -= slope * tl.abs(rel).to(tl.float32)
    if MASK_KIND != 0:
        if MASK_PER_ROW:
            in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
            M_ptrs = M_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn
        else:  # key padding, (B, 1, 1, S): one mask row serves every query row
            in_bounds = cols < seqlen_k
            M_ptrs = M_base + cols.to(tl.int64) * stride_mn
    if MASK_KIND == 2:
        bias = tl.load(M_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2.35e38))  # as the forward clamps
        s += bias * 1.4426950408889634
    if CHECK_BOUNDS:
        keep = (rows < seqlen_q) & (cols < seqlen_k)
        if HAS_RIGHT:
            keep = keep & (rel <= window_right)
        if HAS_LEFT:
            keep = keep & (rel >= -window_left)
        s = tl.where(keep, s, float("-inf"))
    if MASK_KIND == 1:
        allowed = tl.load(M_ptrs, mask=in_bounds, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    return s, t


@triton.jit
def _sequence_bounds(
    CuQ, CuK, SeqUsedQ, SeqUsedK, off_b, seqlen_q, seqlen_k, diag_offset,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, SEQUSED_Q: tl.constexpr, SEQUSED_K: tl.constexpr,
    LOWER_RIGHT: tl.constexpr,
):
    """Sequence ``off_b``'s first query and key rows in their storage, its query and key
    counts, and its diagonal, as the forward reads them (``seqlen_*``, ``diag_offset``:
    the launch's values, kept where no flag replaces them)."""
    q_start = off_b * 0
    k_start = off_b * 0
    if VARLEN_Q:
        q_start = tl.load(CuQ + off_b)
        seqlen_q = tl.load(CuQ + off_b + 1) - q_start
    if SEQUSED_Q:
        seqlen_q = tl.load(SeqUsedQ + off_b)
    if VARLEN_K:
        k_start = tl.load(CuK + off_b)
        seqlen_k = tl.load(CuK + off_b + 1) - k_start
    if SEQUSED_K:
        seqlen_k = tl.load(SeqUsedK + off_b)
    if LOWER_RIGHT:
        diag_offset = seqlen_k - seqlen_q
    return q_start, k_start, seqlen_q, seqlen_k, diag_offset


# --------------------------------------------------------------------------- preprocess


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Lse, DLse, Delta, Sinks, SinkPart,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_glb, stride_glh, stride_glm,
    num_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE (fp32, (B, Hq, L) contiguous); with sinks, this row
    block's sum of exp(sink - lse) * delta, into SinkPart[b, h, block]."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    tile_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + rows.to(tl.int64)[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=tile_ok, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + rows.to(tl.int64)[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # lse = log(sum_j exp(s_j)): its gradient adds dlse * P to dS, i.e. shifts delta.
        dlse = tl.load(DLse + off_b.to(tl.int64) * stride_glb + off_h.to(tl.int64) * stride_glh + rows * stride_glm,
                       mask=row_ok, other=0.0)
        delta -= dlse.to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * seqlen_q + rows, delta, mask=row_ok)
    if HAS_SINKS:
        lse = tl.load(Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + rows * stride_lm,
                      mask=row_ok, other=float("inf"))
        sink = tl.load(Sinks + off_h).to(tl.float32)
        share = tl.where(row_ok, tl.exp(sink - lse) * delta, 0.0)
        tl.store(SinkPart + off_bh.to(tl.int64) * tl.num_programs(0) + start_m, tl.sum(share, 0))


# --------------------------------------------------------------------------- dK / dV


@triton.jit
def _dkdv_block(
    dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, M_base, start_m,
    offs_m, offs_n, offs_d, offs_dv,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm, stride_mn,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, slope,
    off_bhq, dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    """One query block's share of a key block's dK and dV. The tile is transposed,
    (keys, queries), so that both products accumulate without a transpose of P."""
    rows = start_m + offs_m
    # Q is read transposed, (BLOCK_D, BLOCK_M). Rows past the end are loaded as zeros
    # and their lse as +inf, so P = 0 there: no row check is needed beyond the loads.
    qT_ptrs = Q_base + tl.cast(start_m, tl.int64) * stride_qm + (offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd)
    do_ptrs = DO_base + tl.cast(start_m, tl.int64) * stride_dom + (offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod)
    if CHECK_BOUNDS:
        qT = tl.load(qT_ptrs, mask=(rows[None, :] < seqlen_q) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        do = tl.load(do_ptrs, mask=(rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    lse = tl.load(Lse_base + rows * stride_lm, mask=rows < seqlen_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta_base + rows, mask=rows < seqlen_q, other=0.0)

    if UPCAST:
        qkT = tl.dot(k.to(tl.float32), qT.to(tl.float32))
    else:
        qkT = tl.dot(k, qT)
    # Key columns past the end are not checked: each key's dK/dV row depends on that
    # key alone, and those rows are never stored.
    sT, tT = _log2_scores(qkT, rows[None, :], offs_n[:, None], M_base, stride_mm, stride_mn,
                          seqlen_q, seqlen_k, diag_offset, window_left, window_right,
                          qk_scale, softcap_in, softcap_out, slope,
                          CHECK_BOUNDS, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI)
    pT = tl.exp2(sT - lse[None, :])  # rows with no visible key: lse = +inf, P = 0
    if HAS_DROPOUT:
        # O = (P * Z / (1 - p)) V with Z the forward's keep-mask: dV and dP see the dropped P.
        keep = _dropout_keep(dropout_seed, dropout_offset, off_bhq, rows[None, :], offs_n[:, None],
                             seqlen_q, seqlen_k, dropout_p)
        pT_used = tl.where(keep, pT * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pT_used = pT
    if UPCAST:
        # Round P and dS to the input dtype as the tensor-core path does, then multiply in fp32.
        dv += tl.dot(_to_dtype(pT_used, do.dtype, UPCAST).to(tl.float32), do.to(tl.float32))
        dpT = tl.dot(v.to(tl.float32), tl.trans(do.to(tl.float32)))
    else:
        dv = tl.dot(pT_used.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
    if HAS_DROPOUT:
        dpT = tl.where(keep, dpT * (1.0 / (1.0 - dropout_p)), 0.0)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    if UPCAST:
        dk += tl.dot(_to_dtype(dsT, qT.dtype, UPCAST).to(tl.float32), tl.trans(qT.to(tl.float32)))
    else:
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, Slopes, CuQ, CuK, SeqUsedQ, SeqUsedK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, kv_group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, sm_scale,
    dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, SEQUSED_Q: tl.constexpr, SEQUSED_K: tl.constexpr,
    LOWER_RIGHT: tl.constexpr,
):
    # Per-sequence layouts as in the forward (all off for a dense call, which compiles as
    # before): VARLEN_Q/K packed rows cu[b]:cu[b+1]; SEQUSED_Q/K only the first seqused[b];
    # then seqlen_q/seqlen_k arrive as the storage's rows (delta's row count) and become
    # the sequence's own, and with LOWER_RIGHT so does the diagonal.
    PER_SEQ: tl.constexpr = VARLEN_Q or VARLEN_K or SEQUSED_Q or SEQUSED_K
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    num_kv_heads = num_heads // kv_group
    off_b = off_bh // num_kv_heads
    off_hk = off_bh % num_kv_heads
    delta_rows = seqlen_q  # delta is (batch entries of q, Hq, rows) contiguous
    delta_b = off_b
    if PER_SEQ:
        q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence_bounds(
            CuQ, CuK, SeqUsedQ, SeqUsedK, off_b, seqlen_q, seqlen_k, diag_offset,
            VARLEN_Q, VARLEN_K, SEQUSED_Q, SEQUSED_K, LOWER_RIGHT)
        if start_n >= seqlen_k:  # the launch covers the longest sequence: past this one's keys
            return
        if VARLEN_Q:
            delta_b = 0  # packed queries: one batch entry
        # The sequence's first rows are added where the bases are formed, not to the
        # pointer arguments: bumped pointers held across the loop spilled registers (sm_90).
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    K_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    col_ok = offs_n < seqlen_k
    k = tl.load(K_base + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query rows that can see a key of this block: [lo, hi). Inside [mid_lo, mid_hi)
    # every row sees every key of the block (up to explicit masks) and lies before
    # the end of the queries, so bounds need no checking there.
    # Row i sees key j when -window_left <= j - (i + diag_offset) <= window_right.
    first_col = start_n
    last_col = start_n + BLOCK_N - 1
    lo = 0
    hi = seqlen_q
    mid_lo = 0
    mid_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(first_col - diag_offset - window_right, 0) // BLOCK_M) * BLOCK_M
        mid_lo = tl.cdiv(tl.maximum(last_col - diag_offset - window_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, tl.maximum(last_col - diag_offset + window_left + 1, 0))
        mid_hi = tl.minimum(mid_hi, (tl.maximum(first_col - diag_offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    mid_lo = tl.minimum(mid_lo, hi)
    mid_hi = tl.maximum(mid_hi, mid_lo)
    lo = tl.minimum(lo, mid_lo)

    # GQA: the query heads of this K/V head, one after the other, into the same dK/dV.
    for g in range(0, kv_group):
        off_h = off_hk * kv_group + g
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        DO_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        Lse_base = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
        Delta_base = Delta + (delta_b * num_heads + off_h).to(tl.int64) * delta_rows
        if PER_SEQ:
            Q_base += q_start.to(tl.int64) * stride_qm
            DO_base += q_start.to(tl.int64) * stride_dom
            Lse_base += q_start.to(tl.int64) * stride_lm
            Delta_base += q_start
        M_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh).to(tl.float32) * 1.4426950408889634
        else:
            slope = 0.0
        for start_m in range(lo, mid_lo, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, M_base, start_m, offs_m, offs_n, offs_d, offs_dv,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm, stride_mn,
                seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
                off_b * num_heads + off_h, dropout_seed, dropout_offset, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT,
                MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
        for start_m in range(mid_lo, mid_hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, M_base, start_m, offs_m, offs_n, offs_d, offs_dv,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm, stride_mn,
                seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
                off_b * num_heads + off_h, dropout_seed, dropout_offset, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, False, HAS_LEFT, HAS_RIGHT,
                MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
        for start_m in range(mid_hi, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, M_base, start_m, offs_m, offs_n, offs_d, offs_dv,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm, stride_mn,
                seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
                off_b * num_heads + off_h, dropout_seed, dropout_offset, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT,
                MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)

    dk = dk * sm_scale
    store_ok = col_ok[:, None]
    if PER_SEQ:
        DK += k_start.to(tl.int64) * stride_dkn
        DV += k_start.to(tl.int64) * stride_dvn
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
             + offs_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _to_dtype(dk, DK.dtype.element_ty, UPCAST), mask=store_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
             + offs_n.to(tl.int64)[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             _to_dtype(dv, DV.dtype.element_ty, UPCAST), mask=store_ok & (offs_dv[None, :] < HEAD_DIM_V))


# --------------------------------------------------------------------------- dQ


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, K_base, V_base, M_base, start_n, rows,
    offs_n, offs_d, offs_dv,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, slope,
    off_bh, dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block's share of a query block's dQ."""
    cols = start_n + offs_n
    # K and V are both read transposed: (BLOCK_D, BLOCK_N) and (BLOCK_DV, BLOCK_N).
    kT_ptrs = K_base + tl.cast(start_n, tl.int64) * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    vT_ptrs = V_base + tl.cast(start_n, tl.int64) * stride_vn + (offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd)
    if CHECK_BOUNDS:
        kT = tl.load(kT_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(vT_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
    else:
        kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        vT = tl.load(vT_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), kT.to(tl.float32))
    else:
        qk = tl.dot(q, kT)
    s, t = _log2_scores(qk, rows[:, None], cols[None, :], M_base, stride_mm, stride_mn,
                        seqlen_q, seqlen_k, diag_offset, window_left, window_right,
                        qk_scale, softcap_in, softcap_out, slope,
                        CHECK_BOUNDS, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI)
    p = tl.exp2(s - lse[:, None])
    if UPCAST:
        dp = tl.dot(do.to(tl.float32), vT.to(tl.float32))
    else:
        dp = tl.dot(do, vT)
    if HAS_DROPOUT:
        keep = _dropout_keep(dropout_seed, dropout_offset, off_bh, rows[:, None], cols[None, :],
                             seqlen_q, seqlen_k, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    if UPCAST:
        dq += tl.dot(_to_dtype(ds, q.dtype, UPCAST).to(tl.float32), tl.trans(kT.to(tl.float32)))
    else:
        dq = tl.dot(ds.to(q.dtype), tl.trans(kT), dq)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, Slopes, CuQ, CuK, SeqUsedQ, SeqUsedK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, kv_group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, sm_scale,
    dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, SEQUSED_Q: tl.constexpr, SEQUSED_K: tl.constexpr,
    LOWER_RIGHT: tl.constexpr,
):
    PER_SEQ: tl.constexpr = VARLEN_Q or VARLEN_K or SEQUSED_Q or SEQUSED_K  # as in the dK/dV kernel
    if HAS_RIGHT:  # causal row blocks get longer with start_m: start the long ones first
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hk = off_h // kv_group
    delta_rows = seqlen_q  # delta is (batch entries of q, Hq, rows) contiguous
    delta_bh = off_bh
    if PER_SEQ:
        q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence_bounds(
            CuQ, CuK, SeqUsedQ, SeqUsedK, off_b, seqlen_q, seqlen_k, diag_offset,
            VARLEN_Q, VARLEN_K, SEQUSED_Q, SEQUSED_K, LOWER_RIGHT)
        if start_m * BLOCK_M >= seqlen_q:  # the launch covers the longest sequence: past this one's queries
            return
        Q += q_start.to(tl.int64) * stride_qm
        DO += q_start.to(tl.int64) * stride_dom
        Lse += q_start.to(tl.int64) * stride_lm
        DQ += q_start.to(tl.int64) * stride_dqm
        Delta += q_start.to(tl.int64)
        if VARLEN_Q:
            delta_bh = off_h  # packed queries: one batch entry
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q

    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + rows.to(tl.int64)[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    # Rows past the end, and rows with no visible key: lse = +inf, so P = 0 and dS = 0.
    lse = tl.load(Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + rows * stride_lm,
                  mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + delta_bh.to(tl.int64) * delta_rows + rows, mask=row_ok, other=0.0)
    K_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    M_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_sb + off_h * stride_sh).to(tl.float32) * 1.4426950408889634
    else:
        slope = 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The forward's three runs of key blocks for this row block.
    first_row = start_m * BLOCK_M
    last_row = first_row + BLOCK_M - 1
    lo = 0
    hi = seqlen_k
    mid_lo = 0
    mid_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.maximum(last_row + diag_offset + window_right + 1, 0))
        mid_hi = tl.minimum(mid_hi, (tl.maximum(first_row + diag_offset + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_LEFT:
        lo = (tl.maximum(first_row + diag_offset - window_left, 0) // BLOCK_N) * BLOCK_N
        mid_lo = tl.cdiv(tl.maximum(last_row + diag_offset - window_left, 0), BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(mid_lo, hi)
    mid_hi = tl.maximum(mid_hi, mid_lo)
    lo = tl.minimum(lo, mid_lo)

    for start_n in range(lo, mid_lo, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, K_base, V_base, M_base, start_n, rows, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
            off_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, K_base, V_base, M_base, start_n, rows, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
            off_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, False, HAS_LEFT, HAS_RIGHT,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    for start_n in range(mid_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, K_base, V_base, M_base, start_n, rows, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_in, softcap_out, slope,
            off_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + rows.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _to_dtype(dq, DQ.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------- block sizes


def block_config(head_dim: int, head_dim_v: int) -> dict:
    """Block sizes and launch shapes of the dK/dV and dQ kernels, ``{"dkdv": {...}, "dq": {...}}``.

    Under the interpreter the blocks are small so that short test sequences still
    cross several blocks and every edge run of both loops executes.

    On the GPU: NOT measured yet (no GPU was lent while this was written). Each kernel
    keeps one operand pair and one fp32 accumulator pair resident and streams the
    other: dK/dV holds K, V and dK, dV (BLOCK_N rows) and streams Q, dO (BLOCK_M
    rows); dQ holds Q, dO and dQ (BLOCK_M rows) and streams K, V (BLOCK_N rows). The
    resident rows should be >= 64 so that Hopper's warpgroup MMA (M = 64 per
    warpgroup) applies, the accumulators must fit registers (dK + dV at D = 128 and
    64 rows are 64 KB of fp32: 64 registers a thread over 8 warps), and the streamed
    tiles times num_stages must fit shared memory (sm_80: 164 KB, sm_90: 227 KB; a
    config that does not fit, e.g. on sm_86/89's 99 KB, steps down). Choices were
    checked by compiling for sm_90 without a GPU (tests/_compile_bwd_kernels.py,
    ptxas of Triton 3.8): no register spills for causal or unmasked calls at head dims
    64, 128 and 256; masks, softcap and dropout spill some in dK/dV (e.g. 24 bytes a
    thread at D = 64 with a bool mask, softcap and ALiBi). At D = 256 the dK/dV tile
    has 32 key rows (64 spilled 144 bytes), too few for wgmma: it runs on mma.sync.
    Packed (varlen) launches take the same configs: their dK/dV kernel at D = 128, causal,
    spills 16 bytes a thread (the sequence's offsets and lengths are registers there,
    kernel arguments in a dense launch); D = 64 and 256 and the dQ kernel spill nothing.
    """
    d = max(head_dim, head_dim_v)
    if interpreting():
        tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return {"dkdv": dict(tiles), "dq": dict(tiles)}
    if d <= 64:
        return {"dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
                "dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)}
    if d <= 128:
        return {"dkdv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3),
                "dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)}
    return {"dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2),
            "dq": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2)}


# --------------------------------------------------------------------------- launcher


def _empty_grad(t: torch.Tensor) -> torch.Tensor:
    """A gradient buffer shaped like ``t``, in its memory layout when it is dense
    (a transposed (B, L, H, D) view stays one), else contiguous (stride-0 broadcasts
    and slices of a fused projection get their own memory)."""
    return torch.empty_like(t, memory_format=torch.preserve_format)


def _check_grad_buffer(name: str, buf, like: torch.Tensor):
    if buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(buf.shape)} {buf.dtype} on {buf.device}")


def _launch(kernel, grid, cfg, may_step_down, *args, **constexprs):
    """Launch with ``cfg``; when it does not fit the GPU's shared memory and the
    config was chosen here, step down until one fits."""
    while True:
        try:
            kernel[grid(cfg)](*args, **constexprs, **cfg)
            return
        except triton.runtime.errors.OutOfResources:
            cfg = _smaller(cfg) if may_step_down else {}
            if not cfg:
                raise


_DENSE = dict(VARLEN_Q=False, VARLEN_K=False, SEQUSED_Q=False, SEQUSED_K=False, LOWER_RIGHT=False)


def _per_sequence(seqs: Optional[Sequences], q, k):
    """The per-sequence part of a launch: (flags, index pointers, launch bounds (L, S) or
    None). ``None`` seqs: a dense launch (q stands in for the unused pointers)."""
    if seqs is None:
        return _DENSE, (q,) * 4, None
    unsupported = [name for name in ("cache_leftpad", "cache_batch_idx", "block_table") if getattr(seqs, name) is not None]
    if unsupported:
        raise ValueError(f"the backward takes packed (cu_seqlens) and seqused layouts only, not {', '.join(unsupported)} "
                         "(KV caches are for inference)")
    flags = dict(VARLEN_Q=seqs.cu_seqlens_q is not None, VARLEN_K=seqs.cu_seqlens_k is not None,
                 SEQUSED_Q=seqs.seqused_q is not None, SEQUSED_K=seqs.seqused_k is not None,
                 LOWER_RIGHT=seqs.lower_right)
    pointers = tuple(q if t is None else t for t in (seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.seqused_q,
                                                     seqs.seqused_k))
    # The launch bounds: the longest sequence, or what the storage holds.
    bounds = (q.shape[2] if seqs.max_seqlen_q is None else seqs.max_seqlen_q,
              k.shape[2] if seqs.max_seqlen_k is None else seqs.max_seqlen_k)
    return flags, pointers, bounds


def _no_batch_stride(strides: tuple, packed: bool) -> tuple:
    """A packed tensor's strides as the kernels read them: sequence b starts at its row, not its batch entry."""
    return (0,) + tuple(strides[1:]) if packed else tuple(strides)


def flash_attn_backward(do, q, k, v, out, lse, *, scale, mask=None, causal_bounds=(-1, -1), diag_offset=0,
                        softcap=0.0, alibi_slopes=None, sinks=None, config=None, dlse=None,
                        dropout_p=0.0, dropout_seed=0, dropout_offset=0, dq=None, dk=None, dv=None,
                        seqs: Optional[Sequences] = None):
    """Gradients of :func:`flash_attn_forward`: ``(dq, dk, dv, dsinks)``.

    Arguments as the forward's: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev),
    any strides (stride-0 broadcast dims included); do, out (B, Hq, L, Ev) any strides;
    lse (B, Hq, L) float32, natural log, as the forward returned it (+inf on rows
    that see no key); mask, causal_bounds, diag_offset, softcap, alibi_slopes, sinks
    exactly as given to the forward. The mask and the slopes get no gradient.
    dlse: optional gradient of the lse output (B, Hq, L).
    dropout_p, dropout_seed, dropout_offset: the forward's attention dropout, whose
    keep-mask is regenerated here (see dropout.py); the lse is that of the undropped P.
    config: ``{"dkdv": ..., "dq": ...}`` block sizes (see block_config), used as given.
    dq, dk, dv: optional preallocated gradient buffers shaped like q, k, v (any strides).
    seqs: the forward's per-sequence layout (:class:`~.flash_fwd.Sequences`), packed
    (``cu_seqlens_q/k``: q, do, out (1, Hq, total_q, .), lse (1, Hq, total_q), k/v
    (1, Hkv, total_k, .)) and/or ``seqused_q/k``; the KV-cache layouts (pages, left
    padding, batch indices) raise. No masks or dropout with it, as in the forward.
    Rows and keys past a sequence's seqused get zero gradients.
    Returns dq, dk, dv in q/k/v's shapes and dtypes (dk, dv with Hkv heads: each GQA
    group's sum) and dsinks (Hq,) float32, or None without sinks. Deterministic:
    no atomics, each element written once by one program.
    """
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if seqs is not None and (mask is not None or dropout_p > 0):
        raise ValueError("an attn_mask or dropout cannot be combined with a per-sequence layout (as in the forward)")
    per_seq_flags, index_args, bounds = _per_sequence(seqs, q, k)
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is not None:
            _check_grad_buffer(name, buf, like)
    dq = _empty_grad(q) if dq is None else dq
    dk = _empty_grad(k) if dk is None else dk
    dv = _empty_grad(v) if dv is None else dv
    if seqs is not None:
        if seqs.seqused_q is not None:  # rows past a sequence's used queries: no program writes them
            dq.zero_()
        if seqs.seqused_k is not None:
            dk.zero_()
            dv.zero_()

    if mask is None:
        mask_kind, mask_arg, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask = mask.expand(B, Hq, L, S)  # a view: broadcast dims get stride 0
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mstrides = mask.stride()
    # A mask that does not change along the query rows (key padding) is read as one row.
    mask_per_row = mask is not None and mstrides[2] != 0
    num_seqs = B if seqs is None else seqs.num_seqs
    if alibi_slopes is None:
        slopes_arg, sstrides = q, (0, 0)
    else:
        slopes_arg = alibi_slopes.expand(num_seqs, Hq)
        sstrides = (slopes_arg.stride(0), slopes_arg.stride(1))

    left, right = causal_bounds
    group = Hq // Hkv
    block_d = max(16, next_power_of_2(E))
    block_dv = max(16, next_power_of_2(Ev))
    may_step_down = config is None
    cfg = config or block_config(E, Ev)
    # delta has q's storage shape: the preprocess reads every stored row, whatever sequence it belongs to.
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    pre_block_m = 16 if interpreting() else 64
    pre_blocks = cdiv(L, pre_block_m)
    sink_part = torch.zeros((B, Hq, pre_blocks), dtype=torch.float32, device=q.device) if sinks is not None else delta
    dlse_arg, dlse_strides = (delta, (0, 0, 0)) if dlse is None else (dlse, dlse.stride())

    common = dict(
        HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=block_d, BLOCK_DV=block_dv,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        MASK_KIND=mask_kind, MASK_PER_ROW=mask_per_row, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=dropout_p > 0, UPCAST=interpreting(), **per_seq_flags,
    )
    # L and S reach the kernels as the storage's rows (delta's row count); with seqs each
    # program reads its sequence's own, and the grid covers the launch bounds.
    scalars = (Hq, group, L, S, diag_offset, left, right,
               scale * LOG2E,
               (scale / softcap) if softcap > 0 else 0.0,
               (softcap * LOG2E) if softcap > 0 else 0.0,
               scale, dropout_seed, dropout_offset, dropout_p)
    grid_l, grid_s = (L, S) if bounds is None else bounds
    q_strides, do_strides, lse_strides, dq_strides = (
        _no_batch_stride(t.stride(), per_seq_flags["VARLEN_Q"]) for t in (q, do, lse, dq))
    k_strides, v_strides, dk_strides, dv_strides = (
        _no_batch_stride(t.stride(), per_seq_flags["VARLEN_K"]) for t in (k, v, dk, dv))
    with device_guard(q.device):
        if B * Hq * L > 0:
            _bwd_preprocess_kernel[(pre_blocks, B * Hq)](
                out, do, lse, dlse_arg, delta, q if sinks is None else sinks, sink_part,
                *out.stride(), *do.stride(), *lse.stride(), *dlse_strides,
                Hq, L,
                HEAD_DIM_V=Ev, BLOCK_DV=block_dv, BLOCK_M=pre_block_m,
                HAS_DLSE=dlse is not None, HAS_SINKS=sinks is not None,
                num_warps=4,
            )
        if num_seqs * Hkv * grid_s > 0:
            _launch(_flash_bwd_dkdv_kernel, lambda c: (cdiv(grid_s, c["BLOCK_N"]), num_seqs * Hkv),
                    dict(cfg["dkdv"]), may_step_down,
                    q, k, v, do, lse, delta, dk, dv, mask_arg, slopes_arg, *index_args,
                    *q_strides, *k_strides, *v_strides, *do_strides, *lse_strides,
                    *dk_strides, *dv_strides, *mstrides, *sstrides, *scalars, **common)
        if num_seqs * Hq * grid_l > 0:
            _launch(_flash_bwd_dq_kernel, lambda c: (cdiv(grid_l, c["BLOCK_M"]), num_seqs * Hq),
                    dict(cfg["dq"]), may_step_down,
                    q, k, v, do, lse, delta, dq, mask_arg, slopes_arg, *index_args,
                    *q_strides, *k_strides, *v_strides, *do_strides, *lse_strides,
                    *dq_strides, *mstrides, *sstrides, *scalars, **common)
    dsinks = None
    if sinks is not None:
        # A fixed-shape torch reduction: the same order on every run.
        dsinks = -sink_part.sum(dim=(0, 2))
    return dq, dk, dv, dsinks
