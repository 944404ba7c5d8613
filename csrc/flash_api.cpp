// The torch op: torch.ops.fastattn.fwd(q, k, v, scale, window_left, window_right,
// lower_right, softcap, seqused_k, num_splits, key_mask) -> (out, lse).
//
// Its checks repeat fastattn/backends/cuda.py's reasons with the same wording (a test
// holds them together), so a call that reaches C++ by another route fails the same
// way. The fake (meta) implementation, for torch.compile, is registered from Python in
// fastattn/ops/cuda_fwd.py and mirrors the output layout chosen here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "flash_api.h"
#include "flash_params.h"

namespace fastattn {
namespace {

// The head dims this library was compiled with (FASTATTN_CUDA_HEAD_DIMS at build time).
std::vector<int64_t> compiled_head_dims() {
  std::vector<int64_t> dims;
#ifdef FASTATTN_HDIM_64
  dims.push_back(64);
#endif
#ifdef FASTATTN_HDIM_96
  dims.push_back(96);
#endif
#ifdef FASTATTN_HDIM_128
  dims.push_back(128);
#endif
#ifdef FASTATTN_HDIM_256
  dims.push_back(256);
#endif
  return dims;
}

std::string join(const std::vector<int64_t>& values) {
  std::ostringstream s;
  for (size_t i = 0; i < values.size(); ++i) s << (i ? ", " : "") << values[i];
  return s.str();
}

struct DeviceInfo {
  int major = 0, minor = 0, sm_count = 0;
};

DeviceInfo device_info(int index) {
  // Queried per call: cudaDeviceGetAttribute is a cheap cached lookup in the runtime.
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, index));
  return info;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " is on ", t.device(), "; the cuda backend needs tensors on a CUDA device");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-d (batch, heads, seqlen, head_dim), got ", t.dim(), " dims");
  TORCH_CHECK(t.stride(3) == 1, "the last dim of q, k and v must be contiguous (stride 1); ", name,
              " has stride ", t.stride(3));
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && t.stride(d) % 8 == 0;
  TORCH_CHECK(aligned, name, " must start on a 16-byte boundary with batch/head/row strides that are multiples ",
              "of 8 elements (strides ", t.strides(), "); the Python backend copies such inputs");
}

// Decode (q_len <= 16) against long keys leaves most SMs idle: one CTA per (batch,
// kv head) cannot fill the GPU. Split the keys so that about one wave of CTAs runs,
// keeping at least 2 key tiles per split (less would spend more time merging than
// computing).
int choose_num_splits(int ctas, int seqlen_q, int seqlen_k, int head_dim, int sm_count) {
  if (seqlen_q > 16 || ctas >= sm_count) return 1;
  const int tiles = (seqlen_k + block_n_for(head_dim) - 1) / block_n_for(head_dim);
  const int by_sms = (sm_count + ctas - 1) / ctas;
  return std::max(1, std::min({by_sms, tiles / 2, 128}));
}

template <typename Tag>
void launch(const FwdParams& params, int head_dim, bool bounded, cudaStream_t stream) {
#define FASTATTN_CASE(D)                                                      \
  if (head_dim == D) {                                                        \
    if (bounded) launch_flash_fwd<Tag, D, true>(params, stream);              \
    else launch_flash_fwd<Tag, D, false>(params, stream);                     \
    return;                                                                   \
  }
#ifdef FASTATTN_HDIM_64
  FASTATTN_CASE(64)
#endif
#ifdef FASTATTN_HDIM_96
  FASTATTN_CASE(96)
#endif
#ifdef FASTATTN_HDIM_128
  FASTATTN_CASE(128)
#endif
#ifdef FASTATTN_HDIM_256
  FASTATTN_CASE(256)
#endif
#undef FASTATTN_CASE
  TORCH_CHECK(false, "head_dim=", head_dim, " is not compiled (compiled: ", join(compiled_head_dims()), ")");
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       int64_t window_left, int64_t window_right, bool lower_right, double softcap,
                                       const std::optional<at::Tensor>& seqused_k, int64_t num_splits,
                                       const std::optional<at::Tensor>& key_mask) {
  check_input(q, "q");
  check_input(k, "k");
  check_input(v, "v");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, k and v must be on the same device; got ",
              q.device(), ", ", k.device(), " and ", v.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "dtype ", dtype,
              " is not supported (supported: float16, bfloat16)");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k and v must have the same dtype; got ",
              dtype, ", ", k.scalar_type(), " and ", v.scalar_type());

  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "q, k and v must have the same batch size");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, "k and v must have the same number of heads and keys");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "the number of query heads (", Hq,
              ") must be a multiple of the number of key/value heads (", Hkv, ")");
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "q, k and v must have the same head dim here (got ", D, ", ",
              k.size(3), ", ", v.size(3), "); the Python backend pads them up to a compiled one");
  const auto dims = compiled_head_dims();
  TORCH_CHECK(!dims.empty() && D <= dims.back(), "head_dim=", D, " is too large (supported: <= ",
              dims.empty() ? 0 : dims.back(), ")");
  TORCH_CHECK(std::find(dims.begin(), dims.end(), D) != dims.end(), "head_dim=", D,
              " is not compiled (compiled: ", join(dims), "); the Python backend pads q, k and v up to one");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window bounds must be >= -1 (-1 = unbounded), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(L <= INT32_MAX && S <= INT32_MAX && B * Hq <= INT32_MAX, "sizes must fit in 32 bits");

  // CUDAGuard (at::cuda::CUDAGuard is this class) and the current stream of q's device:
  // layers under device_map live on different GPUs.
  c10::cuda::CUDAGuard guard(q.device());
  const DeviceInfo info = device_info(q.get_device());
  TORCH_CHECK(info.major >= 8, "GPU compute capability ", info.major, ".", info.minor,
              " is too old (the cuda backend needs 8.0 or newer)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();

  auto [out, lse] = empty_outputs(q);
  if (B == 0 || Hq == 0 || L == 0) return {out, lse};
  check_seqused_k(seqused_k, q);
  check_key_mask(key_mask, q, k);
  FwdParams p = make_params(q, k, v, out, lse, scale, window_left, window_right, lower_right, softcap, seqused_k,
                            key_mask);

  const int64_t blocks = row_blocks(q, k);
  TORCH_CHECK(blocks <= 65535, "too many query rows per kv head for one launch (", (Hq / Hkv) * L, ")");
  const int ctas = int(B * Hkv * blocks);
  int splits = num_splits > 0 ? int(num_splits) : choose_num_splits(ctas, int(L), int(S), int(D), info.sm_count);
  auto accum = split_buffers(p, q, std::max(1, std::min(splits, 256)));  // kept alive until the launches are queued

  const bool bounded = window_left >= 0 || window_right >= 0;
  if (dtype == at::kHalf) {
    launch<Half>(p, int(D), bounded, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.num_splits > 1) launch_flash_combine<Half>(p, int(D), stream);
  } else {
    launch<BFloat16>(p, int(D), bounded, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.num_splits > 1) launch_flash_combine<BFloat16>(p, int(D), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left=-1, int window_right=-1, "
      "bool lower_right=False, float softcap=0.0, Tensor? seqused_k=None, int num_splits=0, Tensor? key_mask=None) "
      "-> (Tensor, Tensor)");
  m.def("head_dims() -> int[]", &fastattn::compiled_head_dims);
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("fwd", &fastattn::fwd); }
