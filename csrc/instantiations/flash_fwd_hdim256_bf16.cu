// head dim 256, bf16, no key bounds. One instantiation per file keeps each compile short and parallel.
#include "../flash_fwd_kernel.cuh"

FASTATTN_INSTANTIATE_FWD(BFloat16, 256, false)
