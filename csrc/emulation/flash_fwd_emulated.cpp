// The CUDA kernel's body (flash_fwd_kernel.cuh) run on the CPU, for tests on machines
// without a GPU: torch.ops.fastattn_emulated.fwd, CPU tensors in, the same (out, lse)
// contract as torch.ops.fastattn.fwd (plus the split-KV partial results).
//
// How the GPU is stood in for (HostArch):
//  - a CTA is kThreads OS threads, __syncthreads a barrier over them, a warp 32 of them;
//  - warp shuffles and the m16n8k16 MMA are collective: each lane posts its registers
//    to its warp, a warp barrier, then each lane computes its own result. The MMA reads
//    which lane holds which matrix element from CUTLASS's MMA_Traits layouts for the
//    real instruction, so the kernel's register-level logic (row ownership, the quad
//    reductions, reusing the accumulator as the next A operand) is tested as it runs
//    on the GPU;
//  - ldmatrix becomes CuTe's plain copy (same register contents, no instruction);
//  - cp.async copies land either at issue ("eager") or only at the thread's wait
//    ("lazy", the latest the hardware may); a missing wait or barrier shows up in one
//    of the two;
//  - shared memory is poisoned before each CTA, so reading what nobody wrote shows up.
// Build: g++ through torch.utils.cpp_extension (tests/test_cuda_emulated.py), with the
// CUTLASS headers of the nvidia-cutlass package. Only a few (dtype, head dim, bounded)
// combinations are instantiated: they cover every distinct tile configuration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "../flash_api.h"
#include "../flash_fwd_kernel.cuh"

namespace fastattn {
namespace emulation {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const size_t generation = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int n_;
  int count_ = 0;
  size_t generation_ = 0;
};

struct Warp {
  Barrier barrier{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  float x[32];
};

struct Cta {
  explicit Cta(int threads) : barrier(threads), warps(threads / 32) {}
  Barrier barrier;
  std::vector<Warp> warps;
};

struct Lane {
  Cta* cta;
  int tid;
  bool eager_copies;
  std::vector<std::pair<void*, const void*>> pending;  // cp.async copies not landed yet
  Warp& warp() const { return cta->warps[tid / 32]; }
  int lane() const { return tid % 32; }
};

thread_local Lane* t_lane = nullptr;

// mma.sync.m16n8k16 (fp32 accumulate) for one warp, from CUTLASS's layouts of it.
template <typename Tag>
struct EmulatedMma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];

  static void fma(float& d0, float& d1, float& d2, float& d3, const uint32_t& a0, const uint32_t& a1,
                  const uint32_t& a2, const uint32_t& a3, const uint32_t& b0, const uint32_t& b1, const float& c0,
                  const float& c1, const float& c2, const float& c3) {
    using Traits = cute::MMA_Traits<typename CuteTypes<Tag>::Mma>;
    using Element = typename CuteTypes<Tag>::Element;
    Warp& w = t_lane->warp();
    const int lane = t_lane->lane();
    const uint32_t a[4] = {a0, a1, a2, a3};
    const uint32_t b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};  // c may alias d: read before writing
    std::memcpy(w.a[lane], a, sizeof(a));
    std::memcpy(w.b[lane], b, sizeof(b));
    std::memcpy(w.c[lane], c, sizeof(c));
    w.barrier.wait();

    auto element = [](const uint32_t* regs, int v) {  // value v of a lane: half v % 2 of register v / 2
      Element e;
      std::memcpy(&e, reinterpret_cast<const char*>(regs + v / 2) + 2 * (v % 2), sizeof(e));
      return float(e);
    };
    float A[16][16], B[8][16];  // A (m, k), B (n, k)
    for (int t = 0; t < 32; ++t) {
      for (int v = 0; v < 8; ++v) {
        const int idx = typename Traits::ALayout{}(t, v);  // column-major (M, K)
        A[idx % 16][idx / 16] = element(w.a[t], v);
      }
      for (int v = 0; v < 4; ++v) {
        const int idx = typename Traits::BLayout{}(t, v);  // column-major (N, K)
        B[idx % 8][idx / 8] = element(w.b[t], v);
      }
    }
    float d[4];
    for (int v = 0; v < 4; ++v) {
      const int idx = typename Traits::CLayout{}(lane, v);  // column-major (M, N)
      float acc = c[v];
      for (int k = 0; k < 16; ++k) acc += A[idx % 16][k] * B[idx / 16][k];
      d[v] = acc;
    }
    w.barrier.wait();  // every lane has read the posted registers
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

}  // namespace emulation
}  // namespace fastattn

namespace cute {
template <typename Tag>
struct MMA_Traits<fastattn::emulation::EmulatedMma<Tag>> : MMA_Traits<typename fastattn::CuteTypes<Tag>::Mma> {};
}  // namespace cute

namespace fastattn {
namespace emulation {

struct HostArch {
  template <typename Tag>
  using Mma = EmulatedMma<Tag>;
  using LoadMatrix = cute::DefaultCopy;
  using LoadMatrixTransposed = cute::DefaultCopy;

  static void copy_async_16(void* smem_dst, const void* gmem_src) {
    if (t_lane->eager_copies) {
      std::memcpy(smem_dst, gmem_src, 16);
    } else {
      t_lane->pending.emplace_back(smem_dst, gmem_src);
    }
  }
  static void commit() {}
  static void wait_all() {
    for (auto& [dst, src] : t_lane->pending) std::memcpy(dst, src, 16);
    t_lane->pending.clear();
  }
  static void sync_block() { t_lane->cta->barrier.wait(); }
  static float exp2(float x) { return std::exp2(x); }
  static float shfl_xor(float x, int lane_mask) {
    Warp& w = t_lane->warp();
    w.x[t_lane->lane()] = x;
    w.barrier.wait();
    const float y = w.x[t_lane->lane() ^ lane_mask];
    w.barrier.wait();
    return y;
  }
};

template <typename Tag, int kHeadDim, bool kBounded>
void run(const FwdParams& p, bool eager_copies) {
  using Kt = FwdTraits<Tag, kHeadDim, HostArch>;
  const int rows = (p.heads_q / p.heads_kv) * p.seqlen_q;
  const int grid_x = p.batch * p.heads_kv, grid_y = (rows + Kt::kBlockM - 1) / Kt::kBlockM;
  std::vector<char> smem_buffer(Kt::kSmemBytes + 128);
  char* smem = smem_buffer.data() + (128 - reinterpret_cast<uintptr_t>(smem_buffer.data()) % 128) % 128;
  for (int z = 0; z < p.num_splits; ++z) {
    for (int y = 0; y < grid_y; ++y) {
      for (int x = 0; x < grid_x; ++x) {
        std::memset(smem, 0x7f, Kt::kSmemBytes);  // NaN (fp16) / huge (bf16): unwritten reads show
        Cta cta(Kt::kThreads);
        std::vector<std::thread> threads;
        threads.reserve(Kt::kThreads);
        for (int tid = 0; tid < Kt::kThreads; ++tid) {
          threads.emplace_back([&, tid] {
            Lane lane{&cta, tid, eager_copies, {}};
            t_lane = &lane;
            flash_fwd_block<Kt, kBounded, HostArch>(p, smem, tid, x, y, z);
            HostArch::wait_all();
            t_lane = nullptr;
          });
        }
        for (auto& t : threads) t.join();
      }
    }
  }
}

// The instantiated (dtype, head dim, bounded) combinations; see the header comment.
#define FASTATTN_EMULATED_CONFIGS(X) \
  X(Half, 64, false)                 \
  X(Half, 64, true)                  \
  X(BFloat16, 96, true)              \
  X(BFloat16, 128, false)            \
  X(Half, 128, true)                 \
  X(BFloat16, 256, true)

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t window_left, int64_t window_right, bool lower_right, double softcap,
                            const std::optional<at::Tensor>& seqused_k, int64_t num_splits,
                            const std::optional<at::Tensor>& key_mask, bool eager_copies) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->stride(3) == 1,
                "the emulation takes 4-d CPU tensors with a contiguous last dim");
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->size(3) == q.size(3), "q, k, v: same dtype and head dim");
    for (int d = 0; d < 3; ++d) TORCH_CHECK(t->stride(d) % 8 == 0, "strides must be multiples of 8 elements");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "tensors must be 16-byte aligned");
  }
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  check_seqused_k(seqused_k, q);
  check_key_mask(key_mask, q, k);
  auto [out, lse] = empty_outputs(q);
  out.fill_(NAN);  // poison: every element must be written
  lse.fill_(NAN);
  FwdParams p = make_params(q, k, v, out, lse, scale, window_left, window_right, lower_right, softcap, seqused_k,
                            key_mask);
  auto [out_accum, lse_accum] = split_buffers(p, q, int(std::max<int64_t>(num_splits, 1)));
  if (p.num_splits > 1) {
    out_accum.fill_(NAN);
    lse_accum.fill_(NAN);
  }
  const bool bounded = window_left >= 0 || window_right >= 0;
  const int64_t head_dim = q.size(3);
  bool ran = false;
#define FASTATTN_RUN(TAG, D, BOUNDED)                                                                  \
  if (!ran && (q.scalar_type() == at::k##TAG) && head_dim == D && bounded == BOUNDED) {               \
    run<TAG, D, BOUNDED>(p, eager_copies);                                                             \
    ran = true;                                                                                        \
  }
  FASTATTN_EMULATED_CONFIGS(FASTATTN_RUN)
#undef FASTATTN_RUN
  TORCH_CHECK(ran, "(", q.scalar_type(), ", head_dim=", head_dim, ", bounded=", bounded,
              ") is not instantiated in the emulation");
  if (p.num_splits <= 1) return {out, lse};
  return {out, lse, out_accum, lse_accum};
}

std::vector<std::string> configs() {
  std::vector<std::string> names;
#define FASTATTN_NAME(TAG, D, BOUNDED) names.push_back(std::string(#TAG) + "," + #D + "," + #BOUNDED);
  FASTATTN_EMULATED_CONFIGS(FASTATTN_NAME)
#undef FASTATTN_NAME
  return names;
}

}  // namespace emulation
}  // namespace fastattn

TORCH_LIBRARY(fastattn_emulated, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, bool lower_right, "
      "float softcap, Tensor? seqused_k, int num_splits, Tensor? key_mask, bool eager_copies) -> Tensor[]");
  m.def("configs() -> str[]", &fastattn::emulation::configs);
}

TORCH_LIBRARY_IMPL(fastattn_emulated, CPU, m) { m.impl("fwd", &fastattn::emulation::fwd); }
