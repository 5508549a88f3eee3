// Shared by the CPU (swa_cpu.cpp) and CUDA (swa_cuda.cu) implementations: input checks and output allocation.
//
// Conventions (the same as swarr.attention_ref / swarr.decode_ref):
//   q (B, Hq, N, D), k/v (B, Hkv, N, D), Hq a multiple of Hkv (grouped-query attention), all contiguous.
//   window W >= 1 = number of keys a query sees, including itself: query i attends to key j iff j <= i and i - j < W.
//   Scores are scale * q.k; lse = log-sum-exp of the scaled scores of each query (saved for the backward).
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdlib>
#include <limits>

namespace swarr {

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), "swarr: ", what, " must be on the same device (", a.device(), " vs ",
              b.device(), ")");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "swarr: ", what, " must have the same dtype (", a.scalar_type(),
              " vs ", b.scalar_type(), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "swarr: ", name, " must be contiguous (call .contiguous() first)");
}

// q (B,Hq,N,D), k and v (B,Hkv,N,D). Returns nothing; raises a clear error on any mismatch.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "swarr: q, k, v must be 4-D (B, H, N, D), got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  check_same(q, k, "q and k");
  check_same(q, v, "q and v");
  TORCH_CHECK(k.sizes() == v.sizes(), "swarr: k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "swarr: q (B, Hq, N, D) and k (B, Hkv, N, D) disagree: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "swarr: query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(window >= 1, "swarr: window must be >= 1 (number of keys including the query itself), got ", window);
  check_contiguous(q, "q");
  check_contiguous(k, "k");
  check_contiguous(v, "v");
}

// The window the kernels see: W clamped to the sequence length (a larger window means the same thing, full causal
// attention), so index arithmetic such as j + W can never overflow however large the caller's W is.
inline int64_t effective_window(int64_t window, int64_t N) { return std::min(window, std::max<int64_t>(N, 1)); }

// q (B,Hq,D); caches (B,Hkv,S,D); valid (B,) int64 on the same device.
inline void check_decode(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& valid) {
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 4 && vc.dim() == 4, "swarr: decode wants q (B, Hq, D) and caches "
              "(B, Hkv, S, D), got ", q.sizes(), ", ", kc.sizes(), ", ", vc.sizes());
  check_same(q, kc, "q and k_cache");
  check_same(q, vc, "q and v_cache");
  TORCH_CHECK(kc.sizes() == vc.sizes(), "swarr: k_cache and v_cache must have the same shape");
  TORCH_CHECK(q.size(0) == kc.size(0) && q.size(2) == kc.size(3), "swarr: q (B, Hq, D) and k_cache (B, Hkv, S, D) "
              "disagree: ", q.sizes(), " vs ", kc.sizes());
  TORCH_CHECK(kc.size(1) >= 1 && q.size(1) % kc.size(1) == 0, "swarr: query heads (", q.size(1),
              ") must be a multiple of key/value heads (", kc.size(1), ")");
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == q.size(0) && valid.scalar_type() == at::kLong,
              "swarr: valid must be an int64 tensor of shape (B,), got ", valid.scalar_type(), " ", valid.sizes());
  TORCH_CHECK(valid.device() == q.device(), "swarr: valid must be on the same device as q");
  check_contiguous(q, "q");
  check_contiguous(kc, "k_cache");
  check_contiguous(vc, "v_cache");
  check_contiguous(valid, "valid");
}

// Outputs are allocated uninitialised. With SWARR_POISON=1 in the environment they are NaN-filled first, so a test
// can tell an element the kernel never wrote from one it wrote.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const char* p = std::getenv("SWARR_POISON");
  if (p != nullptr && p[0] == '1') return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
  return at::empty(sizes, opts);
}

}  // namespace swarr
