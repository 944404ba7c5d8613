// head dim 64, fp16, causal or sliding window (key bounds checked per element). One instantiation per file keeps each compile short and parallel.
#include "../flash_fwd_kernel.cuh"

FASTATTN_INSTANTIATE_FWD(Half, 64, true)
