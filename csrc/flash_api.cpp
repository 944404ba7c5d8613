// The torch op: torch.ops.fastattn.fwd(q, k, v, scale, window_left, window_right,
// lower_right, softcap, seqused_k, num_splits) -> (out, lse).
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
                                       const std::optional<at::Tensor>& seqused_k, int64_t num_splits) {
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

  // Output in q's memory layout: (B, L, H, D) when q is a transposed (B, L, H, D) buffer.
  at::Tensor out = q.stride(1) < q.stride(2) ? at::empty({B, L, Hq, D}, q.options()).transpose(1, 2)
                                             : at::empty({B, Hq, L, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, L}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || L == 0) return {out, lse};

  if (seqused_k.has_value()) {
    const at::Tensor& used = *seqused_k;
    TORCH_CHECK(used.device() == q.device(), "seqused_k must be on ", q.device(), ", got ", used.device());
    TORCH_CHECK(used.scalar_type() == at::kInt, "seqused_k must be int32, got ", used.scalar_type());
    TORCH_CHECK(used.dim() == 1 && used.size(0) == B && used.is_contiguous(),
                "seqused_k must be a contiguous (batch,) = (", B, ",) tensor, got shape ", used.sizes());
  }

  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.batch = int(B), p.heads_q = int(Hq), p.heads_kv = int(Hkv), p.seqlen_q = int(L), p.seqlen_k = int(S);
  p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
  constexpr double kLog2e = 1.4426950408889634;
  p.has_softcap = softcap > 0;
  p.scale_log2 = float(scale * kLog2e);
  p.softcap_in = p.has_softcap ? float(scale / softcap) : 0.f;
  p.softcap_out_log2 = p.has_softcap ? float(softcap * kLog2e) : 0.f;
  p.window_left = int(std::min<int64_t>(window_left, INT32_MAX));
  p.window_right = int(std::min<int64_t>(window_right, INT32_MAX));
  p.lower_right = lower_right;

  const int64_t row_blocks = ((Hq / Hkv) * L + kBlockM - 1) / kBlockM;
  TORCH_CHECK(row_blocks <= 65535, "too many query rows per kv head for one launch (", (Hq / Hkv) * L, ")");
  const int ctas = int(B * Hkv * row_blocks);
  int splits = num_splits > 0 ? int(num_splits) : choose_num_splits(ctas, int(L), int(S), int(D), info.sm_count);
  splits = std::max(1, std::min(splits, 256));
  p.num_splits = splits;
  at::Tensor out_accum, lse_accum;
  if (splits > 1) {
    out_accum = at::empty({splits, B, Hq, L, D}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({splits, B, Hq, L}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }

  const bool bounded = window_left >= 0 || window_right >= 0;
  if (dtype == at::kHalf) {
    launch<Half>(p, int(D), bounded, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) launch_flash_combine<Half>(p, int(D), stream);
  } else {
    launch<BFloat16>(p, int(D), bounded, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) launch_flash_combine<BFloat16>(p, int(D), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left=-1, int window_right=-1, "
      "bool lower_right=False, float softcap=0.0, Tensor? seqused_k=None, int num_splits=0) -> (Tensor, Tensor)");
  m.def("head_dims() -> int[]", &fastattn::compiled_head_dims);
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("fwd", &fastattn::fwd); }
