// Tensors -> FwdParams, shared by the CUDA op (flash_api.cpp) and the CPU emulation of
// the kernel (emulation/flash_fwd_emulated.cpp), so both run the kernel on the same
// parameters. Compiled by the host compiler with ATen headers only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "flash_params.h"

namespace fastattn {

// Outputs in q's memory layout: out (B, L, H, D) underneath when q is a transposed
// (B, L, H, D) buffer; lse (B, H, L) float32.
inline std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& q) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = q.stride(1) < q.stride(2) ? at::empty({B, L, Hq, D}, q.options()).transpose(1, 2)
                                             : at::empty({B, Hq, L, D}, q.options());
  return {out, at::empty({B, Hq, L}, q.options().dtype(at::kFloat))};
}

inline void check_seqused_k(const std::optional<at::Tensor>& seqused_k, const at::Tensor& q) {
  if (!seqused_k.has_value()) return;
  const at::Tensor& used = *seqused_k;
  TORCH_CHECK(used.device() == q.device(), "seqused_k must be on ", q.device(), ", got ", used.device());
  TORCH_CHECK(used.scalar_type() == at::kInt, "seqused_k must be int32, got ", used.scalar_type());
  TORCH_CHECK(used.dim() == 1 && used.size(0) == q.size(0) && used.is_contiguous(),
              "seqused_k must be a contiguous (batch,) = (", q.size(0), ",) tensor, got shape ", used.sizes());
}

// key_mask: (batch or 1, seqlen_k) bool, keys contiguous.
inline void check_key_mask(const std::optional<at::Tensor>& key_mask, const at::Tensor& q, const at::Tensor& k) {
  if (!key_mask.has_value()) return;
  const at::Tensor& m = *key_mask;
  TORCH_CHECK(m.device() == q.device(), "key_mask must be on ", q.device(), ", got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, "key_mask must be bool (True = attend), got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && (m.size(0) == q.size(0) || m.size(0) == 1) && m.size(1) == k.size(2) &&
                  (m.stride(1) == 1 || m.size(1) <= 1),
              "key_mask must be a (batch or 1, seqlen_k) = (", q.size(0), ", ", k.size(2),
              ") bool tensor with contiguous keys, got shape ", m.sizes(), " strides ", m.strides());
}

// Everything but the split-KV fields (num_splits = 1).
inline FwdParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
                             bool lower_right, double softcap, const std::optional<at::Tensor>& seqused_k,
                             const std::optional<at::Tensor>& key_mask) {
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
  p.batch = int(q.size(0)), p.heads_q = int(q.size(1)), p.heads_kv = int(k.size(1));
  p.seqlen_q = int(q.size(2)), p.seqlen_k = int(k.size(2));
  p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
  p.key_mask = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  p.key_mask_batch_stride = key_mask.has_value() && key_mask->size(0) > 1 ? key_mask->stride(0) : 0;
  constexpr double kLog2e = 1.4426950408889634;
  p.has_softcap = softcap > 0;
  p.scale_log2 = float(scale * kLog2e);
  p.softcap_in = p.has_softcap ? float(scale / softcap) : 0.f;
  p.softcap_out_log2 = p.has_softcap ? float(softcap * kLog2e) : 0.f;
  p.window_left = int(std::min<int64_t>(window_left, INT32_MAX));
  p.window_right = int(std::min<int64_t>(window_right, INT32_MAX));
  p.lower_right = lower_right;
  p.num_splits = 1;
  return p;
}

// CTAs of one launch: (batch x kv heads, row blocks); rows pack the query heads of a kv head.
inline int64_t row_blocks(const at::Tensor& q, const at::Tensor& k) {
  const int64_t block_m = block_m_for(int(q.size(3)));
  return ((q.size(1) / k.size(1)) * q.size(2) + block_m - 1) / block_m;
}

// Room for split-KV partial results: (splits, B, Hq, L, D) and (splits, B, Hq, L) float32.
inline std::tuple<at::Tensor, at::Tensor> split_buffers(FwdParams& p, const at::Tensor& q, int splits) {
  p.num_splits = splits;
  if (splits <= 1) return {};
  at::Tensor out_accum = at::empty({splits, q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
  at::Tensor lse_accum = at::empty({splits, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out_accum = out_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  return {out_accum, lse_accum};
}

}  // namespace fastattn
