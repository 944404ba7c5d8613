// head dim 128, fp16, causal or sliding window (key bounds checked per element). One instantiation per file keeps each compile short and parallel.
#include "../flash_fwd_kernel.cuh"

FASTATTN_INSTANTIATE_FWD(Half, 128, true)
