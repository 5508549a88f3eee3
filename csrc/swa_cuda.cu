// Sliding-window attention on NVIDIA GPUs (compute capability >= 8.0): forward, backward and ring-buffer decode.
//
//   * fwd_mma_kernel: the fast path for fp16/bf16 with head dim 64 or 128. FlashAttention-2 restricted to the band:
//     a block of 4 warps owns 64 queries (16 per warp) and walks only the key tiles of 64 that intersect its window,
//     [q0 - W + 1, q0 + 63]. Tiles stream through shared memory with cp.async, double-buffered; S = Q K^T and
//     O += P V run on the tensor cores (mma.sync m16n8k16, fp32 accumulate), and the softmax is online (running max
//     m and sum l per query, rescaled by exp(m_old - m_new) whenever the max grows), entirely in registers.
//   * *_generic kernels: one warp per query (or key) row, any head dim up to 256, fp32 too. They are simple and
//     exact (fp32 arithmetic); the backward uses them for every dtype.
//   * decode_kernel: one block per (batch, query head); its 4 warps split the valid slots and merge their partial
//     softmaxes at the end. Cost ~ valid slots (<= W for a ring buffer), never the position in the sequence.
#include "swa_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <type_traits>

namespace swarr {
namespace {

constexpr int kMaxPerLane = 8;  // generic kernels: a warp holds a row of up to 32 * 8 = 256 elements

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// A warp's view of one row of D elements: lane holds elements lane, lane + 32, ... (coalesced loads).
template <typename T>
__device__ __forceinline__ void load_row(float (&r)[kMaxPerLane], const T* p, int64_t D, int lane, float s = 1.f) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    r[c] = d < D ? s * to_float(p[d]) : 0.f;
  }
}
__device__ __forceinline__ float row_dot(const float (&a)[kMaxPerLane], const float (&b)[kMaxPerLane]) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) s += a[c] * b[c];
  return warp_sum(s);
}

// One key of an online softmax: running max m, running sum l, and the accumulator acc (a lane's part of the
// output row) take in score sc and value row vr, rescaling what was there by exp(m_old - m_new).
__device__ __forceinline__ void online_softmax_step(float& m, float& l, float (&acc)[kMaxPerLane], float sc,
                                                    const float (&vr)[kMaxPerLane]) {
  const float m_new = fmaxf(m, sc), alpha = expf(m - m_new), p = expf(sc - m_new);
  l = l * alpha + p;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = acc[c] * alpha + p * vr[c];
  m = m_new;
}
template <typename T>
__device__ __forceinline__ void store_row(T* p, const float (&r)[kMaxPerLane], int64_t D, int lane, float s = 1.f) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) p[d] = from_float<T>(s * r[c]);
  }
}

// Offset of the (b, kv head) matrix that query head h of batch b reads.
__device__ __forceinline__ int64_t kv_offset(const AttnShape& s, int64_t b, int64_t h) {
  return (b * s.Hkv + h / (s.Hq / s.Hkv)) * s.N * s.D;
}

// ---------------------------------------------------------------------------------------------------------------
// Generic forward: one warp per query row, online softmax over the keys [i - W + 1, i].
template <typename T>
__global__ void fwd_generic_kernel(const T* q, const T* k, const T* v, T* out, float* lse, AttnShape s, float scale) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // (b, h, i) flattened
  const int lane = threadIdx.x % 32;
  if (row >= s.B * s.Hq * s.N) return;
  const int64_t i = row % s.N, bh = row / s.N;
  const T* kb = k + kv_offset(s, bh / s.Hq, bh % s.Hq);
  const T* vb = v + kv_offset(s, bh / s.Hq, bh % s.Hq);
  float qr[kMaxPerLane], kr[kMaxPerLane], vr[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + row * s.D, s.D, lane, scale);
  float m = -1e30f, l = 0.f;
  for (int64_t j = max(int64_t(0), i - s.W + 1); j <= i; ++j) {
    load_row(kr, kb + j * s.D, s.D, lane);
    load_row(vr, vb + j * s.D, s.D, lane);
    online_softmax_step(m, l, acc, row_dot(qr, kr), vr);
  }
  store_row(out + row * s.D, acc, s.D, lane, 1.f / l);
  if (lane == 0) lse[row] = m + logf(l);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, three simple passes (FlashAttention-2 recurrences, P recomputed from lse):
//   delta_i = dO_i . O_i;  dQ_i = scale sum_j dS_ij k_j  (warp per query);
//   dV_j = sum_i P_ij dO_i,  dK_j = scale sum_i dS_ij q_i  (warp per key, over the Hq/Hkv heads that share it),
//   with P_ij = exp(scale q_i.k_j - lse_i) and dS_ij = P_ij (dO_i . v_j - delta_i). No atomics: each warp owns its row.
template <typename T>
__global__ void bwd_delta_kernel(const T* dout, const T* out, float* delta, int64_t rows, int64_t D) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float a[kMaxPerLane], b[kMaxPerLane];
  load_row(a, dout + row * D, D, lane);
  load_row(b, out + row * D, D, lane);
  const float d = row_dot(a, b);
  if (lane == 0) delta[row] = d;
}

template <typename T>
__global__ void bwd_dq_kernel(const T* dout, const T* q, const T* k, const T* v, const float* lse,
                              const float* delta, T* dq, AttnShape s, float scale) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= s.B * s.Hq * s.N) return;
  const int64_t i = row % s.N, bh = row / s.N;
  const T* kb = k + kv_offset(s, bh / s.Hq, bh % s.Hq);
  const T* vb = v + kv_offset(s, bh / s.Hq, bh % s.Hq);
  float qr[kMaxPerLane], dor[kMaxPerLane], kr[kMaxPerLane], vr[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + row * s.D, s.D, lane, scale);
  load_row(dor, dout + row * s.D, s.D, lane);
  const float lse_i = lse[row], delta_i = delta[row];
  for (int64_t j = max(int64_t(0), i - s.W + 1); j <= i; ++j) {
    load_row(kr, kb + j * s.D, s.D, lane);
    load_row(vr, vb + j * s.D, s.D, lane);
    const float p = expf(row_dot(qr, kr) - lse_i);
    const float ds = p * (row_dot(dor, vr) - delta_i);
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) acc[c] += ds * kr[c];
  }
  store_row(dq + row * s.D, acc, s.D, lane, scale);
}

template <typename T>
__global__ void bwd_dkv_kernel(const T* dout, const T* q, const T* k, const T* v, const float* lse,
                               const float* delta, T* dk, T* dv, AttnShape s, float scale) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // (b, kv head, j) flattened
  const int lane = threadIdx.x % 32;
  if (row >= s.B * s.Hkv * s.N) return;
  const int64_t j = row % s.N, b = row / s.N / s.Hkv, hkv = row / s.N % s.Hkv, rep = s.Hq / s.Hkv;
  float kr[kMaxPerLane], vr[kMaxPerLane], qr[kMaxPerLane], dor[kMaxPerLane];
  float dk_acc[kMaxPerLane] = {}, dv_acc[kMaxPerLane] = {};
  load_row(kr, k + row * s.D, s.D, lane);
  load_row(vr, v + row * s.D, s.D, lane);
  for (int64_t h = hkv * rep; h < (hkv + 1) * rep; ++h)
    for (int64_t i = j; i < min(s.N, j + s.W); ++i) {  // the queries whose window holds key j
      const int64_t qrow = (b * s.Hq + h) * s.N + i;
      load_row(qr, q + qrow * s.D, s.D, lane, scale);
      load_row(dor, dout + qrow * s.D, s.D, lane);
      const float p = expf(row_dot(qr, kr) - lse[qrow]);
      const float ds = p * (row_dot(dor, vr) - delta[qrow]);
#pragma unroll
      for (int c = 0; c < kMaxPerLane; ++c) {
        dv_acc[c] += p * dor[c];
        dk_acc[c] += ds * qr[c];  // qr already carries the scale
      }
    }
  store_row(dk + row * s.D, dk_acc, s.D, lane);
  store_row(dv + row * s.D, dv_acc, s.D, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Decode: block (b, h) with 4 warps; warp w takes slots w, w + 4, ...; then warp 0 merges the four partial
// softmaxes: out = sum_w e^(m_w - M) acc_w / sum_w e^(m_w - M) l_w with M = max_w m_w.
template <typename T>
__global__ void decode_kernel(const T* q, const T* kc, const T* vc, const int64_t* valid, T* out, int64_t Hq,
                              int64_t Hkv, int64_t S, int64_t D, float scale) {
  constexpr int kWarps = 4;
  __shared__ float sh_m[kWarps], sh_l[kWarps], sh_acc[kWarps][32 * kMaxPerLane];
  const int64_t bh = blockIdx.x, b = bh / Hq, h = bh % Hq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = min(max(valid[b], int64_t(0)), S);
  const int64_t kv = (b * Hkv + h / (Hq / Hkv)) * S * D;
  float qr[kMaxPerLane], kr[kMaxPerLane], vr[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + bh * D, D, lane, scale);
  float m = -1e30f, l = 0.f;
  for (int64_t j = warp; j < n; j += kWarps) {
    load_row(kr, kc + kv + j * D, D, lane);
    load_row(vr, vc + kv + j * D, D, lane);
    online_softmax_step(m, l, acc, row_dot(qr, kr), vr);
  }
  if (lane == 0) sh_m[warp] = m, sh_l[warp] = l;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) sh_acc[warp][lane + 32 * c] = acc[c];
  __syncthreads();
  if (warp != 0) return;
  float M = sh_m[0];
  for (int w = 1; w < kWarps; ++w) M = fmaxf(M, sh_m[w]);
  float L = 0.f, o[kMaxPerLane] = {};
  for (int w = 0; w < kWarps; ++w) {
    const float f = expf(sh_m[w] - M);  // a warp that saw no slot has l = 0 and acc = 0
    L += f * sh_l[w];
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) o[c] += f * sh_acc[w][lane + 32 * c];
  }
  store_row(out + bh * D, o, D, lane, L > 0.f ? 1.f / L : 0.f);
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core building blocks (sm_80+). Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)   [row, col]
//   B 16x8:  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8:  c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// ldmatrix.x4 loads four 8x8 tiles of 16-bit values, lanes 8m..8m+7 giving the row addresses of tile m; lane then
// holds (row g, cols 2t..2t+1) of each tile (with .trans: of the transposed tile), which is exactly these layouts.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a * b on the tensor cores, fp32 accumulate.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a pair of 16-bit values in one register (lo in the low half: the lower column).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16-byte asynchronous copy global -> shared; with ok = false the destination is zero-filled instead.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

constexpr int kBQ = 64, kBK = 64, kWarpsMma = 4;  // queries per block (16 per warp), keys per tile

template <int D>
constexpr int mma_smem_bytes() {
  return (kBQ + 4 * kBK) * (D + 8) * 2;  // Q tile + 2 stages of (K, V) tiles, rows padded by 8 elements
}

template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsMma) fwd_mma_kernel(const T* q, const T* k, const T* v, T* out,
                                                                 float* lse, AttnShape s, float scale_log2) {
  // Shared-memory rows are D + 8 elements long: the 8 row addresses of an ldmatrix then fall in distinct banks.
  constexpr int LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // kBQ x LD
  T* Ks = Qs + kBQ * LD;               // 2 stages x kBK x LD
  T* Vs = Ks + 2 * kBK * LD;           // 2 stages x kBK x LD

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t N = s.N, W = s.W, q0 = int64_t(blockIdx.x) * kBQ, h = blockIdx.y, b = blockIdx.z;
  const T* qb = q + (b * s.Hq + h) * N * D;
  const T* kb = k + kv_offset(s, b, h);
  const T* vb = v + kv_offset(s, b, h);

  // The keys this block's queries [q0, q_last] can see, visited in tiles of kBK from the first one.
  const int64_t q_last = min(q0 + kBQ, N) - 1;
  const int64_t k_begin = max(int64_t(0), q0 - W + 1), k_end = q_last + 1;
  const int n_tiles = int((k_end - k_begin + kBK - 1) / kBK);

  // Copy rows [r0, r0 + 64) of an (N x D) matrix into shared memory; rows past N become zeros.
  auto load_tile = [&](T* dst, const T* src, int64_t r0) {
    constexpr int kChunks = D / 8;  // 16-byte pieces per row
    for (int c = tid; c < 64 * kChunks; c += 32 * kWarpsMma) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = r0 + r < N;
      cp_async_16(dst + r * LD + col, src + (ok ? r0 + r : 0) * D + col, ok);
    }
  };
  load_tile(Qs, qb, q0);
  load_tile(Ks, kb, k_begin);
  load_tile(Vs, vb, k_begin);
  cp_async_commit();

  // Per thread: rows r_lo = q0 + 16 warp + g and r_lo + 8 (index r = 0, 1 below) of the output, D/8 column pairs.
  const int64_t r_lo = q0 + warp * 16 + g;
  float o[D / 8][4] = {};
  float m[2] = {-1e30f, -1e30f}, l[2] = {0.f, 0.f};  // finite start: a fully masked tile never makes inf - inf
  uint32_t qf[D / 16][4];                             // this warp's 16 query rows as A fragments

  for (int it = 0; it < n_tiles; ++it) {
    const int64_t k0 = k_begin + int64_t(it) * kBK;
    const int stage = it & 1;
    if (it + 1 < n_tiles) {  // prefetch the next tile into the other stage while this one is used
      load_tile(Ks + (stage ^ 1) * kBK * LD, kb, k0 + kBK);
      load_tile(Vs + (stage ^ 1) * kBK * LD, vb, k0 + kBK);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc)
        ldmatrix_x4(qf[kc], Qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kc * 16 + (lane >> 4) * 8);
    }
    const T* Kt = Ks + stage * kBK * LD;
    const T* Vt = Vs + stage * kBK * LD;

    // S = Q K^T: 16 x 64 per warp, as 8 column tiles of 8 keys.
    float sc[kBK / 8][4] = {};
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
      for (int np = 0; np < kBK / 16; ++np) {  // two key tiles (16 keys) per ldmatrix
        uint32_t kf[4];
        ldmatrix_x4(kf, Kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kc * 16 + ((lane >> 3) & 1) * 8);
        mma(sc[2 * np], qf[kc], kf[0], kf[1], T());
        mma(sc[2 * np + 1], qf[kc], kf[2], kf[3], T());
      }

    // Scores in log2 units (exp2 is one instruction); -inf outside the window (only tiles on the band's edge).
    const bool edge = !(k0 + kBK - 1 <= q0 && q_last - k0 < W);
#pragma unroll
    for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = k0 + nt * 8 + 2 * t + (e & 1), row = r_lo + (e >> 1) * 8;
        float x = sc[nt][e] * scale_log2;
        if (edge && (key > row || row - key >= W)) x = -INFINITY;
        sc[nt][e] = x;
      }

    // Online softmax, row by row. A row's 64 scores are spread over the 4 threads of a quad (same g).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float alpha = exp2f(m[r] - mx);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          sc[nt][e] = exp2f(sc[nt][e] - mx);
          sum += sc[nt][e];
        }
      l[r] = l[r] * alpha + sum;  // this thread's share of the row sum; the quad is summed at the end
      m[r] = mx;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) o[dt][2 * r] *= alpha, o[dt][2 * r + 1] *= alpha;
    }

    // O += P V. The accumulators of two adjacent key tiles are exactly an A fragment (16 queries x 16 keys).
#pragma unroll
    for (int kc = 0; kc < kBK / 16; ++kc) {
      uint32_t pa[4] = {pack2(sc[2 * kc][0], sc[2 * kc][1], T()), pack2(sc[2 * kc][2], sc[2 * kc][3], T()),
                        pack2(sc[2 * kc + 1][0], sc[2 * kc + 1][1], T()),
                        pack2(sc[2 * kc + 1][2], sc[2 * kc + 1][3], T())};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {  // two 8-wide output column tiles per ldmatrix (transposed V)
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, Vt + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
        mma(o[2 * dp], pa, vf[0], vf[1], T());
        mma(o[2 * dp + 1], pa, vf[2], vf[3], T());
      }
    }
    __syncthreads();  // everyone is done with this stage before the next iteration refills it
  }

  // out = O / l, lse = (m + log2 l) ln 2 (back to natural-log units of the scaled scores).
  T* ob = out + (b * s.Hq + h) * N * D;
  float* lb = lse + (b * s.Hq + h) * N;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lr = l[r];
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    const int64_t row = r_lo + r * 8;
    if (row >= N) continue;
    const float inv = 1.f / lr;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(ob + row * D + dt * 8 + 2 * t) =
          pack2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv, T());
    if (t == 0) lb[row] = (m[r] + log2f(lr)) * 0.69314718055994531f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.
constexpr int kWarpsPerBlock = 8;  // generic kernels: 8 rows per block of 256 threads

dim3 warp_grid(int64_t rows) { return dim3(unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)); }

template <typename T, int D>
cudaError_t launch_fwd_mma(const T* q, const T* k, const T* v, T* out, float* lse, AttnShape s, float scale,
                           cudaStream_t stream) {
  constexpr int bytes = mma_smem_bytes<D>();
  // More than 48 KB of dynamic shared memory needs a per-kernel opt-in, once per device (a bit per device id).
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (!(opted_in.load(std::memory_order_relaxed) & bit)) {
    e = cudaFuncSetAttribute(fwd_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(unsigned((s.N + kBQ - 1) / kBQ), unsigned(s.Hq), unsigned(s.B));
  fwd_mma_kernel<T, D><<<grid, 32 * kWarpsMma, bytes, stream>>>(q, k, v, out, lse, s, scale * 1.4426950408889634f);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* q, const void* k, const void* v, void* out, float* lse, AttnShape s, float scale,
                      cudaStream_t stream) {
  auto Q = static_cast<const T*>(q), K = static_cast<const T*>(k), V = static_cast<const T*>(v);
  auto O = static_cast<T*>(out);
  // Tensor cores for 16-bit inputs at the common head dims (their 16-byte copies need 16-byte aligned rows).
  const bool aligned = ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                         reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(out)) % 16) == 0;
  if constexpr (!std::is_same_v<T, float>) {
    if (aligned && s.D == 64) return launch_fwd_mma<T, 64>(Q, K, V, O, lse, s, scale, stream);
    if (aligned && s.D == 128) return launch_fwd_mma<T, 128>(Q, K, V, O, lse, s, scale, stream);
  }
  fwd_generic_kernel<T><<<warp_grid(s.B * s.Hq * s.N), 32 * kWarpsPerBlock, 0, stream>>>(Q, K, V, O, lse, s, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dout, const void* q, const void* k, const void* v, const void* out,
                      const float* lse, float* delta, void* dq, void* dk, void* dv, AttnShape s, float scale,
                      cudaStream_t stream) {
  auto dO = static_cast<const T*>(dout), Q = static_cast<const T*>(q), K = static_cast<const T*>(k);
  auto V = static_cast<const T*>(v), O = static_cast<const T*>(out);
  const int threads = 32 * kWarpsPerBlock;
  bwd_delta_kernel<T><<<warp_grid(s.B * s.Hq * s.N), threads, 0, stream>>>(dO, O, delta, s.B * s.Hq * s.N, s.D);
  bwd_dq_kernel<T><<<warp_grid(s.B * s.Hq * s.N), threads, 0, stream>>>(dO, Q, K, V, lse, delta,
                                                                         static_cast<T*>(dq), s, scale);
  bwd_dkv_kernel<T><<<warp_grid(s.B * s.Hkv * s.N), threads, 0, stream>>>(
      dO, Q, K, V, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), s, scale);
  return cudaGetLastError();
}

}  // namespace

// The dtype switch shared by the three entry points.
template <typename F>
cudaError_t dispatch(CudaDType dt, F&& f) {
  switch (dt) {
    case CudaDType::F32: return f(float());
    case CudaDType::F16: return f(__half());
    case CudaDType::BF16: return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_fwd(CudaDType dt, const void* q, const void* k, const void* v, void* out, float* lse,
                       AttnShape s, float scale, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) { return fwd_typed<decltype(tag)>(q, k, v, out, lse, s, scale, stream); });
}

cudaError_t launch_bwd(CudaDType dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, float* delta, void* dq, void* dk, void* dv, AttnShape s, float scale,
                       cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    return bwd_typed<decltype(tag)>(dout, q, k, v, out, lse, delta, dq, dk, dv, s, scale, stream);
  });
}

cudaError_t launch_decode(CudaDType dt, const void* q, const void* k_cache, const void* v_cache, const int64_t* valid,
                          void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale,
                          cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    decode_kernel<T><<<unsigned(B * Hq), 128, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k_cache),
                                                          static_cast<const T*>(v_cache), valid, static_cast<T*>(out),
                                                          Hq, Hkv, S, D, scale);
    return cudaGetLastError();
  });
}

}  // namespace swarr
