// Sliding-window attention on the CPU: forward, backward and ring-buffer decode, registered as torch.ops.swarr.*.
//
// The idea (FlashAttention, restricted to the band of the window):
//   * Queries are processed in tiles of BQ rows. A query tile [i0, i0 + BQ) only needs the keys
//     [i0 - W + 1, i0 + BQ - 1], so it visits those keys in tiles of BK and never touches the rest: the work is
//     about N * (W + BQ) instead of N * N.
//   * Online softmax: a query's softmax is built up tile by tile. We keep its running max m, the running sum
//     l = sum exp(s - m) and the unnormalised output o = sum exp(s - m) v. When a new tile raises the max from m to
//     m', the old sums are rescaled by exp(m - m'). After the last tile, out = o / l and lse = m + log(l).
//   * Layout: score tiles are stored transposed, S[key][query], so the BQ queries of a tile are the vector lanes
//     and keys/values are read straight from the input rows. Every product is then one small matrix multiply
//     (small_gemm below) whose inner loop runs over contiguous columns in SIMD registers.
//   * One work item = (batch, kv head, query tile) with all query heads that share the kv head (GQA): the key and
//     value rows of a tile are loaded into cache once and used by every head of the group.
#include "swa.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace swarr {
namespace {

constexpr int64_t BQ = 32;  // queries per tile: the vector lanes of a transposed score tile
constexpr int64_t BK = 64;  // keys per tile

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work items per thread-pool task: waking the pool costs tens of microseconds when the cores are busy, so small
// problems (short prompts, one decode token, gradcheck) run on the calling thread. Items of ~2^18 multiply-adds
// or more are spread over the threads one by one.
int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, macs_per_item));
}

// ---------------------------------------------------------------------------------------------------------------
// SIMD through the GCC/Clang vector extension: Vec<T> is 64 bytes (16 floats or 8 doubles) and arithmetic on it is
// element-wise; the compiler maps it onto what the target has (one AVX-512 register, two AVX2 ones, four NEON ...).
// Writing the hot loops with it, rather than hoping the auto-vectoriser finds them, makes the fast code certain.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) {  // unaligned load
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline Vec<T> splat(T s) {  // s in every lane. (s - 0 folds to s; 0 + s would not, because of -0.)
  return s - Vec<T>{};
}
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp of every lane. Softmax arguments are always <= 0 (a score minus a max at least as large); masked scores are
// -inf and give exactly 0. exp(x) = 2^n * exp(r) with n = round(x / ln2), |r| <= ln2 / 2 and exp(r) from the Cephes
// polynomial (relative error ~1e-7). Rounding uses the 1.5 * 2^23 trick: after t = x / ln2 + 1.5 * 2^23 the low
// mantissa bits of t hold n, and 2^n is built directly as the float bit pattern (n + 127) << 23.
inline Vec<float> exp_lanes(Vec<float> x) {
  typedef int32_t VecI __attribute__((vector_size(64)));
  const auto underflow = x < -87.0f;
  x = underflow ? splat(-87.0f) : x;
  const Vec<float> t = x * 1.44269504088896341f + 12582912.0f;
  const Vec<float> n = t - 12582912.0f;
  const Vec<float> r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n * ln2 in two steps (Cody-Waite)
  Vec<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec<float> er = p * r * r + r + 1.0f;
  const VecI n_int = (VecI)t - (VecI)splat(12582912.0f);
  const Vec<float> two_n = (Vec<float>)((n_int + 127) << 23);
  return underflow ? Vec<float>{} : er * two_n;
}
inline Vec<double> exp_lanes(Vec<double> x) {  // float64 is for checking, not for speed
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// The one matrix multiply:   out[a][c] (+)= sum_b M(a, b) * X[b][c],   M(a, b) = M[a * sa + b * sb].
// A block of R rows x NV vectors of `out` is held in registers (acc) for the whole sum over b: each step loads NV
// vectors of X once and feeds them to R x NV multiply-adds with broadcast elements of M. M is only read one element at
// a time, so its strides are free and the same routine serves Q K^T, P V and the transposed backward products.
template <int R, int NV, bool Acc, typename T>
inline void gemm_block(T* out, int64_t ldo, const T* M, int64_t sa, int64_t sb, const T* X, int64_t ldx, int64_t nb) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Acc ? load(out + r * ldo + v * L) : Vec<T>{};
  for (int64_t b = 0; b < nb; ++b) {
    Vec<T> x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load(X + b * ldx + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec<T> m = splat(M[r * sa + b * sb]);
      for (int v = 0; v < NV; ++v) acc[r][v] += m * x[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * ldo + v * L, acc[r][v]);
}

// Rows per register block: 8 x 2 accumulators fit AVX-512's 32 vector registers; with 16 (AVX2, NEON) use 4.
#ifdef __AVX512F__
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif

template <int NV, bool Acc, typename T>
inline void gemm_rows(T* out, int64_t ldo, const T* M, int64_t sa, int64_t sb, const T* X, int64_t ldx, int64_t na,
                      int64_t nb) {
  int64_t a = 0;
  for (; a + kRows <= na; a += kRows) gemm_block<kRows, NV, Acc>(out + a * ldo, ldo, M + a * sa, sa, sb, X, ldx, nb);
  for (; a + 4 <= na; a += 4) gemm_block<4, NV, Acc>(out + a * ldo, ldo, M + a * sa, sa, sb, X, ldx, nb);
  for (; a < na; ++a) gemm_block<1, NV, Acc>(out + a * ldo, ldo, M + a * sa, sa, sb, X, ldx, nb);
}

// out is na x nc (row stride ldo), X is nb x nc (row stride ldx). Acc: add to out instead of overwriting it.
template <bool Acc, typename T>
void small_gemm(T* out, int64_t ldo, const T* M, int64_t sa, int64_t sb, const T* X, int64_t ldx, int64_t na,
                int64_t nb, int64_t nc) {
  constexpr int64_t L = kLanes<T>;
  int64_t c = 0;
  for (; c + 2 * L <= nc; c += 2 * L) gemm_rows<2, Acc>(out + c, ldo, M, sa, sb, X + c, ldx, na, nb);
  for (; c + L <= nc; c += L) gemm_rows<1, Acc>(out + c, ldo, M, sa, sb, X + c, ldx, na, nb);
  for (; c < nc; ++c)  // leftover columns (head dims that are not a multiple of the vector width)
    for (int64_t a = 0; a < na; ++a) {
      T sum = Acc ? out[a * ldo + c] : T(0);
      for (int64_t b = 0; b < nb; ++b) sum += M[a * sa + b * sb] * X[b * ldx + c];
      out[a * ldo + c] = sum;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tile helpers. A score tile S has nk rows (keys j0 + j) of BQ lanes (queries i0 + i).

// Does every (query, key) pair of the tile lie inside the window? Then no masking is needed (the common case).
inline bool tile_inside_band(int64_t i0, int64_t nq, int64_t j0, int64_t nk, int64_t W) {
  return j0 + nk - 1 <= i0 && (i0 + nq - 1) - j0 < W;
}

// Scores of keys outside a query's window become -inf. Key j0 + j is seen by the queries i0 + i with
// 0 <= (i0 + i) - (j0 + j) < W, i.e. the lanes [lo, hi) below; the lanes outside are masked.
template <typename T>
void mask_tile(T* S, int64_t nk, int64_t i0, int64_t j0, int64_t W) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t first = j0 + j - i0;  // lane of the query at the key's own position
    const int64_t lo = std::clamp<int64_t>(first, 0, BQ), hi = std::clamp<int64_t>(first + W, 0, BQ);
    std::fill(S + j * BQ, S + j * BQ + lo, neg_inf);
    std::fill(S + j * BQ + hi, S + (j + 1) * BQ, neg_inf);
  }
}

// dst[d][i] = s * src[i][d] for the nq rows of a tile, zero in the padding lanes i >= nq.
template <typename T>
void load_transposed(T* dst, const T* src, int64_t nq, int64_t D, T s) {
  std::fill(dst, dst + D * BQ, T(0));
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D; ++d) dst[d * BQ + i] = s * src[i * D + d];
}

// dst[i][d] = s * src[i][d], zero rows for i >= nq.
template <typename T>
void load_rows(T* dst, const T* src, int64_t nq, int64_t D, T s) {
  std::fill(dst, dst + BQ * D, T(0));
  for (int64_t i = 0; i < nq * D; ++i) dst[i] = s * src[i];
}

// One online-softmax step. S (nk x BQ scores) becomes P = exp(S - m_new); the running max m, sum l and the
// unnormalised transposed output Ot (D x BQ) are rescaled by exp(m_old - m_new).
template <typename T>
void online_softmax_step(T* S, int64_t nk, T* m, T* l, T* Ot, int64_t D) {
  constexpr int64_t L = kLanes<T>, NV = BQ / L;
  Vec<T> m_old[NV], m_new[NV], alpha[NV], sum[NV];
  for (int64_t v = 0; v < NV; ++v) m_old[v] = m_new[v] = load(m + v * L);
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t v = 0; v < NV; ++v) m_new[v] = vmax(m_new[v], load(S + j * BQ + v * L));
  for (int64_t v = 0; v < NV; ++v) {
    alpha[v] = exp_lanes(m_old[v] - m_new[v]);
    sum[v] = Vec<T>{};
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t v = 0; v < NV; ++v) {
      const Vec<T> p = exp_lanes(load(S + j * BQ + v * L) - m_new[v]);
      store(S + j * BQ + v * L, p);
      sum[v] += p;
    }
  for (int64_t v = 0; v < NV; ++v) {
    store(l + v * L, load(l + v * L) * alpha[v] + sum[v]);
    store(m + v * L, m_new[v]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t v = 0; v < NV; ++v) store(Ot + d * BQ + v * L, load(Ot + d * BQ + v * L) * alpha[v]);
}

// Backward: P = exp(S - lse) and dS = P * (dP - delta), lane by lane. On entry P holds S and dS holds dP.
template <typename T>
void probs_and_dscores(T* P, T* dS, int64_t nk, const T* lse, const T* delta) {
  constexpr int64_t L = kLanes<T>, NV = BQ / L;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t v = 0; v < NV; ++v) {
      T* p_ptr = P + j * BQ + v * L;
      T* ds_ptr = dS + j * BQ + v * L;
      const Vec<T> p = exp_lanes(load(p_ptr) - load(lse + v * L));
      store(p_ptr, p);
      store(ds_ptr, p * (load(ds_ptr) - load(delta + v * L)));
    }
}

// Shapes shared by the kernels.
struct Dims {
  int64_t B, Hq, Hkv, N, D, W;
  int64_t rep() const { return Hq / Hkv; }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward: out = softmax(scale * q k^T, windowed) v, lse = log-sum-exp of each query's scaled scores.
template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, Dims s, T scale) {
  const int64_t D = s.D, N = s.N, rep = s.rep(), n_qt = ceil_div(N, BQ);
  const int64_t grain = grain_for(rep * BQ * std::min(N, s.W + BQ) * D);
  at::parallel_for(0, s.B * s.Hkv * n_qt, grain, [&](int64_t begin, int64_t end) {
    // Per-thread tile state for the `rep` query heads of one kv head.
    std::vector<T> Qt(rep * D * BQ), Ot(rep * D * BQ), m(rep * BQ), l(rep * BQ), S(BK * BQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bkv = item / n_qt, i0 = (item % n_qt) * BQ, nq = std::min(BQ, N - i0);
      const int64_t head0 = (bkv / s.Hkv) * s.Hq + (bkv % s.Hkv) * rep;  // first query head (b, h) of the group
      const T* kb = k + bkv * N * D;
      const T* vb = v + bkv * N * D;
      for (int64_t g = 0; g < rep; ++g) {
        load_transposed(&Qt[g * D * BQ], q + ((head0 + g) * N + i0) * D, nq, D, scale);  // fold the scale into q
        std::fill(&Ot[g * D * BQ], &Ot[(g + 1) * D * BQ], T(0));
        std::fill(&m[g * BQ], &m[(g + 1) * BQ], std::numeric_limits<T>::lowest());  // finite: no inf - inf
        std::fill(&l[g * BQ], &l[(g + 1) * BQ], T(0));
      }
      // The keys this query tile can see: [i0 - W + 1, i0 + nq - 1], in tiles of BK starting at the first one.
      const int64_t j_begin = std::max<int64_t>(0, i0 - s.W + 1), j_end = i0 + nq;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
        const int64_t nk = std::min(BK, j_end - j0);
        const bool edge = !tile_inside_band(i0, nq, j0, nk, s.W);
        for (int64_t g = 0; g < rep; ++g) {
          T* Ot_g = &Ot[g * D * BQ];
          small_gemm<false>(S.data(), BQ, kb + j0 * D, D, 1, &Qt[g * D * BQ], BQ, nk, D, BQ);  // S[j][i] = k_j.q_i
          if (edge) mask_tile(S.data(), nk, i0, j0, s.W);
          online_softmax_step(S.data(), nk, &m[g * BQ], &l[g * BQ], Ot_g, D);            // S is now P
          small_gemm<true>(Ot_g, BQ, vb + j0 * D, 1, D, S.data(), BQ, D, nk, BQ);          // Ot[d][i] += v_j[d] P[j][i]
        }
      }
      for (int64_t g = 0; g < rep; ++g) {
        T* o = out + ((head0 + g) * N + i0) * D;
        T* lse_g = lse + (head0 + g) * N + i0;
        for (int64_t i = 0; i < nq; ++i) {
          const T inv_l = T(1) / l[g * BQ + i];
          for (int64_t d = 0; d < D; ++d) o[i * D + d] = Ot[(g * D + d) * BQ + i] * inv_l;
          lse_g[i] = m[g * BQ + i] + std::log(l[g * BQ + i]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 recurrences, recomputing P from the saved lse):
//   P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta) with delta_i = dO_i . O_i,
//   dV += P^T dO, dK += dS^T (scale Q), dQ += scale dS K.
// A work item owns a run of query tiles and computes their dQ completely. dK and dV rows are shared between
// neighbouring query tiles, so work items are scheduled in two colours: a run of L query tiles with
// L * BQ >= W - 1 touches keys that end before the run after next begins, so all even runs can update dK/dV at
// the same time without races, then all odd runs. Deterministic, no atomics, no per-thread copies of dK/dV.
template <typename T>
void backward_kernel(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse, T* dq, T* dk,
                     T* dv, Dims s, T scale) {
  const int64_t D = s.D, N = s.N, rep = s.rep(), n_qt = ceil_div(N, BQ);
  const int64_t run = std::max<int64_t>(1, ceil_div(s.W - 1, BQ));  // query tiles per work item
  const int64_t n_runs = ceil_div(n_qt, run);
  for (int64_t colour = 0; colour < 2; ++colour) {
    const int64_t runs_this_colour = (n_runs - colour + 1) / 2;  // runs colour, colour + 2, colour + 4, ...
    const int64_t grain = grain_for(run * rep * BQ * std::min(N, s.W + BQ) * D);
    at::parallel_for(0, s.B * s.Hkv * runs_this_colour, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> Qt(rep * D * BQ), Qs(rep * BQ * D), dOt(rep * D * BQ), dO(rep * BQ * D), dQt(rep * D * BQ);
      std::vector<T> lse_t(rep * BQ), delta(rep * BQ), P(BK * BQ), dS(BK * BQ);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bkv = item / runs_this_colour, r = colour + 2 * (item % runs_this_colour);
        const int64_t head0 = (bkv / s.Hkv) * s.Hq + (bkv % s.Hkv) * rep;
        const T* kb = k + bkv * N * D;
        const T* vb = v + bkv * N * D;
        T* dkb = dk + bkv * N * D;
        T* dvb = dv + bkv * N * D;
        for (int64_t qt = r * run; qt < std::min(n_qt, (r + 1) * run); ++qt) {
          const int64_t i0 = qt * BQ, nq = std::min(BQ, N - i0);
          for (int64_t g = 0; g < rep; ++g) {  // load this query tile for every head of the group
            const int64_t row0 = (head0 + g) * N + i0;
            load_transposed(&Qt[g * D * BQ], q + row0 * D, nq, D, scale);
            load_rows(&Qs[g * BQ * D], q + row0 * D, nq, D, scale);
            load_transposed(&dOt[g * D * BQ], dout + row0 * D, nq, D, T(1));
            load_rows(&dO[g * BQ * D], dout + row0 * D, nq, D, T(1));
            std::fill(&dQt[g * D * BQ], &dQt[(g + 1) * D * BQ], T(0));
            for (int64_t i = 0; i < BQ; ++i) {
              // Padding lanes get lse = +inf, hence P = 0 there, and contribute nothing.
              lse_t[g * BQ + i] = i < nq ? lse[row0 + i] : std::numeric_limits<T>::infinity();
              T dot = 0;
              for (int64_t d = 0; d < D && i < nq; ++d) dot += dout[(row0 + i) * D + d] * out[(row0 + i) * D + d];
              delta[g * BQ + i] = dot;
            }
          }
          const int64_t j_begin = std::max<int64_t>(0, i0 - s.W + 1), j_end = i0 + nq;
          for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
            const int64_t nk = std::min(BK, j_end - j0);
            const bool edge = !tile_inside_band(i0, nq, j0, nk, s.W);
            for (int64_t g = 0; g < rep; ++g) {
              const T* lse_g = &lse_t[g * BQ];
              const T* delta_g = &delta[g * BQ];
              small_gemm<false>(P.data(), BQ, kb + j0 * D, D, 1, &Qt[g * D * BQ], BQ, nk, D, BQ);   // S = K Q^T
              if (edge) mask_tile(P.data(), nk, i0, j0, s.W);
              small_gemm<false>(dS.data(), BQ, vb + j0 * D, D, 1, &dOt[g * D * BQ], BQ, nk, D, BQ);  // dP = V dO^T
              probs_and_dscores(P.data(), dS.data(), nk, lse_g, delta_g);
              small_gemm<true>(dvb + j0 * D, D, P.data(), BQ, 1, &dO[g * BQ * D], D, nk, nq, D);   // dV += P dO
              small_gemm<true>(dkb + j0 * D, D, dS.data(), BQ, 1, &Qs[g * BQ * D], D, nk, nq, D);  // dK += dS Qs
              small_gemm<true>(&dQt[g * D * BQ], BQ, kb + j0 * D, 1, D, dS.data(), BQ, D, nk, BQ); // dQt += K^T dS
            }
          }
          for (int64_t g = 0; g < rep; ++g) {
            T* dq_g = dq + ((head0 + g) * N + i0) * D;
            for (int64_t i = 0; i < nq; ++i)
              for (int64_t d = 0; d < D; ++d) dq_g[i * D + d] = scale * dQt[(g * D + d) * BQ + i];
          }
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Decode: one new query per row against a cache, attending slots [0, valid[b]). With a ring buffer of W slots
// valid <= W, so the cost per token is bounded by the window, never by the position in the sequence.
// Sum of the lanes: add the two halves of the vector until two lanes are left (log2(lanes) shuffle + add steps).
template <typename T, int Bytes>
struct HalfVec {
  typedef T type __attribute__((vector_size(Bytes / 2)));
};
template <typename T, int Bytes = 64, typename V>
inline T hsum(const V& v) {
  if constexpr (Bytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    typename HalfVec<T, Bytes>::type lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return hsum<T, Bytes / 2>(lo + hi);
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> acc0{}, acc1{};  // two independent chains of multiply-adds
  int64_t d = 0;
  for (; d + 2 * L <= n; d += 2 * L) {
    acc0 += load(a + d) * load(b + d);
    acc1 += load(a + d + L) * load(b + d + L);
  }
  for (; d + L <= n; d += L) acc0 += load(a + d) * load(b + d);
  T sum = hsum<T>(acc0 + acc1);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// p[j] = exp(p[j] - shift) for j < n; returns their sum.
template <typename T>
T exp_and_sum(T* p, int64_t n, T shift) {
  Vec<T> acc{};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>) {
    const Vec<T> e = exp_lanes(load(p + j) - shift);
    store(p + j, e);
    acc += e;
  }
  T sum = hsum<T>(acc);
  for (; j < n; ++j) sum += (p[j] = std::exp(p[j] - shift));
  return sum;
}

template <typename T>
void decode_kernel(const T* q, const T* kc, const T* vc, const int64_t* valid, T* out, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t S, int64_t D, T scale) {
  const int64_t rep = Hq / Hkv;
  const int64_t max_valid = B > 0 ? *std::max_element(valid, valid + B) : 0;
  at::parallel_for(0, B * Hkv, grain_for(max_valid * D * 2 * rep), [&](int64_t begin, int64_t end) {
    std::vector<T> P;
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t n = valid[bkv / Hkv];
      const T* qg = q + ((bkv / Hkv) * Hq + (bkv % Hkv) * rep) * D;  // the rep query heads of this kv head
      const T* kb = kc + bkv * S * D;
      const T* vb = vc + bkv * S * D;
      T* o = out + ((bkv / Hkv) * Hq + (bkv % Hkv) * rep) * D;
      P.resize(rep * n);
      for (int64_t j = 0; j < n; ++j)  // each key row is read once for all heads of the group
        for (int64_t g = 0; g < rep; ++g) P[g * n + j] = scale * dot(qg + g * D, kb + j * D, D);
      std::vector<T> inv_l(rep);
      for (int64_t g = 0; g < rep; ++g) {  // plain (not online) softmax: all scores are at hand
        T* p = &P[g * n];
        inv_l[g] = T(1) / exp_and_sum(p, n, *std::max_element(p, p + n));
      }
      small_gemm<false>(o, D, P.data(), n, 1, vb, D, rep, n, D);  // o[g][:] = sum_j P[g][j] v_j
      for (int64_t g = 0; g < rep; ++g)
        for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv_l[g];
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Operator entry points (CPU). float32 is the fast path; float64 exists for gradcheck and exact comparisons.

void check_cpu_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "swarr: the CPU kernels take float32 or float64, got ", t.scalar_type(),
              " (swarr.attention casts other dtypes)");
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k, int64_t window) {
  const int64_t W = effective_window(window, q.size(2));
  return Dims{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), W};
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           int64_t window, double scale) {
  check_qkv(q, k, v, window);
  check_cpu_dtype(q);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "swarr_fwd_cpu", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), dims_of(q, k, window),
                             static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse, int64_t window,
                                                       double scale) {
  check_qkv(q, k, v, window);
  check_cpu_dtype(q);
  check_same(q, dout, "q and dout");
  check_same(q, out, "q and out");
  check_same(q, lse, "q and lse");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "swarr: dout and out must have q's shape");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "swarr: lse must be (B, Hq, N), got ", lse.sizes());
  check_contiguous(dout, "dout");
  check_contiguous(out, "out");
  check_contiguous(lse, "lse");
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = at::zeros_like(k);  // accumulated over query tiles
  at::Tensor dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "swarr_bwd_cpu", [&] {
    backward_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                              dims_of(q, k, window), static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

at::Tensor decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& valid, double scale) {
  check_decode(q, k_cache, v_cache, valid);
  check_cpu_dtype(q);
  const int64_t S = k_cache.size(2);
  const int64_t* vp = valid.data_ptr<int64_t>();
  for (int64_t b = 0; b < valid.size(0); ++b)
    TORCH_CHECK(vp[b] >= 1 && vp[b] <= S, "swarr: valid[", b, "] = ", vp[b], " is outside [1, ", S, "]");
  at::Tensor out = new_output(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "swarr_decode_cpu", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), vp,
                            out.data_ptr<scalar_t>(), q.size(0), q.size(1), k_cache.size(1), S, q.size(2),
                            static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(swarr, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, int window, float scale) -> (Tensor out, Tensor lse)");
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, float scale)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(swarr, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("decode", &decode_cpu);
}

}  // namespace swarr
