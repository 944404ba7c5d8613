// The plain-C description of one forward call, shared by the op (flash_api.cpp,
// compiled by the host compiler with torch headers) and the kernels (*.cu, compiled
// by nvcc without torch headers, which keeps every kernel translation unit quick).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastattn {

// Element types as tags, so this header needs no cuda_fp16.h / cuda_bf16.h.
struct Half {};
struct BFloat16 {};

struct FwdParams {
  // q: (B, Hq, L, D), k: (B, Hkv, S, D), v: (B, Hkv, S, D); last dim contiguous,
  // every other stride a multiple of 8 elements, base pointers 16-byte aligned
  // (each row is copied in 16-byte cp.async chunks).
  const void* q;
  const void* k;
  const void* v;
  void* out;   // (B, Hq, L, D), same element type, same alignment rules
  float* lse;  // (B, Hq, L), row stride 1; natural log, +inf for rows with no visible key

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch, heads_q, heads_kv, seqlen_q, seqlen_k;
  // nullptr, or (B,) int32: keys in use per batch (<= seqlen_k); keys at or past it are
  // padding and never read. With lower_right the diagonal ends at the batch's own length.
  const int* seqused_k;
  // nullptr, or a key-padding mask: key j of batch b is visible only where
  // key_mask[b * key_mask_batch_stride + j] is true (bool bytes; batch stride 0 broadcasts).
  const bool* key_mask;
  int64_t key_mask_batch_stride;

  bool has_softcap;
  float scale_log2;        // scale * log2(e) (no softcap)
  float softcap_in;        // scale / softcap
  float softcap_out_log2;  // softcap * log2(e)

  // Key j is visible to query i when  i + diag - left <= j <= i + diag + right,
  // diag = (lower_right ? keys_b - L : 0); -1 = unbounded; causal is right = 0.
  int window_left, window_right;
  bool lower_right;

  // Split-KV (decode): num_splits > 1 writes per-split partial results, merged by
  // launch_flash_combine into out/lse.
  int num_splits;
  float* out_accum;  // (num_splits, B, Hq, L, D) float32
  float* lse_accum;  // (num_splits, B, Hq, L) float32; -inf for an empty split
};

// One instantiation per (element type, head dim, bounded) lives in csrc/instantiations/.
// kBounded: causal or a sliding window (per-element position checks on); otherwise
// only the end of the keys is checked.
template <typename Element, int kHeadDim, bool kBounded>
void launch_flash_fwd(const FwdParams& params, cudaStream_t stream);

template <typename Element>
void launch_flash_combine(const FwdParams& params, int head_dim, cudaStream_t stream);

// Kernel geometry, needed by the host side to choose the number of splits (and by
// the kernel's traits in flash_fwd_kernel.cuh).
// 128 query rows per CTA (4 warps); at head dim 256, 64 rows so that Q, K and V tiles
// fit the 99 KB of shared memory per block that sm86/sm89 GPUs (L4, RTX 4090, A10)
// allow, as FlashAttention-2 does there: 96 KB instead of 128.
constexpr int block_m_for(int head_dim) { return head_dim <= 128 ? 128 : 64; }
constexpr int block_n_for(int head_dim) { return head_dim <= 64 ? 128 : 64; }
// The least shared memory per block any sm80+ GPU lets a kernel opt in to (sm86, sm89,
// sm120: 99 KB); every tile configuration fits it (static_assert in flash_fwd_kernel.cuh),
// so no GPU the op accepts can refuse the launch for lack of it.
constexpr int kMinSmemPerBlock = 99 * 1024;

}  // namespace fastattn
