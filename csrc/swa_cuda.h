// Interface between the CUDA kernels (swa_cuda.cu, plain CUDA: no torch headers, so `nvcc -c` checks it quickly)
// and the torch glue that checks tensors and registers the ops (swa_cuda.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace swarr {

enum class CudaDType { F32, F16, BF16 };

// q (B, Hq, N, D), k/v (B, Hkv, N, D), window W (keys per query, including itself), 1 <= W <= max(N, 1).
struct AttnShape {
  int64_t B, Hq, Hkv, N, D, W;
};

// All pointers are device pointers to contiguous tensors of the given dtype; lse and delta are float32 (B, Hq, N).
// Each returns the launch status (cudaGetLastError after its launches).
cudaError_t launch_fwd(CudaDType dt, const void* q, const void* k, const void* v, void* out, float* lse,
                       AttnShape s, float scale, cudaStream_t stream);
// delta is a float32 (B, Hq, N) workspace.
cudaError_t launch_bwd(CudaDType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, float* delta, void* dq, void* dk, void* dv, AttnShape s, float scale,
                       cudaStream_t stream);
// q (B, Hq, D), caches (B, Hkv, S, D), valid (B,) int64 (the glue checks 1 <= valid <= S where it can; the kernel
// clamps to [0, S], a row with 0 valid slots getting zeros).
cudaError_t launch_decode(CudaDType dt, const void* q, const void* k_cache, const void* v_cache, const int64_t* valid,
                          void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale,
                          cudaStream_t stream);

}  // namespace swarr
