// Torch glue for the CUDA kernels: input checks, output allocation, stream, and registration of the CUDA
// implementations of torch.ops.swarr.{fwd, bwd, decode} (the schemas are defined in swa_cpu.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "swa.h"
#include "swa_cuda.h"

namespace swarr {
namespace {

CudaDType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CudaDType::F32;
    case at::kHalf: return CudaDType::F16;
    case at::kBFloat16: return CudaDType::BF16;
    default:
      TORCH_CHECK(false, "swarr: the CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_head_dim(int64_t D) {
  TORCH_CHECK(D >= 1 && D <= 256, "swarr: the CUDA kernels support head dims 1..256, got ", D);
}

// Launch-grid limits: the tensor-core forward puts the heads on grid y and the batch on grid z (at most 65535
// each); every kernel puts its blocks on grid x (at most 2^31 - 1; the row kernels have 8 rows per block).
void check_grid(const at::Tensor& q) {
  constexpr int64_t kMaxYZ = 65535, kMaxX = 2147483647;
  TORCH_CHECK(q.size(0) <= kMaxYZ && q.size(1) <= kMaxYZ, "swarr: the CUDA kernels take at most ", kMaxYZ,
              " batch rows and ", kMaxYZ, " query heads (CUDA grid limit), got ", q.size(0), " and ", q.size(1));
  TORCH_CHECK(q.numel() / std::max<int64_t>(1, q.size(-1)) / 8 < kMaxX, "swarr: ", q.numel() / q.size(-1),
              " query rows exceed the CUDA grid limit of the row kernels (8 x (2^31 - 1))");
}

AttnShape shape_of(const at::Tensor& q, const at::Tensor& k, int64_t window) {
  check_grid(q);
  check_grid(k);  // the key/value-row backward kernel runs over B x Hkv x N rows
  return AttnShape{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), effective_window(window, q.size(2))};
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            int64_t window, double scale) {
  check_qkv(q, k, v, window);
  const CudaDType dt = cuda_dtype(q);
  check_head_dim(q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0)
    C10_CUDA_CHECK(launch_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                              shape_of(q, k, window), static_cast<float>(scale),
                              c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        int64_t window, double scale) {
  check_qkv(q, k, v, window);
  const CudaDType dt = cuda_dtype(q);
  check_head_dim(q.size(3));
  check_same(q, dout, "q and dout");
  check_same(q, out, "q and out");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "swarr: dout and out must have q's shape");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "swarr: lse must be float32 (B, Hq, N) on q's device");
  check_contiguous(dout, "dout");
  check_contiguous(out, "out");
  check_contiguous(lse, "lse");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0)
    C10_CUDA_CHECK(launch_bwd(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                              lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                              dv.data_ptr(), shape_of(q, k, window), static_cast<float>(scale),
                              c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

// valid must lie in [1, S], as on the CPU. Checking it reads two numbers back to the host (a synchronisation), which
// a stream being captured into a CUDA graph cannot do: there the check is skipped (the graph's first, eager runs
// have made it) and the kernel clamps valid to [0, S], a row with no valid slot getting zeros.
void check_valid(const at::Tensor& valid, int64_t S) {
  if (valid.numel() == 0 || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return;
  const auto [lo_t, hi_t] = at::aminmax(valid);
  const at::Tensor both = at::stack({lo_t, hi_t}).cpu();
  const int64_t lo = both[0].item<int64_t>(), hi = both[1].item<int64_t>();
  TORCH_CHECK(lo >= 1 && hi <= S, "swarr: valid holds values in [", lo, ", ", hi, "], outside [1, ", S, "]");
}

at::Tensor decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& valid, double scale) {
  check_decode(q, k_cache, v_cache, valid);
  const CudaDType dt = cuda_dtype(q);
  check_head_dim(q.size(2));
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.size(0) * q.size(1) < 2147483647, "swarr: decode takes fewer than 2^31 (batch, head) pairs");
  check_valid(valid, k_cache.size(2));
  at::Tensor out = new_output(q.sizes(), q.options());
  if (q.numel() > 0)
    C10_CUDA_CHECK(launch_decode(dt, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                 valid.data_ptr<int64_t>(), out.data_ptr(), q.size(0), q.size(1), k_cache.size(1),
                                 k_cache.size(2), q.size(2), static_cast<float>(scale),
                                 c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(swarr, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
  m.impl("decode", &decode_cuda);
}

}  // namespace swarr
