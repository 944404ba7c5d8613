// Flash-attention forward on tensor cores (sm80+): fp16/bf16 in, fp32 accumulate.
//
// Building block: CuTe (CUTLASS 4.2 headers, the `nvidia-cutlass` package). The kernel
// follows FlashAttention-2's design: a CTA owns kBlockM query rows, keeps S = Q K^T and
// the online softmax in registers (the mma.sync m16n8k16 accumulator layout), reuses the
// probabilities as the A operand of O += P V without a trip through shared memory, and
// pipelines K/V tiles through swizzled shared memory with cp.async, read back with
// ldmatrix (transposed for V). Why CuTe rather than raw PTX or wmma: the MMA and copy
// atoms (mma.sync, ldmatrix, cp.async) and the thread/value layouts that say which
// lane holds which element are CUTLASS's, used by the field's fastest kernels and
// tested there; what is left to us is the attention logic. (The first version used
// wmma, whose hidden fragment layout forced the softmax through shared memory: 0.15x
// of cuDNN on an H100.)
//
// Checked without a GPU: the kernel body is written against a small "arch" policy
// (DeviceArch below: cp.async, barriers, warp shuffles, the MMA and ldmatrix atoms).
// csrc/emulation/ swaps in a host policy -- threads for lanes, an MMA that exchanges
// fragments across the emulated warp using CUTLASS's own layouts, cp.async copies that
// land only at the wait -- and tests/test_cuda_emulated.py runs this same body on the
// CPU against the fp64 reference. What the emulation cannot check is the ldmatrix and
// cp.async instructions themselves; the GPU tests do.
//
// Work split: a CTA owns 128 "rows" (64 at head dim 256) of one (batch, kv head). Rows pack the query heads
// that share that kv head (pack-GQA): row r is query head kv_head * group + r / L,
// query position r % L. K/V are therefore read once per group, which is what makes
// MQA/GQA decode cheap, and nothing is copied. Each warp owns 16-row slices of the
// tile (the tiled MMA's M layout); the four lanes of a quad share a row, so row
// reductions are two xor-shuffles.
// Pipeline (FlashAttention-2): V_j is copied while S_j = Q K_j^T and its softmax are
// computed, K_{j+1} while O += P_j V_j is.
// Masking: causal/windows in both alignments and a bool key-padding row per batch, checked
// per element only in the tiles that need it (the rest are visible to every row).
// Split-KV: blockIdx.z picks a slice of the key tiles; partial results go to
// out_accum/lse_accum and flash_fwd_combine.cu merges them.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cmath>
#include <cstdint>

#include "flash_params.h"

namespace fastattn {

template <typename Tag>
struct CuteTypes;
template <>
struct CuteTypes<Half> {
  using Element = cutlass::half_t;
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct CuteTypes<BFloat16> {
  using Element = cutlass::bfloat16_t;
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

#if defined(__CUDACC__)
// The hardware: what the kernel body asks of the machine.
struct DeviceArch {
  template <typename Tag>
  using Mma = typename CuteTypes<Tag>::Mma;
  using LoadMatrix = cute::SM75_U32x4_LDSM_N;            // A (Q, P) and B (K) operands
  using LoadMatrixTransposed = cute::SM75_U16x8_LDSM_T;  // B operand from V (keys x dims)

  static __device__ __forceinline__ void copy_async_16(void* smem_dst, const void* gmem_src) {
    cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(*static_cast<const cute::uint128_t*>(gmem_src),
                                                           *static_cast<cute::uint128_t*>(smem_dst));
  }
  static __device__ __forceinline__ void commit() { cute::cp_async_fence(); }
  static __device__ __forceinline__ void wait_all() { cute::cp_async_wait<0>(); }
  static __device__ __forceinline__ void sync_block() { __syncthreads(); }
  static __device__ __forceinline__ float shfl_xor(float x, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, x, lane_mask);
  }
  // 2^x in one MUFU.EX2 (exp2f without fast-math adds a range fix-up around it);
  // exp2(-inf) = 0, as the softmax needs.
  static __device__ __forceinline__ float exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
};
#endif

// Tile geometry and layouts for one (element type, head dim) on one arch policy.
template <typename Tag, int kHeadDim_, class Arch>
struct FwdTraits {
  using Element = typename CuteTypes<Tag>::Element;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = block_m_for(kHeadDim);
  static constexpr int kBlockN = block_n_for(kHeadDim);
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;

  // Every warp takes 16-row slices of the tile; the tile's M extent is kBlockM.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename Arch::template Mma<Tag>>,
                                  cute::Layout<cute::Shape<cute::Int<kWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kWarps>, cute::_16, cute::_16>>;

  // Shared memory: rows of kHeadDim elements, swizzled in 16-byte chunks so that the
  // 8 rows an ldmatrix phase reads fall in different banks. A chunk (8 elements) stays
  // contiguous, which is what the 16-byte cp.async copies need.
  static constexpr int kSmemRow = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemRow == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzleBits, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kSmemRow>>, cute::Stride<cute::Int<kSmemRow>, cute::_1>>{}));
  using SmemLayoutQ =
      decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV =
      decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V read as (dims, keys): the B operand of O += P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));

  using SmemCopyAtom = cute::Copy_Atom<typename Arch::LoadMatrix, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<typename Arch::LoadMatrixTransposed, Element>;

  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kQElems + 2 * kKVElems) * int(sizeof(Element));

  static_assert(kSmemBytes <= kMinSmemPerBlock, "the tiles must fit every sm80+ GPU's shared memory");
  static_assert(kHeadDim % 32 == 0, "head dim must be a multiple of 32 (swizzle atom)");
  static_assert(kBlockM % (16 * kWarps) == 0, "the warps must tile the query rows");
};

// The accumulator of the m16n8k16 MMA, ((2, 2), MMA_M, MMA_N), viewed as
// (rows, cols) = ((2, MMA_M), (2, MMA_N)): row i of the view is one query row.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rowcol_layout(Layout layout) {
  using namespace cute;
  static_assert(decltype(size<0, 0>(layout))::value == 2 && decltype(size<0, 1>(layout))::value == 2);
  auto l = logical_divide(layout, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The same registers as an A operand for the next MMA: ((2, 2), MMA_M, MMA_N) ->
// ((2, 2, 2), MMA_M, MMA_N / 2). Two n8 accumulator tiles make one k16 A tile.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_layout(Layout layout) {
  using namespace cute;
  static_assert(decltype(size<2>(layout))::value % 2 == 0);
  auto l = logical_divide(layout, Shape<Underscore, Underscore, _2>{});  // ((2, 2), MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// fp32 registers -> the input dtype, two at a time (one cvt.rn.*x2.f32 each on the GPU).
template <class Src, class Dst>
CUTE_HOST_DEVICE void convert_fragment(const Src& src, Dst& dst) {
  using Element = typename Dst::value_type;
  static_assert(decltype(cute::size(src))::value % 2 == 0);
  CUTE_UNROLL
  for (int i = 0; i < cute::size(src); i += 2) {
#if defined(__CUDA_ARCH__)
    const float2 pair = make_float2(src(i), src(i + 1));
    if constexpr (std::is_same_v<Element, cutlass::half_t>) {
      *reinterpret_cast<__half2*>(&dst(i)) = __float22half2_rn(pair);
    } else {
      *reinterpret_cast<__nv_bfloat162*>(&dst(i)) = __float22bfloat162_rn(pair);
    }
#else
    dst(i) = Element(src(i));
    dst(i + 1) = Element(src(i + 1));
#endif
  }
}

// acc += A B, both operands read from shared memory one k-slice ahead of the MMA.
template <class Acc, class RegA, class RegB, class SmemA, class SmemB, class TiledMma, class CopyA, class CopyB,
          class ThrCopyA, class ThrCopyB>
CUTE_HOST_DEVICE void gemm_smem_smem(Acc& acc, RegA& rA, RegB& rB, const SmemA& sA, const SmemB& sB,
                                     TiledMma& tiled_mma, const CopyA& copy_a, const CopyB& copy_b,
                                     const ThrCopyA& thr_copy_a, const ThrCopyB& thr_copy_b) {
  using namespace cute;
  Tensor rA_view = thr_copy_a.retile_D(rA);
  Tensor rB_view = thr_copy_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B with A already in registers (the probabilities) and B from shared memory.
template <class Acc, class RegA, class RegB, class SmemB, class TiledMma, class CopyB, class ThrCopyB>
CUTE_HOST_DEVICE void gemm_reg_smem(Acc& acc, const RegA& rA, RegB& rB, const SmemB& sB, TiledMma& tiled_mma,
                                    const CopyB& copy_b, const ThrCopyB& thr_copy_b) {
  using namespace cute;
  Tensor rB_view = thr_copy_b.retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Copy `rows` rows of kHeadDim elements into the swizzled tile `s` in 16-byte chunks;
// rows for which row_ptr() returns nullptr are zero-filled (padding rows must hold
// finite values: a padding V row multiplies a zero probability, and 0 * NaN = NaN).
template <class Arch, int kHeadDim, int kThreads, int kRows, class SmemTensor, class RowPtr>
CUTE_HOST_DEVICE void load_rows(SmemTensor& s, int tid, RowPtr row_ptr) {
  using Element = typename SmemTensor::value_type;
  constexpr int kChunks = kHeadDim / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "every thread copies the same number of chunks");
  CUTE_UNROLL
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunks;
    const int col = (c % kChunks) * 8;
    Element* dst = &s(row, col);
    const Element* src = row_ptr(row);
    if (src != nullptr) {
      Arch::copy_async_16(dst, src + col);
    } else {
      *reinterpret_cast<cute::uint128_t*>(dst) = cute::uint128_t{};
    }
  }
}

// One CTA's work; (tid, block) are threadIdx.x and blockIdx on the GPU. Every thread of
// the CTA runs every barrier and every MMA (the emulation relies on it as the GPU does).
template <class Kt, bool kBounded, class Arch>
CUTE_HOST_DEVICE void flash_fwd_block(const FwdParams& p, char* smem, int tid, int block_x, int block_y,
                                      int block_z) {
  using namespace cute;
  using Element = typename Kt::Element;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kHeadDim = Kt::kHeadDim;
  constexpr float kLn2 = 0.6931471805599453f;

  const int batch = block_x / p.heads_kv;
  const int kv_head = block_x % p.heads_kv;
  const int split = block_z;
  const int group = p.heads_q / p.heads_kv;
  const int L = p.seqlen_q;
  const int n_rows = group * L;  // packed rows of this (batch, kv head)
  const int row0 = block_y * kBlockM;
  if (row0 >= n_rows) return;  // the whole CTA leaves together: no barrier is left waiting

  const int keys = p.seqused_k != nullptr ? cute::min(p.seqused_k[batch], p.seqlen_k) : p.seqlen_k;
  const int64_t diag = p.lower_right ? int64_t(keys) - L : 0;

  const bool* key_mask = p.key_mask != nullptr ? p.key_mask + batch * p.key_mask_batch_stride : nullptr;
  const Element* q_base = static_cast<const Element*>(p.q) + batch * p.q_batch_stride;
  const Element* k_base =
      static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const Element* v_base =
      static_cast<const Element*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  // Key range [n_begin, n_end) this CTA visits: the union over its rows of each row's
  // visible keys (per-element checks make it exact), then this split's slice.
  const int last_row = cute::min(row0 + kBlockM, n_rows) - 1;
  int first_pos = row0 % L, last_pos = last_row % L;
  if (row0 / L != last_row / L) {  // the CTA spans two query heads: positions wrap
    first_pos = 0;
    last_pos = L - 1;
  }
  int64_t lo = 0, hi = keys;
  if (kBounded) {
    if (p.window_right >= 0) hi = cute::min(hi, cute::max(int64_t(last_pos) + diag + p.window_right + 1, int64_t(0)));
    if (p.window_left >= 0) lo = cute::max(int64_t(first_pos) + diag - p.window_left, int64_t(0));
  }
  lo = (lo / kBlockN) * kBlockN;
  int n_begin = int(lo), n_end = int(cute::max(hi, lo));
  if (p.num_splits > 1) {
    const int tiles = (n_end - n_begin + kBlockN - 1) / kBlockN;
    const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
    const int begin = n_begin + split * tiles_per_split * kBlockN;
    n_end = cute::min(n_end, begin + tiles_per_split * kBlockN);
    n_begin = cute::min(begin, n_end);
  }

  Element* smem_q = reinterpret_cast<Element*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_q + Kt::kQElems), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_q + Kt::kQElems + Kt::kKVElems), typename Kt::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Kt::SmemLayoutVt{});

  // Query tile: packed row r -> (query head, position). Not needed when no key is visible.
  if (n_begin < n_end) {
    load_rows<Arch, kHeadDim, Kt::kThreads, kBlockM>(sQ, tid, [&](int r) -> const Element* {
      const int row = row0 + r;
      if (row >= n_rows) return nullptr;
      const int head = kv_head * group + row / L;
      return q_base + head * p.q_head_stride + int64_t(row % L) * p.q_row_stride;
    });
  }
  const int64_t k_row_stride = p.k_row_stride, v_row_stride = p.v_row_stride;
  auto load_k = [&](int n0) {
    load_rows<Arch, kHeadDim, Kt::kThreads, kBlockN>(sK, tid, [&](int r) -> const Element* {
      return n0 + r < keys ? k_base + int64_t(n0 + r) * k_row_stride : nullptr;
    });
  };
  auto load_v = [&](int n0) {
    load_rows<Arch, kHeadDim, Kt::kThreads, kBlockN>(sV, tid, [&](int r) -> const Element* {
      return n0 + r < keys ? v_base + int64_t(n0 + r) * v_row_stride : nullptr;
    });
  };
  if (n_begin < n_end) load_k(n_begin);
  Arch::commit();

  typename Kt::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto copy_q = make_tiled_copy_A(typename Kt::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Kt::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  auto copy_v = make_tiled_copy_B(typename Kt::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);

  // (row, col) of each of this thread's score elements, in the row-major view.
  Tensor coord_s = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coord_s_rc = make_tensor(coord_s.data(), rowcol_layout(coord_s.layout()));
  constexpr int kRows = decltype(size<0>(coord_s_rc))::value;  // query rows this thread holds

  float row_max[kRows];  // running max, log2 units
  float row_sum[kRows];  // running sum of exp2(s - max) over this thread's columns only
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  // Tiles that need per-element checks: those past mask_after (they reach the end of the
  // keys, or past some row's right window bound) and those before mask_before (some row's
  // left window bound falls inside). The rest are visible to every row of the CTA.
  int64_t mask_after = int64_t(keys) - kBlockN, mask_before = INT64_MIN;
  if (kBounded) {
    if (p.window_right >= 0) mask_after = cute::min(mask_after, first_pos + diag + p.window_right - kBlockN + 1);
    if (p.window_left >= 0) mask_before = last_pos + diag - p.window_left;
  }
  for (int n0 = n_begin; n0 < n_end; n0 += kBlockN) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    Arch::wait_all();    // K_j (and Q on the first pass) have landed for this thread
    Arch::sync_block();  // ... for every thread; and every warp is done with V_{j-1}
    load_v(n0);
    Arch::commit();

    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, copy_q, copy_k, thr_copy_q, thr_copy_k);

    // Scale (or softcap), mask, and fold the tile into the running softmax.
    Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
    const bool need_mask = n0 > mask_after || n0 < mask_before || key_mask != nullptr;
    // Key-padding flags of this thread's columns (the same for all its rows), one bit each.
    uint32_t padding_bits = 0;
    if (key_mask != nullptr) {
      static_assert(decltype(size<1>(s))::value <= 32, "one bit per column");
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const int key = n0 + int(get<1>(coord_s_rc(0, j)));
        padding_bits |= uint32_t(key < keys && !key_mask[key]) << j;
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      if (p.has_softcap) {  // a uniform branch, outside the element loop
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) s(i, j) = tanhf(s(i, j) * p.softcap_in) * p.softcap_out_log2;
      } else {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) s(i, j) *= p.scale_log2;
      }
      if (need_mask) {
        // This row's visible keys, [lo, hi) relative to n0: the end of the keys and the
        // window around the row's diagonal (rows past n_rows are computed, never stored).
        const int64_t row_diag = (row0 + int(get<0>(coord_s_rc(i, 0)))) % L + diag;
        int64_t lo = -n0, hi = int64_t(keys) - n0;
        if (kBounded) {
          if (p.window_right >= 0) hi = cute::min(hi, row_diag + p.window_right + 1 - n0);
          if (p.window_left >= 0) lo = cute::max(lo, row_diag - p.window_left - n0);
        }
        const int col_lo = int(cute::max(lo, int64_t(0))), col_hi = int(cute::min(hi, int64_t(kBlockN)));
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          const int col = int(get<1>(coord_s_rc(i, j)));
          if (col < col_lo || col >= col_hi || ((padding_bits >> j) & 1u)) s(i, j) = -INFINITY;
        }
      }
      float tile_max = -INFINITY;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) tile_max = fmaxf(tile_max, s(i, j));
      tile_max = fmaxf(tile_max, Arch::shfl_xor(tile_max, 1));  // the quad shares the row
      tile_max = fmaxf(tile_max, Arch::shfl_xor(tile_max, 2));
      const float m_new = fmaxf(row_max[i], tile_max);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      const float alpha = Arch::exp2(row_max[i] - m_safe);
      float tile_sum = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const float pr = Arch::exp2(s(i, j) - m_safe);
        s(i, j) = pr;
        tile_sum += pr;  // the sum uses fp32 probabilities; P V uses them rounded to Element
      }
      row_sum[i] = row_sum[i] * alpha + tile_sum;
      row_max[i] = m_new;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); ++j) o(i, j) *= alpha;
    }

    // P in the input dtype, in the registers' A-operand view.
    Tensor p_frag = make_tensor<Element>(acc_s.layout());
    convert_fragment(acc_s, p_frag);
    Tensor tOrP = make_tensor(p_frag.data(), acc_as_a_layout(p_frag.layout()));

    Arch::wait_all();    // V_j has landed
    Arch::sync_block();  // ... for every thread; and every warp is done reading K_j
    if (n0 + kBlockN < n_end) load_k(n0 + kBlockN);
    Arch::commit();

    gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, copy_v, thr_copy_v);
  }

  // Epilogue. Rows with no visible key: out 0, lse +inf (-inf for a split's partial
  // result, so the merge gives it zero weight).
  Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  Tensor coord_o = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor coord_o_rc = make_tensor(coord_o.data(), rowcol_layout(coord_o.layout()));
  float row_lse[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    float sum = row_sum[i];
    sum += Arch::shfl_xor(sum, 1);
    sum += Arch::shfl_xor(sum, 2);
    const bool empty = sum == 0.f;
    const float inv = empty ? 0.f : 1.f / sum;
    row_lse[i] = empty ? (p.num_splits > 1 ? -INFINITY : INFINITY) : (row_max[i] + log2f(sum)) * kLn2;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o); ++j) o(i, j) *= inv;
  }

  // The thread holding column 0 of a row writes its log-sum-exp.
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    const int row = row0 + int(get<0>(coord_o_rc(i, 0)));
    if (int(get<1>(coord_o_rc(i, 0))) != 0 || row >= n_rows) continue;
    const int head = kv_head * group + row / L;
    const int pos = row % L;
    if (p.num_splits > 1) {
      p.lse_accum[((int64_t(split) * p.batch + batch) * p.heads_q + head) * L + pos] = row_lse[i];
    } else {
      p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + pos] = row_lse[i];
    }
  }

  if (p.num_splits > 1) {  // fp32 partial results, straight from the registers
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int row = row0 + int(get<0>(coord_o_rc(i, 0)));
      if (row >= n_rows) continue;
      const int head = kv_head * group + row / L;
      float* dst = p.out_accum + (((int64_t(split) * p.batch + batch) * p.heads_q + head) * L + row % L) * kHeadDim;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); ++j) dst[int(get<1>(coord_o_rc(i, j)))] = o(i, j);
    }
    return;
  }

  // Stage O (input dtype) through shared memory in sQ's layout, then copy whole rows out
  // in 16-byte chunks.
  Arch::wait_all();
  Arch::sync_block();  // every warp is done with sQ/sK/sV
  Tensor o_out = make_tensor<Element>(acc_o.layout());
  convert_fragment(acc_o, o_out);
  Tensor o_out_rc = make_tensor(o_out.data(), rowcol_layout(o_out.layout()));
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o); j += 2) {  // columns c, c + 1: one 4-byte store (a chunk is contiguous)
      Element* dst = &sQ(int(get<0>(coord_o_rc(i, j))), int(get<1>(coord_o_rc(i, j))));
      *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(&o_out_rc(i, j));
    }
  }
  Arch::sync_block();
  constexpr int kChunks = kHeadDim / 8;
  CUTE_UNROLL
  for (int k = 0; k < kBlockM * kChunks / Kt::kThreads; ++k) {
    const int c = tid + k * Kt::kThreads;
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const int row = row0 + r;
    if (row >= n_rows) continue;
    const int head = kv_head * group + row / L;
    Element* dst = static_cast<Element*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride +
                   int64_t(row % L) * p.o_row_stride + col;
    *reinterpret_cast<cute::uint128_t*>(dst) = *reinterpret_cast<const cute::uint128_t*>(&sQ(r, col));
  }
}

#if defined(__CUDACC__)
template <typename Tag, int kHeadDim, bool kBounded>
__global__ void __launch_bounds__(FwdTraits<Tag, kHeadDim, DeviceArch>::kThreads)
flash_fwd_kernel(const FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  flash_fwd_block<FwdTraits<Tag, kHeadDim, DeviceArch>, kBounded, DeviceArch>(p, smem, threadIdx.x, blockIdx.x,
                                                                               blockIdx.y, blockIdx.z);
}

template <typename Tag, int kHeadDim, bool kBounded>
void launch_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Kt = FwdTraits<Tag, kHeadDim, DeviceArch>;
  auto kernel = flash_fwd_kernel<Tag, kHeadDim, kBounded>;
  // Above 48 KB of dynamic shared memory must be asked for (per device; cheap to repeat).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmemBytes);
  const int rows = (params.heads_q / params.heads_kv) * params.seqlen_q;
  const dim3 grid(params.batch * params.heads_kv, (rows + Kt::kBlockM - 1) / Kt::kBlockM, params.num_splits);
  kernel<<<grid, Kt::kThreads, Kt::kSmemBytes, stream>>>(params);
}
#endif

}  // namespace fastattn

// One line per translation unit in csrc/instantiations/.
#define FASTATTN_INSTANTIATE_FWD(TAG, HEAD_DIM, BOUNDED) \
  template void fastattn::launch_flash_fwd<fastattn::TAG, HEAD_DIM, BOUNDED>(const fastattn::FwdParams&, cudaStream_t);
