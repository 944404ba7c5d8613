"""Flash-attention forward in Triton.

Reads top to bottom: the block update (inner loop), the kernel, the block-size
table next to it, the launcher. One program computes BLOCK_M query rows of one
(batch, head) against all the key blocks that can be visible to them, with the
online softmax in the exp2 domain and fp32 accumulation.

Key blocks are visited in up to three runs: the ones that straddle the left
edge of the window, the ones fully inside every bound (no per-element masking,
the hot loop), and the ones that straddle the causal/right edge or the end of
the keys. Explicit masks and ALiBi are applied in every block.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ... import _device
from ..._env import interpreting
from ...ops.layout import empty_outputs
from .dropout import _dropout_keep

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): no overflow to NaN for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _to_dtype(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even as the GPU's cast does. The interpreter
    (Triton 3.8) truncates float32 -> bfloat16 and ignores ``fp_downcast_rounding``,
    which biases every rounded product and output by up to one ulp: round the bits here."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _block_update(
    acc, m_i, l_i, q, K_base, V_base, M_base, m_rows, start_n,
    row_pos, row_valid, offs_n, offs_d, offs_dv,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, slope,
    Pages, stride_kpage, stride_vpage,
    drop_bh, dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    cols = start_n + offs_n
    # Tile pointers are formed here from scalar bases rather than kept across the loop:
    # a (128 x 64) tile of 64-bit pointers held live costs 64 registers a thread and
    # made the kernel spill. K is read transposed: a (BLOCK_D, BLOCK_N) tile.
    if PAGE_SIZE == 0:
        K_ptrs = K_base + tl.cast(start_n, tl.int64) * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
        V_ptrs = V_base + tl.cast(start_n, tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
    elif PAGE_SIZE % BLOCK_N == 0:
        # Paged K/V, the key block inside one page: one page number for the tile
        # (start_n < seqlen_k, so the page is one the sequence uses).
        page = tl.load(Pages + start_n // PAGE_SIZE).to(tl.int64)
        slot = start_n % PAGE_SIZE
        K_ptrs = K_base + page * stride_kpage + slot * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
        V_ptrs = V_base + page * stride_vpage + slot * stride_vn + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
    else:
        # Pages smaller than the key block (or not a divisor of it): a page number per key.
        pages = tl.load(Pages + cols // PAGE_SIZE, mask=cols < seqlen_k, other=0).to(tl.int64)
        slots = cols % PAGE_SIZE
        K_ptrs = K_base + (pages * stride_kpage + slots * stride_kn)[None, :] + offs_d[:, None] * stride_kd
        V_ptrs = V_base + (pages * stride_vpage + slots * stride_vn)[:, None] + offs_dv[None, :] * stride_vd
    if CHECK_BOUNDS:
        k = tl.load(K_ptrs,
                    mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(K_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(K_ptrs)
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
    else:
        qk = tl.dot(q, k)

    if HAS_SOFTCAP:
        qk = _tanh(qk * softcap_in) * softcap_out  # softcap * tanh(s * scale / softcap), in log2 units
    else:
        qk = qk * qk_scale

    rel = cols[None, :] - (row_pos[:, None] + diag_offset)  # key position relative to the query's diagonal
    if HAS_ALIBI:
        qk -= slope[:, None] * tl.abs(rel).to(tl.float32)
    if MASK_KIND != 0:
        if MASK_PER_ROW:
            in_bounds = row_valid[:, None] & (cols[None, :] < seqlen_k)
            M_ptrs = M_base + m_rows[:, None] + cols[None, :].to(tl.int64) * stride_mn
        else:
            # One mask row for the whole tile (key padding, (B, 1, 1, S)): a (BLOCK_N,)
            # load instead of a (BLOCK_M, BLOCK_N) gather and its 64-bit pointer tile.
            in_bounds = cols < seqlen_k
            M_ptrs = M_base + tl.max(m_rows, 0) + cols.to(tl.int64) * stride_mn
    if MASK_KIND == 2:
        bias = tl.load(M_ptrs, mask=in_bounds, other=0.0)
        # Masks filled with finfo(float32).min would overflow to -inf in log2 units,
        # turning "very unlikely" (torch still normalizes such a row) into "masked":
        # clamp finite values, keep -inf.
        bias = bias.to(tl.float32)
        bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2.35e38))
        if MASK_PER_ROW:
            qk += bias * 1.4426950408889634
        else:
            qk += bias[None, :] * 1.4426950408889634

    if CHECK_BOUNDS:
        keep = cols[None, :] < seqlen_k
        if HAS_RIGHT:
            keep = keep & (rel <= window_right)
        if HAS_LEFT:
            keep = keep & (rel >= -window_left)
        qk = tl.where(keep, qk, float("-inf"))
    if MASK_KIND == 1:
        allowed = tl.load(M_ptrs, mask=in_bounds, other=0)
        if MASK_PER_ROW:
            qk = tl.where(allowed != 0, qk, float("-inf"))
        else:
            qk = tl.where(allowed[None, :] != 0, qk, float("-inf"))

    # Online softmax; rows that have seen no visible key keep m = -inf and contribute nothing.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # Dropout acts on the probabilities that multiply V only: l_i (so the lse and the
        # normalisation) stays the undropped softmax's, as the backward assumes. Element
        # (row head, row position, key) draws the same Philox number as in the backward.
        keep = _dropout_keep(dropout_seed, dropout_offset, drop_bh[:, None], row_pos[:, None], cols[None, :],
                             seqlen_q, seqlen_k, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)

    if CHECK_BOUNDS:
        v = tl.load(V_ptrs,
                    mask=(cols[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    elif BLOCK_DV != HEAD_DIM_V:
        v = tl.load(V_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    else:
        v = tl.load(V_ptrs)
    if UPCAST:
        # Round P to the input dtype as the tensor-core path does, then multiply in fp32.
        acc += tl.dot(_to_dtype(p, v.dtype, UPCAST).to(tl.float32), v.to(tl.float32))
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


# The dropout seed and offset change every training step: not specializing them (on the
# value 1 or divisibility by 16) keeps one compiled kernel for all of them.
@triton.jit(do_not_specialize=["dropout_seed", "dropout_offset"])
def _flash_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Slopes, Sinks,
    CuQ, CuK, SeqUsedQ, SeqUsedK, KStart, BatchIdx, BlockTable, stride_bt,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_os, stride_ls, split_size,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh,
    num_heads, kv_group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out,
    dropout_seed, dropout_offset, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_ROW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, SEQUSED_Q: tl.constexpr, SEQUSED_K: tl.constexpr,
    LEFTPAD: tl.constexpr, BATCH_IDX: tl.constexpr, PAGE_SIZE: tl.constexpr, LOWER_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Per-sequence layouts (all off for a dense call, which compiles exactly as before):
    # VARLEN_Q/K: packed tokens, sequence b at rows cu[b]:cu[b+1] of a (1, H, total, E) view;
    # SEQUSED_Q/K: sequence b uses only its first seqused[b] queries/keys;
    # LEFTPAD: sequence b's keys start at KStart[b] (and end at seqused_k[b]);
    # BATCH_IDX: sequence b reads K/V batch BatchIdx[b]; PAGE_SIZE > 0: K/V are pages
    # (num_pages, H, PAGE_SIZE, E) and sequence b's key j is in page BlockTable[b, j // PAGE_SIZE].
    # Then seqlen_q/seqlen_k arrive as the launch bounds and become the sequence's own,
    # and with LOWER_RIGHT the diagonal is the sequence's own (seqlen_k - seqlen_q).
    PER_SEQ: tl.constexpr = VARLEN_Q or VARLEN_K or SEQUSED_Q or SEQUSED_K or LEFTPAD or BATCH_IDX or PAGE_SIZE > 0
    if HAS_RIGHT:
        # Causal row blocks get longer with start_m: start the long ones first so the
        # short ones fill the tail of the launch.
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # Each row of the tile is one (query head, query position) pair.
    off_bh = tl.program_id(1)
    if PACK_GQA:
        num_kv_heads = num_heads // kv_group
        off_b = off_bh // num_kv_heads
        off_hk = off_bh % num_kv_heads
    else:
        off_b = off_bh // num_heads
        off_h = off_bh % num_heads
        off_hk = off_h // kv_group
    off_bk = off_b  # the K/V batch entry
    Pages = BlockTable
    if PER_SEQ:
        q_start = 0
        k_start = 0
        if VARLEN_Q:
            q_start = tl.load(CuQ + off_b)
            seqlen_q = tl.load(CuQ + off_b + 1) - q_start
        if SEQUSED_Q:
            seqlen_q = tl.load(SeqUsedQ + off_b)
        if VARLEN_K:
            k_first = tl.load(CuK + off_b)
            seqlen_k = tl.load(CuK + off_b + 1) - k_first
            if PAGE_SIZE == 0:
                k_start = k_first
        if SEQUSED_K:
            seqlen_k = tl.load(SeqUsedK + off_b)
        if LEFTPAD:
            k_start = tl.load(KStart + off_b)
            seqlen_k = seqlen_k - k_start
        if BATCH_IDX:
            off_bk = tl.load(BatchIdx + off_b)
        if LOWER_RIGHT:
            diag_offset = seqlen_k - seqlen_q
        # The launch covers the longest sequence (or a bound on it): programs past the end
        # of this one have nothing to do.
        if PACK_GQA:
            if start_m * BLOCK_M >= kv_group * seqlen_q:
                return
        elif start_m * BLOCK_M >= seqlen_q:
            return
        if VARLEN_Q:
            Q += q_start.to(tl.int64) * stride_qm
            Out += q_start.to(tl.int64) * stride_om
            Lse += q_start.to(tl.int64)
        if PAGE_SIZE > 0:
            Pages = BlockTable + off_b.to(tl.int64) * stride_bt
        else:
            K += k_start.to(tl.int64) * stride_kn
            V += k_start.to(tl.int64) * stride_vn
    if PACK_GQA:
        # Decode with GQA: one program serves every query head of its K/V head, so K/V
        # are read once per group instead of once per query head. Rows run over
        # (head in group, position).
        row_head = off_hk * kv_group + offs_m // seqlen_q
        row_pos = offs_m % seqlen_q
        row_valid = offs_m < kv_group * seqlen_q
    else:
        row_head = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h
        row_pos = offs_m
        row_valid = offs_m < seqlen_q
    row_head = tl.where(row_valid, row_head, 0)  # keep the padding rows' addresses in bounds
    row_pos = tl.where(row_valid, row_pos, 0)

    q_ptrs = Q + off_b.to(tl.int64) * stride_qb \
        + (row_head.to(tl.int64) * stride_qh + row_pos.to(tl.int64) * stride_qm)[:, None] + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if PAGE_SIZE > 0:  # the batch stride is the page stride: pages are chosen per key block
        K_base = K + off_hk.to(tl.int64) * stride_kh
        V_base = V + off_hk.to(tl.int64) * stride_vh
    else:
        K_base = K + off_bk.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
        V_base = V + off_bk.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    M_base = Mask + off_b.to(tl.int64) * stride_mb
    m_rows = row_head.to(tl.int64) * stride_mh + row_pos.to(tl.int64) * stride_mm
    # Dropout's (batch, query head) index of each row, as dropout.py numbers the rows.
    drop_bh = off_b * num_heads + row_head
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_sb + row_head * stride_sh).to(tl.float32) * 1.4426950408889634

    if HAS_SINKS and not SPLIT:
        # The sink is a logit with no value: it starts the running max and sum.
        # (With split keys, the combine step adds it once.)
        sink = tl.load(Sinks + row_head).to(tl.float32) * 1.4426950408889634
        m_i = sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Visible keys of this row block: [lo, hi). Inside [mid_lo, mid_hi) every key is
    # visible to every row (up to explicit masks), so bounds need no checking there.
    if PACK_GQA:  # rows of several heads: the positions they span
        first_row = tl.min(tl.where(row_valid, row_pos, seqlen_q), 0)
        last_row = tl.max(row_pos, 0)
    else:
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
    if SPLIT:
        # Split-KV (decode): this program sees keys [split_lo, split_hi) only, a
        # multiple of BLOCK_N, so every run below stays block aligned.
        split = tl.program_id(2)
        split_lo = split * split_size
        split_hi = split_lo + split_size
        lo = tl.maximum(lo, split_lo)
        mid_lo = tl.minimum(tl.maximum(mid_lo, split_lo), split_hi)
        mid_hi = tl.minimum(tl.maximum(mid_hi, split_lo), split_hi)
        hi = tl.minimum(hi, split_hi)
        Out += split.to(tl.int64) * stride_os
        Lse += split.to(tl.int64) * stride_ls

    for start_n in range(lo, mid_lo, BLOCK_N):
        acc, m_i, l_i = _block_update(
            acc, m_i, l_i, q, K_base, V_base, M_base, m_rows, start_n, row_pos, row_valid, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_in, softcap_out, slope, Pages, stride_kb, stride_vb,
            drop_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, True,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, PAGE_SIZE, BLOCK_N, HAS_DROPOUT, UPCAST)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        acc, m_i, l_i = _block_update(
            acc, m_i, l_i, q, K_base, V_base, M_base, m_rows, start_n, row_pos, row_valid, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_in, softcap_out, slope, Pages, stride_kb, stride_vb,
            drop_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, False,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, PAGE_SIZE, BLOCK_N, HAS_DROPOUT, UPCAST)
    for start_n in range(mid_hi, hi, BLOCK_N):
        acc, m_i, l_i = _block_update(
            acc, m_i, l_i, q, K_base, V_base, M_base, m_rows, start_n, row_pos, row_valid, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_in, softcap_out, slope, Pages, stride_kb, stride_vb,
            drop_bh, dropout_seed, dropout_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, True,
            MASK_KIND, MASK_PER_ROW, HAS_SOFTCAP, HAS_ALIBI, PAGE_SIZE, BLOCK_N, HAS_DROPOUT, UPCAST)

    # Rows with no visible key: output 0 (as torch >= 2.5) and lse = +inf, so that a
    # backward pass computing exp(s - lse) gets 0 there.
    # (A split's partial result marks them -inf instead: "contributes nothing" to the combine.)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf") if SPLIT else float("inf"),
                   (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)

    o_ptrs = Out + off_b.to(tl.int64) * stride_ob \
        + (row_head.to(tl.int64) * stride_oh + row_pos.to(tl.int64) * stride_om)[:, None] + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, _to_dtype(acc, Out.dtype.element_ty, UPCAST), mask=row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    l_ptrs = Lse + off_b.to(tl.int64) * stride_lb + row_head.to(tl.int64) * stride_lh + row_pos
    tl.store(l_ptrs, lse, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    PartOut, PartLse, Out, Lse, Sinks,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    num_heads, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Merge the split-KV partial results of one query row: weights exp(lse_s - lse)."""
    row = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    base = off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + row
    lse_s = tl.load(PartLse + base + offs_s * stride_qs, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + off_h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    empty = total == 0.0
    w = w / tl.where(empty, 1.0, total)
    p_ptrs = PartOut + off_b.to(tl.int64) * stride_pb + off_h.to(tl.int64) * stride_ph + row * stride_pm \
        + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd
    part = tl.load(p_ptrs, mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM_V), other=0.0)
    out = tl.sum(part * w[:, None], 0)
    o_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + row * stride_om + offs_d * stride_od
    tl.store(o_ptrs, _to_dtype(out, Out.dtype.element_ty, UPCAST), mask=offs_d < HEAD_DIM_V)
    lse = tl.where(empty, float("inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + row, lse)


# --------------------------------------------------------------------------- block sizes


def block_config(head_dim: int, head_dim_v: int, seqlen_q: int) -> dict:
    """Block sizes and launch shape for one call.

    Under the interpreter the blocks are small so that short test sequences still
    cross several blocks and every edge run of the key loop executes.
    On the GPU: 128-row query blocks keep Hopper's warpgroup MMAs busy; the key
    block shrinks as the head dim grows so the K/V tiles fit shared memory.
    Short queries (decode) take 16-row blocks and long key blocks: they are
    bound by reading K/V, not by the matrix units.
    A mask that differs per query row keeps these tiles although its (BLOCK_M, BLOCK_N)
    tile of mask addresses and values spills at head dim 128 (about 1 KB per thread,
    sm_90 ptxas; 64 x 32 tiles with 8 warps spill nothing): on the H100 a model's padded
    prefill with such masks ran at 1.00x of torch SDPA with 128 x 64 (a115f0a) and 0.87x
    with 64 x 32 (e52d2bb). ``python -m benchmarks.sweep --row-mask`` measures the rest.
    """
    d = max(head_dim, head_dim_v)
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if seqlen_q <= 16:  # 8 warps: with 4, masks or sinks made the 16 x 128 tiles spill (sm_90, ptxas)
        return dict(BLOCK_M=16, BLOCK_N=128 if d <= 128 else 64, num_warps=8, num_stages=3)
    if d <= 128:  # 8 warps: with 4, masks made the hd64 tile spill registers (sm_90, ptxas)
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:  # 8 warps: with 4 the 64 x 256 accumulator spilled registers (sm_90, ptxas)
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if seqlen_q <= 64 and d <= 128:  # don't waste most of a 128-row tile
        cfg.update(BLOCK_M=64, num_warps=4)
    return cfg


def choose_num_splits(programs: int, seqlen_k: int, block_n: int, device: torch.device) -> int:
    """Split the keys when too few (batch, head, row-block) programs exist to fill the
    GPU (decode: one query row per head): aim for two waves of programs, each
    split at least four key blocks long."""
    if device.type != "cuda":
        return 1
    sms = _device.sm_count(device.index)
    if programs >= sms:
        return 1
    by_occupancy = cdiv(2 * sms, programs)
    by_length = seqlen_k // (4 * block_n)
    return max(1, min(by_occupancy, by_length, 64))


# --------------------------------------------------------------------------- launcher

# Host-side arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions, which
# unwrap their arguments on every call: about 1 us each from host code (Triton 3.8), and a
# launch needs several.


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def device_guard(device: torch.device):
    """Make ``device`` current for the launch, so Triton compiles for its architecture
    and launches on that device's current stream (layers under ``device_map``
    live on different GPUs)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _smaller(cfg: dict) -> dict:
    """The next config to try when one does not fit the GPU's shared memory."""
    if cfg["num_stages"] > 1:
        return dict(cfg, num_stages=cfg["num_stages"] - 1)
    if cfg["BLOCK_N"] > 16:
        return dict(cfg, BLOCK_N=cfg["BLOCK_N"] // 2)
    if cfg["BLOCK_M"] > 16:
        return dict(cfg, BLOCK_M=cfg["BLOCK_M"] // 2)
    return {}


class Sequences(NamedTuple):
    """Per-sequence K/V and query layout for one launch (see the kernel's flags). Index
    tensors are int32 on the inputs' device; ``None`` = not used.

    ``max_seqlen_q`` / ``max_seqlen_k``: the longest sequence, only to size the launch;
    ``None`` = unknown without reading device memory, then the launch is sized by the
    storage (total tokens, or the cache's capacity) and programs past a sequence's end
    exit at once. ``lower_right``: each sequence's diagonal is its own bottom-right corner.
    """

    num_seqs: int
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None
    seqused_q: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    cache_leftpad: Optional[torch.Tensor] = None
    cache_batch_idx: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    lower_right: bool = False


_DENSE = dict(VARLEN_Q=False, VARLEN_K=False, SEQUSED_Q=False, SEQUSED_K=False, LEFTPAD=False, BATCH_IDX=False,
              PAGE_SIZE=0, LOWER_RIGHT=False)  # the per-sequence flags of a dense launch: all off


def flash_attn_forward(q, k, v, *, scale, mask=None, causal_bounds=(-1, -1), diag_offset=0,
                       softcap=0.0, alibi_slopes=None, sinks=None, out=None, config=None, num_splits=None,
                       pack_gqa=None, seqs: Optional[Sequences] = None,
                       dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    """Run the kernel.

    q: (B, Hq, L, E), k: (B, Hkv, S, E), v: (B, Hkv, S, Ev), any strides;
    mask: None or a bool/float tensor broadcastable to (B, Hq, L, S) (size-1 dims are read with stride 0);
    causal_bounds: (left, right) key bounds around the diagonal, -1 = unbounded;
    alibi_slopes: None or (B or 1, Hq) float32; sinks: None or (Hq,) logits.
    out: optional preallocated (B, Hq, L, Ev) output, any strides.
    config: block sizes (see block_config), used as given: a config that does not fit the
    GPU raises instead of stepping down; num_splits: split-KV factor (None = choose);
    pack_gqa: put all query heads of a K/V head in one program (None = for short
    queries with GQA, where reading K/V once per group is what counts).
    seqs: per-sequence layout (:class:`Sequences`): then q is (1, Hq, total_q, E) when packed
    (else (B, Hq, L, E)), k/v (1, Hkv, total_k, E) when packed, (num_pages, Hkv, page_size, E)
    when paged, else (B_cache, Hkv, S, E); ``diag_offset`` is ignored (each sequence has its own).
    dropout_p, dropout_seed, dropout_offset: attention dropout on the probabilities that
    multiply V, with the keep-mask of dropout.py (element (b, h, i, j) of the (B, Hq, L, S)
    scores, whatever the packing or split); pass the same three to flash_attn_backward.
    The lse stays the undropped softmax's. Dense layouts only: with ``seqs`` it raises.
    Returns out (B, Hq, L, Ev) laid out like q, and lse (B, Hq, L) float32.
    """
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seqs is not None:
        # A packed token has no (b, i) position in one (B, Hq, L, S) numbering until the
        # backward takes per-sequence layouts and both agree on one. The natural choice
        # then: query i and key j of sequence b are element (b, h, i, j) of a
        # (num_seqs, Hq, max_seqlen_q, max_seqlen_k) numbering (positions within the
        # sequence, launch bounds as L and S), so a varlen batch drops what the same
        # batch padded on the right would. The kernel would need the launch bounds apart
        # from the per-sequence seqlen_q/seqlen_k it overwrites.
        raise ValueError("dropout_p > 0 cannot be combined with a per-sequence layout (the backward has none)")
    if out is not None:
        # A float32 out keeps the result unrounded, for callers that merge partial results (ring attention).
        if out.shape != (B, Hq, L, Ev) or out.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"out must be {(B, Hq, L, Ev)} {q.dtype} or float32, got {tuple(out.shape)} {out.dtype}")
        lse = q.new_empty((B, Hq, L), dtype=torch.float32)
    else:
        out, lse = empty_outputs(q, Ev)
    storage_q, storage_b = L, B  # the rows and batch entries of q's storage (the combine covers them all)
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    o_batch_stride, l_batch_stride = None, None
    index_args = (q,) * 7 + (0,)  # unused pointers and block-table stride on the dense path
    page_size = 0
    if seqs is not None:
        B = seqs.num_seqs
        page_size = 0 if seqs.block_table is None else k.shape[2]
        # The launch bounds: the longest sequence, or what the storage holds.
        L = seqs.max_seqlen_q if seqs.max_seqlen_q is not None else L
        if seqs.max_seqlen_k is not None:
            S = seqs.max_seqlen_k
        elif page_size:
            S = seqs.block_table.shape[1] * page_size
        if seqs.cu_seqlens_q is not None:  # packed: no batch stride, sequence b starts at row cu[b]
            q_strides = (0,) + q_strides[1:]
            o_batch_stride, l_batch_stride = 0, 0
        if seqs.cu_seqlens_k is not None and not page_size:
            k_strides, v_strides = (0,) + k_strides[1:], (0,) + v_strides[1:]
        if seqs.seqused_q is not None:  # rows past a sequence's used queries: zeros, lse +inf
            out.zero_()
            lse.fill_(float("inf"))
            num_splits = 1  # (the combine would read their unwritten partial rows)
        bt = seqs.block_table
        index_args = tuple(q if t is None else t for t in (
            seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.seqused_q, seqs.seqused_k, seqs.cache_leftpad,
            seqs.cache_batch_idx, bt)) + (0 if bt is None else bt.stride(0),)
    per_seq_flags = _DENSE if seqs is None else dict(
        VARLEN_Q=seqs.cu_seqlens_q is not None, VARLEN_K=seqs.cu_seqlens_k is not None,
        SEQUSED_Q=seqs.seqused_q is not None, SEQUSED_K=seqs.seqused_k is not None,
        LEFTPAD=seqs.cache_leftpad is not None, BATCH_IDX=seqs.cache_batch_idx is not None,
        PAGE_SIZE=page_size, LOWER_RIGHT=seqs.lower_right,
    )

    if mask is None:
        mask_kind, mask_arg, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    elif seqs is not None:
        raise ValueError("an attn_mask cannot be combined with a per-sequence layout")
    else:
        mask = mask.expand(B, Hq, L, S)  # a view: broadcast dims get stride 0, nothing is materialized
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mstrides = mask.stride()
    if alibi_slopes is None:
        slopes_arg, sstrides = q, (0, 0)
    else:
        slopes_arg = alibi_slopes.expand(B, Hq)
        sstrides = (slopes_arg.stride(0), slopes_arg.stride(1))
    sinks_arg = q if sinks is None else sinks.contiguous()

    left, right = causal_bounds
    log2e = 1.4426950408889634
    group = Hq // Hkv
    if pack_gqa is None:
        pack_gqa = group > 1 and L <= 16
    # A mask whose value does not change along a tile's rows (key padding) is read as one row.
    mask_per_row = mask is not None and (mstrides[2] != 0 or (pack_gqa and mstrides[1] != 0))
    rows, programs_per_row_block = (group * L, B * Hkv) if pack_gqa else (L, B * Hq)
    may_step_down = config is None
    cfg = dict(config or block_config(E, Ev, rows))
    block_d = max(16, next_power_of_2(E))
    block_dv = max(16, next_power_of_2(Ev))
    if rows == 0 or programs_per_row_block == 0:  # per-sequence launch with no query at all
        return out, lse

    with device_guard(q.device):
        while True:
            block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
            m_blocks = cdiv(rows, block_m)
            splits = num_splits or choose_num_splits(m_blocks * programs_per_row_block, S, block_n, q.device)
            splits = max(1, min(splits, cdiv(S, block_n)))
            split_size = cdiv(cdiv(max(S, 1), block_n), splits) * block_n
            splits = cdiv(max(S, 1), split_size)
            if splits > 1:
                part_out = torch.empty((splits, storage_b, Hq, storage_q, Ev), dtype=torch.float32, device=q.device)
                part_lse = torch.empty((splits, storage_b, Hq, storage_q), dtype=torch.float32, device=q.device)
                dst_out, dst_lse = part_out[0], part_lse[0]
                split_strides = (part_out.stride(0), part_lse.stride(0))
            else:
                dst_out, dst_lse, split_strides = out, lse, (0, 0)
            o_strides = dst_out.stride() if o_batch_stride is None else (o_batch_stride,) + dst_out.stride()[1:]
            l_strides = (dst_lse.stride(0) if l_batch_stride is None else l_batch_stride, dst_lse.stride(1))
            try:
                _flash_fwd_kernel[(m_blocks, programs_per_row_block, splits)](
                    q, k, v, dst_out, dst_lse, mask_arg, slopes_arg, sinks_arg, *index_args,
                    *q_strides, *k_strides, *v_strides, *o_strides, *l_strides,
                    *split_strides, split_size,
                    *mstrides, *sstrides,
                    Hq, Hq // Hkv, L, S,
                    diag_offset, left, right,
                    scale * log2e,
                    (scale / softcap) if softcap > 0 else 0.0,
                    (softcap * log2e) if softcap > 0 else 0.0,
                    dropout_seed, dropout_offset, float(dropout_p),
                    HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=block_d, BLOCK_DV=block_dv,
                    HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                    MASK_KIND=mask_kind, MASK_PER_ROW=mask_per_row, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                    HAS_SINKS=sinks is not None, SPLIT=splits > 1, PACK_GQA=pack_gqa, **per_seq_flags,
                    HAS_DROPOUT=dropout_p > 0, UPCAST=interpreting(),
                    **cfg,
                )
            except triton.runtime.errors.OutOfResources:
                # Smaller GPUs (e.g. 99 KB of shared memory on sm_86/89) cannot hold every
                # config tuned for Hopper: step down until one fits.
                cfg = _smaller(cfg) if may_step_down else {}
                if not cfg:
                    raise
                continue
            break
        if splits > 1:
            _combine_splits_kernel[(storage_q, storage_b * Hq)](
                part_out, part_lse, out, lse, sinks_arg,
                *part_out.stride(), *part_lse.stride()[:3],
                *out.stride(), lse.stride(0), lse.stride(1),
                Hq, splits,
                HEAD_DIM_V=Ev, BLOCK_DV=block_dv, BLOCK_S=max(2, next_power_of_2(splits)),
                HAS_SINKS=sinks is not None, UPCAST=interpreting(),
            )
    return out, lse
