// Split-KV merge: each split s left, for every query row, its own normalized output
// O_s and log-sum-exp lse_s (natural log, -inf when it saw no visible key). The row's
//   lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * O_s,
// computed with the largest lse_s subtracted first. A row no split could see gets
// out = 0 and lse = +inf, as in the unsplit kernel. One warp per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "flash_params.h"

namespace fastattn {
namespace {

__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename T>
__global__ void __launch_bounds__(128) flash_combine_kernel(const FwdParams p, int head_dim) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, l) flattened
  if (row >= rows) return;
  const int l = int(row % p.seqlen_q);
  const int h = int((row / p.seqlen_q) % p.heads_q);
  const int b = int(row / (int64_t(p.seqlen_q) * p.heads_q));

  float lse_max = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) lse_max = fmaxf(lse_max, p.lse_accum[s * rows + row]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, offset));

  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + l * p.o_row_stride;
  if (lse_max == -INFINITY) {  // no split saw a visible key
    for (int c = lane; c < head_dim; c += 32) store(out + c, 0.f);
    if (lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + l] = INFINITY;
    return;
  }
  float sum = 0.f;
  for (int s = lane; s < p.num_splits; s += 32) sum += expf(p.lse_accum[s * rows + row] - lse_max);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float lse = lse_max + logf(sum);

  for (int c = lane; c < head_dim; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = expf(p.lse_accum[s * rows + row] - lse);  // 0 for an empty split
      acc += w * p.out_accum[(s * rows + row) * head_dim + c];
    }
    store(out + c, acc);
  }
  if (lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + l] = lse;
}

template <typename Tag> struct CudaType;
template <> struct CudaType<Half> { using type = __half; };
template <> struct CudaType<BFloat16> { using type = __nv_bfloat16; };

}  // namespace

template <typename Tag>
void launch_flash_combine(const FwdParams& params, int head_dim, cudaStream_t stream) {
  const int64_t rows = int64_t(params.batch) * params.heads_q * params.seqlen_q;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  flash_combine_kernel<typename CudaType<Tag>::type><<<grid, 128, 0, stream>>>(params, head_dim);
}

template void launch_flash_combine<Half>(const FwdParams&, int, cudaStream_t);
template void launch_flash_combine<BFloat16>(const FwdParams&, int, cudaStream_t);

}  // namespace fastattn
