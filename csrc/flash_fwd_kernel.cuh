// Flash-attention forward on tensor cores (sm80+): fp16/bf16 in, fp32 accumulate.
//
// Building block: nvcuda::wmma (<mma.h>) 16x16x16 fragments, with cp.async copies
// through cuda_pipeline_primitives.h. Why not CUTLASS/CuTe (nvidia-cutlass 4.2)?
//  - this kernel cannot be run where it is written, only compiled, so every line has
//    to be checkable by reading: wmma's contract (load/store/mma of whole 16x16
//    tiles) is small and documented, where a CuTe kernel's correctness lives in
//    layout algebra that is hard to verify without running it;
//  - wmma and the pipeline primitives ship with every CUDA toolkit, so building needs
//    no extra package on the machine (CUTLASS would be a build-time download), and a
//    translation unit compiles in seconds instead of the minutes CuTe templates take;
//  - the cost is speed: wmma hides the fragment layout, so the softmax goes through
//    shared memory instead of registers. Correctness first; CuTe is the upgrade path.
// The one property of wmma relied on beyond the load/store/mma contract: two
// accumulator fragments of the same type map matrix elements to storage slots the
// same way, so an elementwise product of their .x[] arrays is an elementwise product
// of the matrices. That is how the running output is rescaled by the softmax
// correction alpha (loaded as a 16x16 tile whose row r holds alpha[r]).
//
// Work split: a CTA of 4 warps owns 64 "rows" of one (batch, kv head). Rows pack the
// query heads that share that kv head (pack-GQA): row r is query head
// kv_head * group + r / L, query position r % L. K/V are therefore read once per
// group, which is what makes MQA/GQA decode cheap, and nothing is copied. Each warp
// owns 16 rows and computes
//     S = Q K^T (wmma) -> shared memory -> online softmax by the lanes -> P (input
//     dtype) -> O = O * alpha + P V (wmma, fp32 accumulators held in registers).
// The K/V tiles are pipelined through shared memory as in FlashAttention-2: V_j is
// copied while S_j is computed, K_{j+1} while P_j V_j is computed.
// Split-KV: blockIdx.z picks a slice of the key tiles; partial results go to
// out_accum/lse_accum and flash_fwd_combine.cu merges them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "flash_params.h"

namespace fastattn {

template <typename Tag>
struct ElementTraits;
template <>
struct ElementTraits<Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float x) { return __float2half_rn(x); }
};
template <>
struct ElementTraits<BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float x) { return __float2bfloat16_rn(x); }
};

// Shared-memory geometry for one head dim. Leading dims are padded (+8 halves, +4
// floats) so rows start on different banks; they stay multiples of 16 bytes (cp.async)
// and every 16-row/16-column fragment start stays 32-byte aligned (wmma's rule).
template <int kHeadDim>
struct FwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = fastattn::kBlockM;  // 16 rows per warp
  static constexpr int kBlockN = block_n_for(kHeadDim);
  static constexpr int kLdQKV = kHeadDim + 8;  // halves
  static constexpr int kLdS = kBlockN + 4;     // floats
  static constexpr int kLdP = kBlockN + 8;     // halves
  static constexpr int kLdO = kHeadDim + 4;    // floats, epilogue staging

  static constexpr int kQBytes = kBlockM * kLdQKV * 2;
  static constexpr int kKBytes = kBlockN * kLdQKV * 2;
  static constexpr int kVBytes = kBlockN * kLdQKV * 2;
  static constexpr int kSBytes = kWarps * 16 * kLdS * 4;
  static constexpr int kPBytes = kWarps * 16 * kLdP * 2;
  static constexpr int kMainBytes = kQBytes + kKBytes + kVBytes + kSBytes + kPBytes;
  static constexpr int kStageBytes = kBlockM * kLdO * 4;  // reuses the main layout's space
  static constexpr int kSmemBytes = kMainBytes > kStageBytes ? kMainBytes : kStageBytes;

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16 (wmma k-step)");
  static_assert(kBlockN % 16 == 0 && kBlockN % 2 == 0, "key block must be a multiple of 16");
  static_assert(kQBytes % 128 == 0 && kKBytes % 128 == 0 && kSBytes % 128 == 0, "regions stay aligned");
};

// Copy `rows` rows of kHeadDim elements into shared memory in 16-byte chunks; rows for
// which row_ptr() returns nullptr are zero-filled (padding rows must hold finite values:
// a padding V row multiplies a zero probability, and 0 * NaN would poison the output).
template <typename T, int kHeadDim, int kThreads, typename RowPtr>
__device__ __forceinline__ void copy_tile_async(T* smem, int ld, int rows, RowPtr row_ptr) {
  constexpr int kChunksPerRow = kHeadDim / 8;  // 8 halves = 16 bytes
  for (int c = threadIdx.x; c < rows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    T* dst = smem + row * ld + col;
    const T* src = row_ptr(row);
    if (src != nullptr) {
      __pipeline_memcpy_async(dst, src + col, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename Tag, int kHeadDim, bool kBounded>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads)
flash_fwd_kernel(const FwdParams p) {
  using namespace nvcuda;
  using T = typename ElementTraits<Tag>::type;
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kDFrags = kHeadDim / 16;
  constexpr int kNFrags = kBlockN / 16;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_k = reinterpret_cast<T*>(smem_raw + Cfg::kQBytes);
  T* smem_v = reinterpret_cast<T*>(smem_raw + Cfg::kQBytes + Cfg::kKBytes);
  float* smem_s = reinterpret_cast<float*>(smem_raw + Cfg::kQBytes + Cfg::kKBytes + Cfg::kVBytes);
  T* smem_p = reinterpret_cast<T*>(smem_raw + Cfg::kQBytes + Cfg::kKBytes + Cfg::kVBytes + Cfg::kSBytes);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int batch = blockIdx.x / p.heads_kv;
  const int kv_head = blockIdx.x % p.heads_kv;
  const int split = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int L = p.seqlen_q;
  const int n_rows = group * L;  // packed rows of this (batch, kv head)
  const int row0 = blockIdx.y * kBlockM;
  if (row0 >= n_rows) return;  // whole CTA exits together: no barrier is left waiting

  const int keys = p.seqused_k != nullptr ? min(p.seqused_k[batch], p.seqlen_k) : p.seqlen_k;
  const int64_t diag = p.lower_right ? int64_t(keys) - L : 0;

  const T* q_base = static_cast<const T*>(p.q) + batch * p.q_batch_stride;
  const T* k_base = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  // Key range [n_begin, n_end) this CTA visits: the union over its rows of each row's
  // visible keys (per-element checks below make it exact), then this split's slice.
  const int last_row = min(row0 + kBlockM, n_rows) - 1;
  int first_pos = row0 % L, last_pos = last_row % L;
  if (row0 / L != last_row / L) {  // the CTA spans two query heads: positions wrap
    first_pos = 0;
    last_pos = L - 1;
  }
  int64_t lo = 0, hi = keys;
  if (kBounded) {
    if (p.window_right >= 0) hi = min(hi, max(int64_t(last_pos) + diag + p.window_right + 1, int64_t(0)));
    if (p.window_left >= 0) lo = max(int64_t(first_pos) + diag - p.window_left, int64_t(0));
  }
  lo = (lo / kBlockN) * kBlockN;
  int n_begin = int(lo), n_end = int(max(hi, lo));
  if (p.num_splits > 1) {
    const int tiles = (n_end - n_begin + kBlockN - 1) / kBlockN;
    const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
    const int begin = n_begin + split * tiles_per_split * kBlockN;
    n_end = min(n_end, begin + tiles_per_split * kBlockN);
    n_begin = min(begin, n_end);
  }

  // Query tile: packed row r -> (query head, position).
  copy_tile_async<T, kHeadDim, Cfg::kThreads>(smem_q, Cfg::kLdQKV, kBlockM, [&](int r) -> const T* {
    const int row = row0 + r;
    if (row >= n_rows) return nullptr;
    const int head = kv_head * group + row / L;
    return q_base + head * p.q_head_stride + int64_t(row % L) * p.q_row_stride;
  });
  const int64_t k_row_stride = p.k_row_stride, v_row_stride = p.v_row_stride;
  auto k_row = [=](int n0) {
    return [=](int r) -> const T* { return n0 + r < keys ? k_base + int64_t(n0 + r) * k_row_stride : nullptr; };
  };
  auto v_row = [=](int n0) {
    return [=](int r) -> const T* { return n0 + r < keys ? v_base + int64_t(n0 + r) * v_row_stride : nullptr; };
  };
  if (n_begin < n_end) copy_tile_async<T, kHeadDim, Cfg::kThreads>(smem_k, Cfg::kLdQKV, kBlockN, k_row(n_begin));
  __pipeline_commit();

  // This warp's 16 rows; a warp whose rows are all padding still copies tiles and
  // meets every barrier, but skips the math.
  const bool warp_active = row0 + warp * 16 < n_rows;
  float* s_w = smem_s + warp * 16 * Cfg::kLdS;
  T* p_w = smem_p + warp * 16 * Cfg::kLdP;
  const T* q_w = smem_q + warp * 16 * Cfg::kLdQKV;

  // Softmax ownership: lanes 2r and 2r+1 share row r; lane 2r+h takes columns h, h+2, ...
  const int my_row = lane / 2;
  const int my_half = lane % 2;
  const int my_packed_row = row0 + warp * 16 + my_row;
  const int64_t my_pos = my_packed_row % L;  // only meaningful when my_packed_row < n_rows
  float m_i = -INFINITY;                      // running max, log2 units
  float l_i = 0.f;                            // running sum of exp2(s - m_i)

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_o[kDFrags];
#pragma unroll
  for (int d = 0; d < kDFrags; ++d) wmma::fill_fragment(acc_o[d], 0.f);

  for (int n0 = n_begin; n0 < n_end; n0 += kBlockN) {
    __pipeline_wait_prior(0);  // K_j (and Q on the first pass) have landed
    __syncthreads();           // ... for every thread; and all warps are done with V_{j-1}
    copy_tile_async<T, kHeadDim, Cfg::kThreads>(smem_v, Cfg::kLdQKV, kBlockN, v_row(n0));
    __pipeline_commit();

    if (warp_active) {
      // S = Q K^T for this warp's 16 rows, one 16x16 tile of keys at a time.
#pragma unroll
      for (int j = 0; j < kNFrags; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s;
        wmma::fill_fragment(acc_s, 0.f);
#pragma unroll
        for (int d = 0; d < kDFrags; ++d) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T: (d, key) at K[key][d]
          wmma::load_matrix_sync(a, q_w + d * 16, Cfg::kLdQKV);
          wmma::load_matrix_sync(b, smem_k + j * 16 * Cfg::kLdQKV + d * 16, Cfg::kLdQKV);
          wmma::mma_sync(acc_s, a, b, acc_s);
        }
        wmma::store_matrix_sync(s_w + j * 16, acc_s, Cfg::kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // Online softmax over this tile, in the exp2 domain.
      float s[kBlockN / 2];
      float tile_max = -INFINITY;
#pragma unroll
      for (int c2 = 0; c2 < kBlockN / 2; ++c2) {
        const int c = my_half + 2 * c2;
        float x = s_w[my_row * Cfg::kLdS + c];
        x = p.has_softcap ? tanhf(x * p.softcap_in) * p.softcap_out_log2 : x * p.scale_log2;
        const int64_t key = n0 + c;
        bool keep = key < keys;
        if (kBounded) {
          const int64_t rel = key - (my_pos + diag);  // key position relative to the row's diagonal
          if (p.window_right >= 0) keep = keep && rel <= p.window_right;
          if (p.window_left >= 0) keep = keep && rel >= -int64_t(p.window_left);
        }
        s[c2] = keep ? x : -INFINITY;
        tile_max = fmaxf(tile_max, s[c2]);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_new = fmaxf(m_i, tile_max);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      const float alpha = exp2f(m_i - m_safe);
      float tile_sum = 0.f;
#pragma unroll
      for (int c2 = 0; c2 < kBlockN / 2; ++c2) {
        const float pr = exp2f(s[c2] - m_safe);
        tile_sum += pr;  // the sum uses fp32 probabilities; P V uses them rounded to T
        p_w[my_row * Cfg::kLdP + my_half + 2 * c2] = ElementTraits<Tag>::from_float(pr);
      }
      tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
      l_i = l_i * alpha + tile_sum;
      m_i = m_new;

      // Rescale O by alpha: a 16x16 tile with alpha[r] across row r, in S's space
      // (every lane has read its S values above).
      __syncwarp();
#pragma unroll
      for (int c = 0; c < 8; ++c) s_w[my_row * Cfg::kLdS + my_half * 8 + c] = alpha;
      __syncwarp();
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> alpha_frag;
      wmma::load_matrix_sync(alpha_frag, s_w, Cfg::kLdS, wmma::mem_row_major);
#pragma unroll
      for (int d = 0; d < kDFrags; ++d) {
#pragma unroll
        for (int t = 0; t < alpha_frag.num_elements; ++t) acc_o[d].x[t] *= alpha_frag.x[t];
      }
    }

    __pipeline_wait_prior(0);  // V_j has landed
    __syncthreads();           // ... for every thread; and all warps are done reading K_j
    if (n0 + kBlockN < n_end) {
      copy_tile_async<T, kHeadDim, Cfg::kThreads>(smem_k, Cfg::kLdQKV, kBlockN, k_row(n0 + kBlockN));
    }
    __pipeline_commit();

    if (warp_active) {
      // O += P V
#pragma unroll
      for (int d = 0; d < kDFrags; ++d) {
#pragma unroll
        for (int j = 0; j < kNFrags; ++j) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, p_w + j * 16, Cfg::kLdP);
          wmma::load_matrix_sync(b, smem_v + j * 16 * Cfg::kLdQKV + d * 16, Cfg::kLdQKV);
          wmma::mma_sync(acc_o[d], a, b, acc_o[d]);
        }
      }
    }
  }

  // Epilogue: stage O through shared memory (reusing the tiles' space), then each lane
  // pair writes its row divided by l. Rows with no visible key: out 0, lse +inf
  // (-inf for a split's partial result, so the merge gives it zero weight).
  __pipeline_wait_prior(0);
  __syncthreads();
  float* o_w = reinterpret_cast<float*>(smem_raw) + warp * 16 * Cfg::kLdO;
#pragma unroll
  for (int d = 0; d < kDFrags; ++d) wmma::store_matrix_sync(o_w + d * 16, acc_o[d], Cfg::kLdO, wmma::mem_row_major);
  __syncwarp();
  if (my_packed_row >= n_rows) return;

  const int head = kv_head * group + my_packed_row / L;
  const bool empty = l_i == 0.f;
  const float inv_l = empty ? 0.f : 1.f / l_i;
  const float* o_row = o_w + my_row * Cfg::kLdO;
  if (p.num_splits > 1) {
    const int64_t row_index = ((int64_t(split) * p.batch + batch) * p.heads_q + head) * L + my_pos;
    float* dst = p.out_accum + row_index * kHeadDim;
    for (int c = my_half; c < kHeadDim; c += 2) dst[c] = o_row[c] * inv_l;
    if (my_half == 0) p.lse_accum[row_index] = empty ? -INFINITY : (m_i + log2f(l_i)) * kLn2;
  } else {
    T* dst = static_cast<T*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride + my_pos * p.o_row_stride;
    for (int chunk = my_half; chunk < kHeadDim / 8; chunk += 2) {
      alignas(16) T vals[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) vals[e] = ElementTraits<Tag>::from_float(o_row[chunk * 8 + e] * inv_l);
      *reinterpret_cast<uint4*>(dst + chunk * 8) = *reinterpret_cast<const uint4*>(vals);
    }
    if (my_half == 0) {
      p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + my_pos] =
          empty ? INFINITY : (m_i + log2f(l_i)) * kLn2;
    }
  }
}

template <typename Tag, int kHeadDim, bool kBounded>
void launch_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Cfg = FwdConfig<kHeadDim>;
  auto kernel = flash_fwd_kernel<Tag, kHeadDim, kBounded>;
  // Above 48 KB of dynamic shared memory must be asked for (per device; cheap to repeat).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  const int rows = (params.heads_q / params.heads_kv) * params.seqlen_q;
  const dim3 grid(params.batch * params.heads_kv, (rows + Cfg::kBlockM - 1) / Cfg::kBlockM, params.num_splits);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(params);
}

}  // namespace fastattn

// One line per translation unit in csrc/instantiations/.
#define FASTATTN_INSTANTIATE_FWD(TAG, HEAD_DIM, BOUNDED) \
  template void fastattn::launch_flash_fwd<fastattn::TAG, HEAD_DIM, BOUNDED>(const fastattn::FwdParams&, cudaStream_t);
