// The direct path's fused CPU kernel: LiSA attention as FlashAttention-like tiles, forward and backward.
//
// For q, k (B, H, N, Dk), v (B, H, N, Dv), groups m of G = Dv / M value channels, and token pairs (i, j):
//
//     A_ij   = phi(scale q_i) . phi(k_j)                      (the feature tile product, a GEMM)
//     W^m_ij = A_ij * X^m[qb_i + ko_j]                        (the weight, gathered from a small table)
//     num_i  = sum_j W^m_ij v_j[group m],  den_i^m = sum_j W^m_ij       (a GEMM and a row sum)
//     out_i  = num_i / (den_i^m + eps')   (normalize)   or   num_i * e^{mx_m}   (not normalize)
//
// The pair index is separable: every token has a query base qb_i and a key offset ko_j (PairIndex below), and
// qb_i + ko_j is the entry of the pair in the *extended* table of (head, group): the linear rpe table (offsets
// -(S-1)..S-1 per axis; circular tables unrolled into it, causal offsets masked with -inf), then three regions
// for the pairs with an extra token (rpe_extra's kinds 0, 1, 2; causal-masked where the key comes later). The
// table is stored reversed, so that keys consecutive along the grid's last axis read consecutive entries: a
// block of keys is a few *runs*, each one contiguous (vectorizable) load per query row. The table holds
// X = exp(log-table - mx), mx its largest entry per (head, group): every weight is <= 1 and eps' = eps e^-mx,
// so that num / (den + eps) is unchanged exactly and nothing overflows.
//
// Forward: one task per ((batch, head), block of 256 queries), taken from a shared counter by the threads of one
// at::parallel_for (dynamic, so that unequal tasks balance; the query block varies slowest, so that concurrent
// tasks work on different (batch, head)s). The first task of a (batch, head) computes phi(k) of its keys, each
// task phi(scale q) of its queries (phi(x) = elu(x) + 1, i.e. x + 1 or e^x; or relu). For each block of 512 keys
// (1D causal: only those up to the last query): the A tile (BLAS); then, 32 rows at a time while they are in
// cache, the rows of the weights gathered from the table and W = A * R with its row sums; and acc += W V_block
// (BLAS). Then out = acc * s per query and group.
//
// Backward (g = d out; with normalize s = 1 / (den' + eps'), gnum = s g, gden = -s sum_c g out, per group):
//
//     dW^m  = gnum^m V^m^T + gden^m           dV^m += W^m^T gnum^m
//     dA    = sum_m dW^m * X^m                dlogtab[qb_i + ko_j] += dW^m_ij W^m_ij
//     dfq  += dA fk,   dfk += dA^T fq,        dq = dfq * phi'(scale q) * scale,   dk = dfk * phi'(k)
//
// one task per (head, group of batches, chunk of key blocks) (a group is one batch and a chunk all keys, unless
// there are few (batch, head)s or the table gradients would take too much memory): the task owns its keys' dk,
// dv and visits every query block (FlashAttention-2's order); its first visit of a (batch, head) computes
// phi(q), phi(k), gnum and gden there. dfq is summed straight into place when one chunk spans all keys, else into
// one buffer per chunk, added up afterwards in chunk order. The table gradient is summed per task into its own
// buffer and those are added up per head in a fixed order: the tasks depend on the sizes alone, so the result
// does not depend on the number of threads or on which thread ran which task (bitwise deterministic). The table
// gradient then folds back onto rpe (circular tables: every unrolled entry onto its source) and rpe_extra (the
// sum over each region).
//
// Matrix products: the BLAS sgemm_/dgemm_ that torch's CPU library exports (MKL on x86 wheels, as torch's own
// CPU flash attention uses through at::native::cpublas), called single-threaded inside the parallel loop;
// where a torch build exports none, ATen's addmm on views of the same memory.
// float16/bfloat16 inputs compute in float32; float64 in float64.
#include "direct_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <thread>
#include <type_traits>
#include <vector>

// The Fortran BLAS products of torch's CPU library (weak: a torch build without them still loads this module).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's thread count for the calling thread (0: back to the global one), its C interface (mkl_set_num_threads_local
// is the Fortran one, which takes a pointer); absent where torch's BLAS is not MKL
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

// The elementwise loops below are compiled for three x86 levels (AVX-512, AVX2 + FMA, the baseline) and the
// best one for the running CPU is chosen at load time (GCC function multiversioning); elsewhere, once.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__ELF__)
#define LISA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LISA_SIMD_CLONES
#endif

namespace lisa {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- matrix products

bool g_force_aten_gemm = false;   // tests: run the ATen fallback even where BLAS is exported

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr && !g_force_aten_gemm; }

// Row-major C (m x n, row stride ldc) = alpha op(A) op(B) + beta C, op(A) (m x k) = A or, with ta, A^T of an
// A stored (k x m); likewise op(B) (k x n). BLAS is column-major: C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (have_blas()) {
    const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ila = static_cast<int>(lda), ilb = static_cast<int>(ldb), ilc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&opb, &opa, &in, &im, &ik, &alpha, B, &ilb, A, &ila, &beta, C, &ilc);
    } else {
      dgemm_(&opb, &opa, &in, &im, &ik, &alpha, B, &ilb, A, &ila, &beta, C, &ilc);
    }
    return;
  }
  // no BLAS symbol: ATen's addmm on views of the same memory (a few microseconds more per call)
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t r, int64_t c, int64_t ld, bool t) {
    return t ? at::from_blob(const_cast<T*>(p), {r, c}, {1, ld}, opt) : at::from_blob(const_cast<T*>(p), {r, c}, {ld, 1}, opt);
  };
  Tensor Cm = view(C, m, n, ldc, false);
  at::addmm_out(Cm, Cm, view(A, m, k, lda, ta), view(B, k, n, ldb, tb), beta, alpha);
}

// ---------------------------------------------------------------- feature maps

// e^x for x <= 0 in float, branch-free so that loops over it vectorize (relative error within 2 ulp):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2_hi), e^r by its Taylor series.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;                             // e^-87 is still a normal float
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;    // round(x / ln2)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// phi(x): elu(x) + 1 (x + 1 for x > 0, e^x otherwise) or relu(x).
template <typename T>
inline T phi(T x, bool elu1) {
  if (elu1) {
    const T e = exp_nonpositive(x < T(0) ? x : T(0));
    return x > T(0) ? x + T(1) : e;
  }
  return x > T(0) ? x : T(0);
}

// phi'(x) from f = phi(x): elu1 -> min(f, 1) (1 for x > 0, e^x = f otherwise); relu -> [f > 0].
template <typename T>
inline T dphi(T f, bool elu1) {
  if (elu1) return f < T(1) ? f : T(1);
  return f > T(0) ? T(1) : T(0);
}

// ---------------------------------------------------------------- the pair index

// Per token a query base qb and a key offset ko such that the pair (i, j) reads entry qb_i + ko_j of the
// reversed extended table (size TX). In forward orientation (entry f = TX - 1 - u of the reversed entry u):
//   grid token with coordinates y:  a = sum_a y_a st_a (st: strides of the (2S-1)^d table), C = a of the last
//     grid query: qidx = a,          grid key: kidx = C - a      -> f = C + a_i - a_j, the linear table [0, T)
//     extra key e:  kidx = K0 + E - 1 - e, K0 = max(T, C + E)   -> grid query: region R1 = [K0, K0 + C + E)
//     extra query x: qidx = Q0 + x, Q0 = K0 + C + E              -> grid key: R0 = [Q0, Q0 + C + E),
//                                                                   extra key: R2 = [Q0 + K0, Q0 + K0 + 2E - 1)
//   with f = Q0 + K0 + E - 1 + (x - e) in R2 (x < e: a later key, masked when causal); TX = Q0 + K0 + 2E - 1.
// qb = TX - 1 - qidx and ko = -kidx. Keys consecutive along the last grid axis (and the extra keys) have
// consecutive ko: run_end[j] is the end of the run of consecutive offsets that holds key j.
struct PairIndex {
  int64_t d = 0, E = 0, ng = 1, N = 0, T = 1, C = 0, K0 = 0, Q0 = 0, TX = 0;
  std::vector<int64_t> S;
  std::vector<int32_t> qb, ko, run_end;
  std::vector<int64_t> src;        // where each entry of the extended table comes from: table_sources below
};

PairIndex make_index(at::IntArrayRef grid, int64_t E) {
  PairIndex ix;
  ix.d = static_cast<int64_t>(grid.size());
  ix.E = E;
  std::vector<int64_t> st(ix.d, 1);
  for (int64_t a = ix.d - 1; a >= 0; --a) {
    ix.S.push_back(grid[a]);
    if (a + 1 < ix.d) st[a] = st[a + 1] * (2 * grid[a + 1] - 1);
  }
  std::reverse(ix.S.begin(), ix.S.end());
  for (int64_t a = 0; a < ix.d; ++a) {
    ix.ng *= ix.S[a];
    ix.T *= 2 * ix.S[a] - 1;
    ix.C += (ix.S[a] - 1) * st[a];
  }
  ix.N = E + ix.ng;
  if (E > 0) {
    ix.K0 = std::max(ix.T, ix.C + E);
    ix.Q0 = ix.K0 + ix.C + E;
    ix.TX = ix.Q0 + ix.K0 + 2 * E - 1;
  } else {
    ix.TX = ix.T;
  }
  TORCH_CHECK(ix.TX < (int64_t(1) << 31), "lisa_kernels.direct_cpu: the grid ", grid, " is too large");
  ix.qb.resize(ix.N);
  ix.ko.resize(ix.N);
  ix.run_end.resize(ix.N);
  for (int64_t x = 0; x < E; ++x) {
    ix.qb[x] = static_cast<int32_t>(ix.TX - 1 - (ix.Q0 + x));
    ix.ko[x] = static_cast<int32_t>(-(ix.K0 + E - 1 - x));
  }
  std::vector<int64_t> y(ix.d, 0);
  for (int64_t g = 0; g < ix.ng; ++g) {
    int64_t a = 0;
    for (int64_t ax = 0; ax < ix.d; ++ax) a += y[ax] * st[ax];
    ix.qb[E + g] = static_cast<int32_t>(ix.TX - 1 - a);
    ix.ko[E + g] = static_cast<int32_t>(a - ix.C);
    for (int64_t ax = ix.d - 1; ax >= 0; --ax) {     // next row-major position
      if (++y[ax] < ix.S[ax]) break;
      y[ax] = 0;
    }
  }
  ix.run_end[ix.N - 1] = static_cast<int32_t>(ix.N);
  for (int64_t j = ix.N - 2; j >= 0; --j)
    ix.run_end[j] = ix.ko[j + 1] == ix.ko[j] + 1 ? ix.run_end[j + 1] : static_cast<int32_t>(j + 1);
  return ix;
}

// A piece of a key block whose keys read consecutive table entries: keys [j, j + len) of the block (local
// index), table offset ko of its first key.
struct Run {
  int64_t j, len, ko;
};

int block_runs(const PairIndex& ix, int64_t k0, int64_t k1, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t j = k0; j < k1;) {
    const int64_t e = std::min<int64_t>(ix.run_end[j], k1);
    runs.push_back({j - k0, e - j, ix.ko[j]});
    j = e;
  }
  return static_cast<int>(runs.size());
}

// ---------------------------------------------------------------- the extended table

// Where each forward-orientation entry f of the extended table takes its log-weight from: an index into the
// flattened rpe (>= 0), or one of the codes below.
constexpr int64_t kMasked = -1;      // -inf: a causal-masked pair, or an entry no pair reads
constexpr int64_t kKind0 = -2;       // rpe_extra[..., 0]: extra query, grid key
constexpr int64_t kKind1 = -3;       // rpe_extra[..., 1]: grid query, extra key
constexpr int64_t kKind2 = -4;       // rpe_extra[..., 2]: extra query, extra key

std::vector<int64_t> table_sources(const PairIndex& ix, bool circular, bool causal) {
  std::vector<int64_t> src(ix.TX, kMasked);
  // linear entry f = sum_a u_a st_a, u_a = delta_a + S_a - 1
  std::vector<int64_t> u(ix.d, 0);
  for (int64_t f = 0; f < ix.T; ++f) {
    int64_t s = 0;
    bool masked = false;
    for (int64_t a = 0; a < ix.d; ++a) {
      const int64_t delta = u[a] - (ix.S[a] - 1);
      if (circular) {
        s = s * ix.S[a] + ((delta % ix.S[a]) + ix.S[a]) % ix.S[a];
      } else {
        s = s * (2 * ix.S[a] - 1) + u[a];
      }
      if (causal && delta < 0) masked = true;       // 1D only: key after the query
    }
    src[f] = masked ? kMasked : s;
    for (int64_t a = ix.d - 1; a >= 0; --a) {
      if (++u[a] < 2 * ix.S[a] - 1) break;
      u[a] = 0;
    }
  }
  if (ix.E > 0) {
    for (int64_t f = ix.K0; f < ix.K0 + ix.C + ix.E; ++f) src[f] = kKind1;
    for (int64_t f = ix.Q0; f < ix.Q0 + ix.C + ix.E; ++f) src[f] = causal ? kMasked : kKind0;
    const int64_t diag = ix.Q0 + ix.K0 + ix.E - 1;
    for (int64_t f = diag - (ix.E - 1); f <= diag + (ix.E - 1); ++f)
      src[f] = causal && f < diag ? kMasked : kKind2;
  }
  return src;
}

// Vector lanes of the run loops below: a run is copied / added in chunks of kLanes entries, the last chunk
// running past the run's end (into the next run's place, which that run overwrites, or into padding).
constexpr int64_t kLanes = 16;

// ---------------------------------------------------------------- elementwise loops

// o[0, n) = phi(o[0, n)) in place; branch-free, so that it vectorizes (with -fno-trapping-math: setup.py).
template <typename T>
LISA_SIMD_CLONES void phi_inplace(T* __restrict o, int64_t n, bool elu1) {
  if (elu1) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const T x = o[d];
      const T e = exp_nonpositive(x < T(0) ? x : T(0));
      o[d] = x > T(0) ? x + T(1) : e;
    }
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) o[d] = o[d] > T(0) ? o[d] : T(0);
  }
}

// o[0, n) = exp(o[0, n)) in place for entries <= 0 (-inf gives 0).
template <typename T>
LISA_SIMD_CLONES void exp_inplace(T* __restrict o, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    const T x = o[d];
    const T e = exp_nonpositive(x);
    o[d] = x > -std::numeric_limits<T>::infinity() ? e : T(0);
  }
}

// R[i, j] = X[qb_i + ko_j] over a tile (rows i, the block's keys j): each run copied in kLanes-wide chunks, the
// last one running past the run's end (the next run overwrites it; tiles have kLanes - 1 columns of padding,
// tables kLanes entries).
template <typename T>
LISA_SIMD_CLONES void gather_weights(T* R, int64_t rows, int64_t ld, const int32_t* qb, const T* X, const Run* runs,
                                     int nr) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = X + qb[i];
    T* r = R + i * ld;
    for (int k = 0; k < nr; ++k) {
      const T* __restrict src = x + runs[k].ko;
      T* __restrict dst = r + runs[k].j;
      for (int64_t t0 = 0; t0 < runs[k].len; t0 += kLanes) {
#pragma omp simd
        for (int64_t t = 0; t < kLanes; ++t) dst[t0 + t] = src[t0 + t];
      }
    }
  }
}

// G[qb_i + ko_j] += P[i, j] over a tile, run by run in kLanes-wide chunks whose lanes past the run add 0.
template <typename T>
LISA_SIMD_CLONES void scatter_weights(const T* P, int64_t rows, int64_t ld, const int32_t* qb, T* G, const Run* runs,
                                      int nr) {
  for (int64_t i = 0; i < rows; ++i) {
    T* g = G + qb[i];
    const T* p = P + i * ld;
    for (int k = 0; k < nr; ++k) {
      T* __restrict dst = g + runs[k].ko;
      const T* __restrict src = p + runs[k].j;
      const int32_t len = static_cast<int32_t>(runs[k].len);
      for (int32_t t0 = 0; t0 < len; t0 += kLanes) {
        const int32_t n = len - t0;
#pragma omp simd
        for (int32_t t = 0; t < kLanes; ++t) dst[t0 + t] += t < n ? src[t0 + t] : T(0);
      }
    }
  }
}

// W = A * R over a tile's rows (cols keys; W may be A); with den, the row sums are added to den[i * ds].
template <typename T>
LISA_SIMD_CLONES void weigh_rows(const T* A, const T* R, T* W, int64_t rows, int64_t cols, int64_t ld, T* den,
                                 int64_t ds) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = A + i * ld;
    const T* __restrict r = R + i * ld;
    T* w = W + i * ld;
    if (den == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) w[j] = a[j] * r[j];
      continue;
    }
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = a[j] * r[j];
      w[j] = v;
      s += v;
    }
    den[i * ds] += s;
  }
}

// The weight gradients of a tile, one group: with dd = dW + gd_i (the weight's gradient; gd per row, gs apart),
//   dA = dd * R (or dA += dd * R when accumulate),   dW <- dd * W   (the log-table's gradient terms)
template <typename T>
LISA_SIMD_CLONES void weight_grad_rows(T* dW, const T* W, const T* R, T* dA, bool accumulate, int64_t rows,
                                       int64_t cols, int64_t ld, const T* gd, int64_t gs) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict dw = dW + i * ld;
    const T* __restrict w = W + i * ld;
    const T* __restrict r = R + i * ld;
    T* __restrict da = dA + i * ld;
    const T g = gd[i * gs];
    if (accumulate) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T dd = dw[j] + g;
        da[j] += dd * r[j];
        dw[j] = dd * w[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T dd = dw[j] + g;
        da[j] = dd * r[j];
        dw[j] = dd * w[j];
      }
    }
  }
}

// o[c] = a[c] * s, converted to I.
template <typename I, typename T>
LISA_SIMD_CLONES void scale_to(I* __restrict o, const T* __restrict a, T s, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) o[c] = static_cast<I>(a[c] * s);
}

// o[d] = s[d] * phi'(f[d]) * scale, converted to I (phi' from f = phi(x): see dphi).
template <typename I, typename T>
LISA_SIMD_CLONES void chain_feature(I* __restrict o, const T* __restrict s, const T* __restrict f, int64_t n, bool elu1,
                                    T scale) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) o[d] = static_cast<I>(s[d] * dphi<T>(f[d], elu1) * scale);
}

// ---------------------------------------------------------------- per call: the cached pair index, the weight tables

// The pair index of a (grid, num_extra, boundary, causal), with its table sources: built once and kept (a model
// calls with the same few grids; the most recent 16 are kept).
std::shared_ptr<const PairIndex> pair_index(at::IntArrayRef grid, int64_t E, bool circular, bool causal) {
  using Key = std::tuple<std::vector<int64_t>, int64_t, bool, bool>;
  static std::mutex mutex;
  static std::vector<std::pair<Key, std::shared_ptr<const PairIndex>>> cache;     // most recent last
  Key key{grid.vec(), E, circular, causal};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < cache.size(); ++i)
      if (cache[i].first == key) {
        auto hit = cache[i];
        cache.erase(cache.begin() + static_cast<std::ptrdiff_t>(i));
        cache.push_back(hit);
        return hit.second;
      }
  }
  auto ix = std::make_shared<PairIndex>(make_index(grid, E));
  ix->src = table_sources(*ix, circular, causal);
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace_back(std::move(key), ix);
  if (cache.size() > 16) cache.erase(cache.begin());
  return ix;
}

// The reversed weight tables X (H * M, TXP) = exp(log-table - mx), each padded with kLanes zeros (TXP = TX +
// kLanes), and their shifts mx (H * M), in T. Small: built on the calling thread.
template <typename T>
struct WeightTables {
  std::vector<T> X;
  std::vector<double> mx;
  int64_t TXP = 0;
};

template <typename T>
WeightTables<T> weight_tables(const Tensor& rpe_c, const Tensor& extra_c, const PairIndex& ix, int64_t HM) {
  const std::vector<int64_t>& src = ix.src;
  WeightTables<T> wt;
  wt.TXP = ix.TX + kLanes;
  wt.X.assign(static_cast<size_t>(HM * wt.TXP), T(0));
  wt.mx.assign(HM, 0.0);
  const int64_t Tr = rpe_c.numel() / HM;
  const T* r = rpe_c.data_ptr<T>();
  const T* x = extra_c.defined() ? extra_c.data_ptr<T>() : nullptr;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t hm = 0; hm < HM; ++hm) {
    T* X = wt.X.data() + hm * wt.TXP;
    T mx = ninf;
    for (int64_t f = 0; f < ix.TX; ++f) {              // the log-table, reversed
      const int64_t s = src[f];
      T l;
      if (s >= 0) l = r[hm * Tr + s];
      else if (s == kMasked) l = ninf;
      else l = x != nullptr ? x[hm * 3 + (kKind0 - s)] : T(0);
      X[ix.TX - 1 - f] = l;
      mx = l > mx ? l : mx;
    }
    if (!std::isfinite(static_cast<double>(mx))) mx = T(0);
    wt.mx[hm] = static_cast<double>(mx);
    for (int64_t u = 0; u < ix.TX; ++u) X[u] -= mx;    // <= 0 (or -inf)
    exp_inplace<T>(X, ix.TX);
  }
  return wt;
}

// ---------------------------------------------------------------- the problem and its tasks

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `size` tokens over [0, n); a remainder of at most size / 4 joins the last block (a block of a few
// tokens would cost whole BLAS calls for little work), so a block holds at most size + size / 4 tokens.
struct Blocks {
  int64_t n = 0, size = 1, count = 0;
  Blocks() = default;
  Blocks(int64_t n_, int64_t size_) : n(n_), size(std::max<int64_t>(1, std::min(n_, size_))) {
    const int64_t r = n % size;
    count = r != 0 && r <= size / 4 ? n / size : ceil_div(n, size);
  }
  int64_t begin(int64_t i) const { return i * size; }
  int64_t end(int64_t i) const { return i + 1 == count ? n : (i + 1) * size; }
  int64_t max_size() const { return std::max(size, end(count - 1) - begin(count - 1)); }
  int64_t of(int64_t token) const { return std::min(token / size, count - 1); }   // the block holding a token
};

struct Sizes {
  int64_t B, H, N, Dk, Dv, M, G;
  Blocks qb, kb;         // query and key blocks
  int64_t BQ, BK, LT;    // the largest query and key blocks; LT: the row stride of the (BQ, BK) tiles
};

constexpr int64_t kDefaultBlockQ = 256;
constexpr int64_t kDefaultBlockK = 512;
constexpr int64_t kRowChunk = 32;             // weight tiles are gathered this many rows at a time (in L1 / L2)
constexpr int64_t kMinBackwardTasks = 16;               // key chunks split (batch, head) pairs below this many
constexpr int64_t kTableGradBudget = int64_t(64) << 20;  // bytes of the per-task table gradients, at most

// Threads for ntasks tasks of `madds` multiply-adds in all: one below kParallelMinWork (about 20 microseconds of
// work, the cost of starting and joining the threads of a parallel region).
constexpr double kParallelMinWork = 2e6;

int64_t num_workers(int64_t ntasks, double madds) {
  if (madds < kParallelMinWork) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
}

// Runs fn(task, worker) for task in [0, ntasks) in one at::parallel_for region, tasks taken from a shared counter
// (dynamic: tasks of unequal cost balance); worker in [0, workers) indexes the thread's workspace.
template <typename F>
void run_tasks(int64_t ntasks, int64_t workers, F&& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // MKL on one thread inside a task, whatever torch's thread count: MKL splits a product by its thread count even
    // where it then runs the parts on one thread (inside a parallel region), so on an AMD EPYC the same product
    // summed in another order on 1, 2 or 3 threads. With this, a task's products do not depend on the thread count.
    const int saved = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) fn(t, w);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved);
  });
}

// Work done once per item by the first task that needs it, while the others that need it wait: the features of
// a (batch, head), computed inside the one parallel region instead of in a pass of their own.
class OnceFlags {
 public:
  explicit OnceFlags(int64_t n) : state_(new std::atomic<int>[static_cast<size_t>(std::max<int64_t>(n, 1))]) {
    for (int64_t i = 0; i < n; ++i) state_[i].store(0, std::memory_order_relaxed);
  }
  template <typename F>
  void run(int64_t i, F&& fn) {
    if (state_[i].load(std::memory_order_acquire) == 2) return;
    int expected = 0;
    if (state_[i].compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      fn();
      state_[i].store(2, std::memory_order_release);
      return;
    }
    while (state_[i].load(std::memory_order_acquire) != 2) std::this_thread::yield();
  }

 private:
  std::unique_ptr<std::atomic<int>[]> state_;
};

// A worker's scratch, in elements, rounded up to 16 (64 bytes at least): every worker's arrays then have the same
// alignment, and so the same BLAS code path. MKL picks its kernels by the alignment of their operands on some CPUs
// (seen on AMD EPYC): with workers whose scratch started at different alignments, a task's products summed in an
// order that depended on which worker ran it, so on the number of threads.
int64_t aligned_elems(int64_t n) { return (n + 15) / 16 * 16; }

// A call's scratch memory (features, tiles, partial sums): one block, carved into 64-byte aligned arrays of the
// given sizes in bytes, uninitialised. The block is kept from call to call up to kScratchKeepBytes (freshly mapped
// memory costs a page fault per 4 KiB on its first touch: 5 to 10 % of a ViT-sized call); a call made while
// another one holds it, or that needs more, gets a block of its own.
constexpr size_t kScratchKeepBytes = size_t(64) << 20;

class Scratch {
 public:
  explicit Scratch(std::initializer_list<int64_t> bytes) {
    size_t total = 0;
    for (int64_t b : bytes) {
      offsets_.push_back(total);
      total += (static_cast<size_t>(std::max<int64_t>(b, 1)) + 63) / 64 * 64;
    }
    Pool& pool = shared();
    const std::lock_guard<std::mutex> lock(pool.mutex);
    if (!pool.busy && total <= kScratchKeepBytes) {
      if (pool.size < total) {
        std::free(pool.data);
        pool.data = static_cast<char*>(std::aligned_alloc(64, total));
        pool.size = pool.data != nullptr ? total : 0;
      }
      if (pool.data != nullptr) {
        pool.busy = true;
        base_ = pool.data;
        return;
      }
    }
    own_.reset(static_cast<char*>(std::aligned_alloc(64, total)));
    TORCH_CHECK(own_ != nullptr, "lisa_kernels.direct_cpu: out of memory (", total, " bytes of scratch)");
    base_ = own_.get();
  }
  ~Scratch() {
    if (own_ == nullptr) {
      Pool& pool = shared();
      const std::lock_guard<std::mutex> lock(pool.mutex);
      pool.busy = false;
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* get(size_t i) const { return reinterpret_cast<T*>(base_ + offsets_[i]); }

 private:
  struct Pool {
    std::mutex mutex;
    char* data = nullptr;
    size_t size = 0;
    bool busy = false;
  };
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  static Pool& shared() {
    static Pool pool;
    return pool;
  }
  std::vector<size_t> offsets_;
  char* base_ = nullptr;
  std::unique_ptr<char, Free> own_;
};

// out rows [n0, n1) of (b, h) = phi(scale x[b, h, n0:n1]) for x (B, H, N, D) of any strides and dtype; out is
// the contiguous (N, D) block of (b, h).
template <typename I, typename T>
void feature_rows(const Tensor& x, int64_t b, int64_t h, int64_t n0, int64_t n1, T scale, bool elu1, T* out) {
  const int64_t D = x.size(3);
  const auto s = x.strides();
  const I* xp = x.data_ptr<I>() + b * s[0] + h * s[1];
  for (int64_t n = n0; n < n1; ++n) {
    const I* __restrict row = xp + n * s[2];
    T* __restrict o = out + n * D;
    if (s[3] == 1) {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(row[d]) * scale;
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(row[d * s[3]]) * scale;
    }
  }
  phi_inplace<T>(out + n0 * D, (n1 - n0) * D, elu1);
}

// x as a (B, H, N, D) array of T whose rows have unit stride: x itself where it is one, else a contiguous copy.
// The rows of (b, h) start at data + b * sb + h * sh, ld apart.
struct RowView {
  Tensor t;
  int64_t sb, sh, ld;
};

RowView row_view(const Tensor& x, at::ScalarType ct) {
  if (x.scalar_type() == ct && x.stride(3) == 1 && x.stride(2) >= x.size(3) && x.stride(0) >= 0 &&
      x.stride(1) >= 0)
    return {x, x.stride(0), x.stride(1), x.stride(2)};
  Tensor c = x.to(ct).contiguous();
  return {c, c.stride(0), c.stride(1), c.stride(2)};
}

// ---------------------------------------------------------------- forward

template <typename I, typename T>
void forward_impl(const Sizes& z, const PairIndex& ix, const WeightTables<T>& wt, const Tensor& q, const Tensor& k,
                  T scale, bool elu1, const RowView& vv, bool normalize, double eps, bool causal, I* out, T* out_c,
                  T* inv) {
  const T* vbase = vv.t.data_ptr<T>();
  const int64_t ldv = vv.ld;
  std::vector<T> eps_s(z.H * z.M), post(z.H * z.M);
  for (int64_t hm = 0; hm < z.H * z.M; ++hm) {
    eps_s[hm] = static_cast<T>(eps * std::exp(-wt.mx[hm]));
    post[hm] = static_cast<T>(std::exp(wt.mx[hm]));
  }
  OnceFlags fk_done(z.B * z.H);
  const double madds = double(z.B * z.H) * double(z.N) * double(z.N) * double(z.Dk + z.Dv);
  const int64_t ntasks = z.B * z.H * z.qb.count, workers = num_workers(ntasks, madds);
  const int64_t tile = z.BQ * z.LT + kLanes;         // (a run's last chunk may pass a tile's end)
  const int64_t rtile = kRowChunk * z.LT + kLanes;
  const int64_t per_worker = aligned_elems((z.M > 1 ? 2 : 1) * tile + rtile + z.BQ * (z.Dk + z.Dv + z.M));
  const Scratch scratch({z.B * z.H * z.N * z.Dk * int64_t(sizeof(T)), workers * per_worker * int64_t(sizeof(T))});
  T* fk = scratch.get<T>(0);                         // phi(k) of a (batch, head), by its first task
  T* work = scratch.get<T>(1);
  run_tasks(ntasks, workers, [&](int64_t task, int64_t w) {
    T* A = work + w * per_worker;
    T* Wt = z.M > 1 ? A + tile : A;                      // the weighted tile (in place of A for one group)
    T* R = A + (z.M > 1 ? 2 : 1) * tile;                 // a chunk of rows of one group's weights
    T* acc = R + rtile;
    T* den = acc + z.BQ * z.Dv;
    T* fqb = den + z.BQ * z.M;
    std::vector<Run> runs;
    runs.reserve(z.BK);
    // query block slowest: the first tasks are distinct (batch, head)s, so that no worker waits for the features
    // another one is computing
    const int64_t bh = task % (z.B * z.H), h = bh % z.H, b = bh / z.H;
    const int64_t qbi = task / (z.B * z.H), q0 = z.qb.begin(qbi), q1 = z.qb.end(qbi), bq = q1 - q0;
    const int32_t* qb = ix.qb.data() + q0;
    T* fkb = fk + bh * z.N * z.Dk;
    fk_done.run(bh, [&] { feature_rows<I, T>(k, b, h, 0, z.N, T(1), elu1, fkb); });
    feature_rows<I, T>(q, b, h, q0, q1, scale, elu1, fqb - q0 * z.Dk);
    const T* vb = vbase + b * vv.sb + h * vv.sh;
    std::fill(acc, acc + bq * z.Dv, T(0));
    std::fill(den, den + bq * z.M, T(0));
    const int64_t kend = causal ? q1 : z.N;        // causal: keys j <= i < q1 (the table masks the rest)
    for (int64_t kbi = 0; kbi < z.kb.count && z.kb.begin(kbi) < kend; ++kbi) {
      const int64_t k0 = z.kb.begin(kbi), k1 = std::min(kend, z.kb.end(kbi)), bk = k1 - k0;
      const int nr = block_runs(ix, k0, k1, runs);
      gemm<T>(false, true, bq, bk, z.Dk, T(1), fqb, z.Dk, fkb + k0 * z.Dk, z.Dk, T(0), A, z.LT);
      for (int64_t m = 0; m < z.M; ++m) {
        const T* X = wt.X.data() + (h * z.M + m) * wt.TXP;
        for (int64_t i0 = 0; i0 < bq; i0 += kRowChunk) {
          const int64_t rows = std::min(kRowChunk, bq - i0);
          gather_weights<T>(R, rows, z.LT, qb + i0, X, runs.data(), nr);
          weigh_rows<T>(A + i0 * z.LT, R, Wt + i0 * z.LT, rows, bk, z.LT, den + i0 * z.M + m, z.M);
        }
        gemm<T>(false, false, bq, z.G, bk, T(1), Wt, z.LT, vb + k0 * ldv + m * z.G, ldv, T(1), acc + m * z.G,
                z.Dv);
      }
    }
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t row = bh * z.N + q0 + i;
      for (int64_t m = 0; m < z.M; ++m) {
        const T s = normalize ? T(1) / (den[i * z.M + m] + eps_s[h * z.M + m]) : post[h * z.M + m];
        if (inv != nullptr) inv[row * z.M + m] = s;
        const T* a = acc + i * z.Dv + m * z.G;
        scale_to<I, T>(out + row * z.Dv + m * z.G, a, s, z.G);
        if (out_c != nullptr) scale_to<T, T>(out_c + row * z.Dv + m * z.G, a, s, z.G);
      }
    }
  });
}

// ---------------------------------------------------------------- backward

struct BackwardPlan {
  int64_t nkb, nkc, kb_per_chunk, nbg, b_per_group, ntasks;
};

// Tasks (head, group of batches, chunk of key blocks), from the sizes alone (never the thread count: the sums
// of the table gradient follow the tasks, so the result is the same on any number of threads).
BackwardPlan backward_plan(const Sizes& z, int64_t TXP, int64_t itemsize) {
  BackwardPlan p{};
  p.nkb = z.kb.count;
  p.nkc = std::min(p.nkb, std::max<int64_t>(1, ceil_div(kMinBackwardTasks, z.B * z.H)));
  p.kb_per_chunk = ceil_div(p.nkb, p.nkc);
  p.nkc = ceil_div(p.nkb, p.kb_per_chunk);
  // a group holds several batches only where the per-task table gradients would exceed their budget
  const int64_t per_task = z.M * TXP * itemsize;
  const int64_t max_tasks = std::max<int64_t>(z.H * p.nkc, kTableGradBudget / std::max<int64_t>(per_task, 1));
  p.nbg = std::max<int64_t>(1, std::min<int64_t>(z.B, max_tasks / (z.H * p.nkc)));
  p.b_per_group = ceil_div(z.B, p.nbg);
  p.nbg = ceil_div(z.B, p.b_per_group);
  p.ntasks = z.H * p.nbg * p.nkc;
  return p;
}

// What the backward reads per (batch, head), computed by the first task that needs it: phi(q), phi(k), and the
// incoming gradient as gnum = s g (normalize; e^mx g otherwise) and gden = -s sum_c g out per group.
template <typename I, typename T>
struct BackwardInputs {
  const Sizes& z;
  const Tensor &q, &k, &grad_out, &out_c, &inv_c;
  T scale;
  bool elu1, normalize;
  const std::vector<double>& mx;
  T *fq, *fk, *gnum, *gden;

  void prepare(int64_t bh) {
    const int64_t b = bh / z.H, h = bh % z.H;
    feature_rows<I, T>(q, b, h, 0, z.N, scale, elu1, fq + bh * z.N * z.Dk);
    feature_rows<I, T>(k, b, h, 0, z.N, T(1), elu1, fk + bh * z.N * z.Dk);
    const auto os = out_c.strides(), gs = grad_out.strides();
    const T* op = out_c.data_ptr<T>() + b * os[0] + h * os[1];
    const I* gp = grad_out.data_ptr<I>() + b * gs[0] + h * gs[1];
    const T* ip = normalize ? inv_c.data_ptr<T>() + bh * z.N * z.M : nullptr;
    for (int64_t n = 0; n < z.N; ++n) {
      const I* g = gp + n * gs[2];
      const T* o = op + n * os[2];
      T* gn = gnum + (bh * z.N + n) * z.Dv;
      for (int64_t m = 0; m < z.M; ++m) {
        const T s = normalize ? ip[n * z.M + m] : static_cast<T>(std::exp(mx[h * z.M + m]));
        T dot = 0;
        if (gs[3] == 1 && os[3] == 1) {
          const I* __restrict gm = g + m * z.G;
          const T* __restrict om = o + m * z.G;
          T* __restrict gnm = gn + m * z.G;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < z.G; ++c) {
            const T gv = static_cast<T>(gm[c]);
            gnm[c] = gv * s;
            dot += gv * om[c];
          }
        } else {
          for (int64_t c = m * z.G; c < (m + 1) * z.G; ++c) {
            const T gv = static_cast<T>(g[c * gs[3]]);
            gn[c] = gv * s;
            dot += gv * o[c * os[3]];
          }
        }
        gden[(bh * z.N + n) * z.M + m] = normalize ? -s * dot : T(0);
      }
    }
  }
};

// Elements of T one worker of the backward uses: its tiles (A / W, dW, dA, W of a group when M > 1), a chunk of
// weight rows, and its keys' dk and dv sums.
int64_t backward_worker_elems(const Sizes& z) {
  return aligned_elems((z.M > 1 ? 4 : 3) * (z.BQ * z.LT + kLanes) + kRowChunk * z.LT + kLanes + z.BK * (z.Dk + z.Dv));
}

int64_t backward_workers(const Sizes& z, const BackwardPlan& p) {
  return num_workers(p.ntasks, 2.5 * double(z.B * z.H) * double(z.N) * double(z.N) * double(z.Dk + z.Dv));
}

template <typename I, typename T>
void backward_impl(const Sizes& z, const BackwardPlan& p, const PairIndex& ix, const WeightTables<T>& wt,
                   BackwardInputs<I, T>& in, const RowView& vv, bool causal, T* dfq, int64_t dfq_chunk_stride, T* gtab,
                   T* work, I* dq, I* dk, I* dv, bool elu1) {
  const int64_t workers = backward_workers(z, p);
  const T* vbase = vv.t.data_ptr<T>();
  const int64_t ldv = vv.ld;
  const int64_t tile = z.BQ * z.LT + kLanes;         // (a run's last chunk may pass a tile's end)
  const int64_t rtile = kRowChunk * z.LT + kLanes;
  const int64_t ntile = z.M > 1 ? 4 : 3;
  const int64_t per_worker = backward_worker_elems(z);
  OnceFlags prepared(z.B * z.H);
  run_tasks(p.ntasks, workers, [&](int64_t task, int64_t w) {
    T* A = work + w * per_worker;            // A, then W in place (one group)
    T* dW = A + tile;                        // dW, then the table gradient terms dd * W
    T* dA = A + 2 * tile;
    T* Wm = z.M > 1 ? A + 3 * tile : A;
    T* R = A + ntile * tile;                 // a chunk of rows of one group's weights
    T* dKb = R + rtile;
    T* dVb = dKb + z.BK * z.Dk;
    std::vector<Run> runs;
    runs.reserve(z.BK);
    // key chunk slowest (the first tasks prepare distinct (batch, head)s); the table gradient of the task's head
    // goes to slot (h, bg + nbg kc), summed per head in slot order afterwards
    const int64_t h = task % z.H, bg = (task / z.H) % p.nbg, kc = task / (z.H * p.nbg);
    T* G = gtab + (h * p.nbg * p.nkc + kc * p.nbg + bg) * z.M * wt.TXP;
    const int64_t kb0 = kc * p.kb_per_chunk, kb1 = std::min(p.nkb, kb0 + p.kb_per_chunk);
    for (int64_t b = bg * p.b_per_group; b < std::min(z.B, (bg + 1) * p.b_per_group); ++b) {
      const int64_t bh = b * z.H + h;
      prepared.run(bh, [&] { in.prepare(bh); });
      const T* fqb = in.fq + bh * z.N * z.Dk;
      const T* fkb = in.fk + bh * z.N * z.Dk;
      const T* gnb = in.gnum + bh * z.N * z.Dv;
      const T* gdb = in.gden + bh * z.N * z.M;
      const T* vb = vbase + b * vv.sb + h * vv.sh;
      T* dqb = dfq + kc * dfq_chunk_stride + bh * z.N * z.Dk;
      std::fill(dqb, dqb + z.N * z.Dk, T(0));       // this task owns this chunk's sum for (b, h)
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t k0 = z.kb.begin(kb), k1 = z.kb.end(kb), bk = k1 - k0;
        const int nr = block_runs(ix, k0, k1, runs);
        std::fill(dKb, dKb + bk * z.Dk, T(0));
        std::fill(dVb, dVb + bk * z.Dv, T(0));
        for (int64_t qbi = causal ? z.qb.of(k0) : 0; qbi < z.qb.count; ++qbi) {   // causal: queries i >= j >= k0
          const int64_t q0 = z.qb.begin(qbi), q1 = z.qb.end(qbi), bq = q1 - q0;
          const int32_t* qb = ix.qb.data() + q0;
          gemm<T>(false, true, bq, bk, z.Dk, T(1), fqb + q0 * z.Dk, z.Dk, fkb + k0 * z.Dk, z.Dk, T(0), A, z.LT);
          for (int64_t m = 0; m < z.M; ++m) {
            const T* X = wt.X.data() + (h * z.M + m) * wt.TXP;
            for (int64_t i0 = 0; i0 < bq; i0 += kRowChunk) {
              const int64_t rows = std::min(kRowChunk, bq - i0);
              gather_weights<T>(R, rows, z.LT, qb + i0, X, runs.data(), nr);
              weigh_rows<T>(A + i0 * z.LT, R, Wm + i0 * z.LT, rows, bk, z.LT, nullptr, 0);
            }
            const T* gnm = gnb + q0 * z.Dv + m * z.G;
            gemm<T>(true, false, bk, z.G, bq, T(1), Wm, z.LT, gnm, z.Dv, T(1), dVb + m * z.G, z.Dv);
            gemm<T>(false, true, bq, bk, z.G, T(1), gnm, z.Dv, vb + k0 * ldv + m * z.G, ldv, T(0), dW, z.LT);
            for (int64_t i0 = 0; i0 < bq; i0 += kRowChunk) {
              const int64_t rows = std::min(kRowChunk, bq - i0);
              gather_weights<T>(R, rows, z.LT, qb + i0, X, runs.data(), nr);
              weight_grad_rows<T>(dW + i0 * z.LT, Wm + i0 * z.LT, R, dA + i0 * z.LT, m > 0, rows, bk, z.LT,
                                  gdb + (q0 + i0) * z.M + m, z.M);
              scatter_weights<T>(dW + i0 * z.LT, rows, z.LT, qb + i0, G + m * wt.TXP, runs.data(), nr);
            }
          }
          gemm<T>(false, false, bq, z.Dk, bk, T(1), dA, z.LT, fkb + k0 * z.Dk, z.Dk, T(1), dqb + q0 * z.Dk, z.Dk);
          gemm<T>(true, false, bk, z.Dk, bq, T(1), dA, z.LT, fqb + q0 * z.Dk, z.Dk, T(1), dKb, z.Dk);
        }
        // this task owns these keys' dk and dv
        chain_feature<I, T>(dk + (bh * z.N + k0) * z.Dk, dKb, fkb + k0 * z.Dk, bk * z.Dk, elu1, T(1));
        I* ov = dv + (bh * z.N + k0) * z.Dv;
        for (int64_t c = 0; c < bk * z.Dv; ++c) ov[c] = static_cast<I>(dVb[c]);
      }
      // one chunk holds every key: dq of this (batch, head) is complete
      if (p.nkc == 1) chain_feature<I, T>(dq + bh * z.N * z.Dk, dqb, fqb, z.N * z.Dk, elu1, in.scale);
    }
  });
}

// ---------------------------------------------------------------- argument checks

struct Checked {
  int64_t B, H, N, Dk, Dv, M;
  at::ScalarType ct;
};

Checked check_args(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rpe,
                   const c10::optional<Tensor>& rpe_extra, at::IntArrayRef grid, int64_t num_extra, double eps,
                   bool circular, bool causal, double scale) {
  for (const Tensor* t : {&q, &k, &v, &rpe}) {
    TORCH_CHECK_VALUE(t->defined(), "lisa_kernels.", fn, ": q, k, v and rpe must be tensors");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "lisa_kernels.", fn, ": inputs must be CPU tensors, got one on ",
                      t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "lisa_kernels.", fn,
                     ": q, k, v and rpe must have one dtype, got ", q.scalar_type(), " and ", t->scalar_type());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "lisa_kernels.",
                   fn, ": inputs must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                        v.size(1) == q.size(1) && v.size(2) == q.size(2),
                    "lisa_kernels.", fn, ": q, k must be (B, H, N, Dk) and v (B, H, N, Dv), got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dk = q.size(3), Dv = v.size(3);
  TORCH_CHECK_VALUE(B > 0 && H > 0 && N > 0 && Dk > 0 && Dv > 0, "lisa_kernels.", fn,
                    ": empty inputs: q ", q.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(grid.size() >= 1 && grid.size() <= 3, "lisa_kernels.", fn, ": grid must have 1 to 3 axes, got ",
                    grid);
  int64_t ng = 1;
  for (int64_t s : grid) {
    TORCH_CHECK_VALUE(s >= 1, "lisa_kernels.", fn, ": grid sizes must be positive, got ", grid);
    ng *= s;
  }
  TORCH_CHECK_VALUE(num_extra >= 0 && num_extra + ng == N, "lisa_kernels.", fn, ": grid ", grid, " and num_extra=",
                    num_extra, " describe ", num_extra + ng, " tokens, but q has N=", N);
  TORCH_CHECK_VALUE(!causal || grid.size() == 1, "lisa_kernels.", fn, ": causal needs a 1D grid, got ", grid);
  TORCH_CHECK_VALUE(rpe.dim() == 2 + static_cast<int64_t>(grid.size()) && rpe.size(0) == H && rpe.size(1) >= 1,
                    "lisa_kernels.", fn, ": rpe must be (H, M, table...) with H=", H, " and ", grid.size(),
                    " table axes, got ", rpe.sizes());
  const int64_t M = rpe.size(1);
  for (size_t a = 0; a < grid.size(); ++a) {
    const int64_t want = circular ? grid[a] : 2 * grid[a] - 1;
    TORCH_CHECK_VALUE(rpe.size(2 + a) == want, "lisa_kernels.", fn, ": rpe must have ",
                      circular ? "S" : "2*S-1", " entries per axis for grid ", grid, ", got ", rpe.sizes());
  }
  TORCH_CHECK_VALUE(Dv % M == 0, "lisa_kernels.", fn, ": Dv=", Dv, " must be divisible by M=", M);
  if (rpe_extra.has_value() && rpe_extra->defined()) {
    const Tensor& x = *rpe_extra;
    TORCH_CHECK_VALUE(x.device().is_cpu(), "lisa_kernels.", fn, ": rpe_extra must be a CPU tensor");
    TORCH_CHECK_TYPE(x.scalar_type() == dt, "lisa_kernels.", fn, ": rpe_extra must have q's dtype ", dt, ", got ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == H && x.size(1) == M && x.size(2) == 3, "lisa_kernels.", fn,
                      ": rpe_extra must be (H, M, 3) = (", H, ", ", M, ", 3), got ", x.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "lisa_kernels.", fn, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "lisa_kernels.", fn, ": scale must be finite and > 0, got ",
                    scale);
  return {B, H, N, Dk, Dv, M, dt == at::kDouble ? at::kDouble : at::kFloat};
}

Sizes make_sizes(const Checked& c, int64_t block_q, int64_t block_k) {
  TORCH_CHECK_VALUE(block_q >= 0 && block_k >= 0, "lisa_kernels.direct_cpu: block sizes must be >= 0 (0: default)");
  Sizes z{};
  z.B = c.B; z.H = c.H; z.N = c.N; z.Dk = c.Dk; z.Dv = c.Dv; z.M = c.M; z.G = c.Dv / c.M;
  z.qb = Blocks(c.N, block_q > 0 ? block_q : kDefaultBlockQ);
  z.kb = Blocks(c.N, block_k > 0 ? block_k : kDefaultBlockK);
  z.BQ = z.qb.max_size();
  z.BK = z.kb.max_size();
  z.LT = ceil_div(z.BK, 16) * 16;
  TORCH_CHECK_VALUE(z.LT < (int64_t(1) << 31) && c.Dk < (int64_t(1) << 31) && c.Dv < (int64_t(1) << 31),
                    "lisa_kernels.direct_cpu: sizes too large");
  return z;
}

// rpe as a contiguous tensor of the compute dtype (H * M tables, one after the other); rpe_extra as a contiguous
// (H, M, 3), or undefined.
struct LogTables {
  Tensor rpe, extra;
};

LogTables log_tables(const Tensor& rpe, const c10::optional<Tensor>& rpe_extra, int64_t num_extra,
                                     at::ScalarType ct) {
  Tensor r = rpe.to(ct).contiguous();
  Tensor x;
  if (num_extra > 0 && rpe_extra.has_value() && rpe_extra->defined()) x = rpe_extra->to(ct).contiguous();
  return {r, x};
}

// The backward for inputs of dtype I (computing in T), after the argument checks.
template <typename I, typename T>
void backward_typed(const Checked& c, const Sizes& z, const PairIndex& ix, const Tensor& q, const Tensor& k,
                    const Tensor& v, const Tensor& rpe, const Tensor& rpe_c, const Tensor& extra_c, const Tensor& out,
                    const Tensor& inv, const Tensor& grad_out, bool elu1, bool normalize, bool circular, bool causal,
                    double scale, bool has_extra, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& drpe, Tensor& dextra) {
  const std::vector<int64_t>& src = ix.src;
  const WeightTables<T> wt = weight_tables<T>(rpe_c, extra_c, ix, c.H * c.M);
  const int64_t rows = c.B * c.H * c.N;
  const BackwardPlan p = backward_plan(z, wt.TXP, sizeof(T));
  // dfq: straight into place with one key chunk, else one buffer per chunk (each zeroed by the task that owns it)
  const int64_t chunk_stride = p.nkc > 1 ? rows * c.Dk : 0;
  const int64_t gtab_elems = p.ntasks * c.M * wt.TXP, item = sizeof(T);
  const Scratch scratch({rows * c.Dk * item, rows * c.Dk * item, rows * c.Dv * item, rows * c.M * item,
                         p.nkc * rows * c.Dk * item, gtab_elems * item,
                         backward_workers(z, p) * backward_worker_elems(z) * item});
  T* fq = scratch.get<T>(0);
  T* fk = scratch.get<T>(1);
  T* gnum = scratch.get<T>(2);
  T* gden = scratch.get<T>(3);
  T* dfq = scratch.get<T>(4);
  T* gtab = scratch.get<T>(5);
  std::fill(gtab, gtab + gtab_elems, T(0));
  const Tensor out_c = out.to(c.ct);
  const Tensor inv_c = normalize ? inv.to(c.ct).contiguous() : inv;
  BackwardInputs<I, T> in{z, q, k, grad_out, out_c, inv_c, static_cast<T>(scale), elu1, normalize, wt.mx,
                          fq, fk, gnum, gden};
  const RowView vv = row_view(v, c.ct);
  I* dqp = dq.data_ptr<I>();
  backward_impl<I, T>(z, p, ix, wt, in, vv, causal, dfq, chunk_stride, gtab, scratch.get<T>(6), dqp, dk.data_ptr<I>(),
                      dv.data_ptr<I>(), elu1);
  if (p.nkc > 1) {    // dq = (sum over key chunks of dfq, in chunk order) * phi'(scale q) * scale
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / c.Dk), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* acc = dfq + r * c.Dk;
        for (int64_t kc = 1; kc < p.nkc; ++kc) {
          const T* part = dfq + kc * chunk_stride + r * c.Dk;
          for (int64_t d = 0; d < c.Dk; ++d) acc[d] += part[d];
        }
        chain_feature<I, T>(dqp + r * c.Dk, acc, fq + r * c.Dk, c.Dk, elu1, static_cast<T>(scale));
      }
    });
  }
  // the table gradient (dlog = sum of dd W, already): per (head, group) the tasks' sums in task order, folded
  // onto rpe and rpe_extra
  Tensor drpe_c = at::zeros(rpe.sizes(), rpe_c.options());
  std::vector<T> dextra_c(static_cast<size_t>(c.H * c.M * 3), T(0));
  T* dr = drpe_c.data_ptr<T>();
  const int64_t tasks_per_head = p.nbg * p.nkc, Tr = rpe_c.numel() / (c.H * c.M), TXP = wt.TXP;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, tasks_per_head * ix.TX));
  at::parallel_for(0, c.H * c.M, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(ix.TX);
    for (int64_t hm = begin; hm < end; ++hm) {
      const int64_t h = hm / c.M, m = hm % c.M;
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t t = 0; t < tasks_per_head; ++t) {
        const T* g = gtab + ((h * tasks_per_head + t) * c.M + m) * TXP;
        for (int64_t u = 0; u < ix.TX; ++u) sum[u] += g[u];
      }
      for (int64_t f = 0; f < ix.TX; ++f) {
        const T gv = sum[ix.TX - 1 - f];
        const int64_t s = src[f];
        if (s >= 0) dr[hm * Tr + s] += gv;
        else if (s != kMasked) dextra_c[hm * 3 + (kKind0 - s)] += gv;
      }
    }
  });
  drpe.copy_(drpe_c);
  if (has_extra) dextra.copy_(at::from_blob(dextra_c.data(), {c.H, c.M, 3}, rpe_c.options()));
}

}  // namespace

std::vector<Tensor> direct_cpu_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rpe,
                                       const c10::optional<Tensor>& rpe_extra, at::IntArrayRef grid,
                                       int64_t num_extra, bool elu1, bool normalize, double eps, bool circular,
                                       bool causal, double scale, bool need_aux, int64_t block_q, int64_t block_k) {
  const Checked c = check_args("direct_cpu_forward", q, k, v, rpe, rpe_extra, grid, num_extra, eps, circular, causal,
                               scale);
  const Sizes z = make_sizes(c, block_q, block_k);
  const std::shared_ptr<const PairIndex> index = pair_index(grid, num_extra, circular, causal);
  const PairIndex& ix = *index;
  const LogTables lt = log_tables(rpe, rpe_extra, num_extra, c.ct);
  const Tensor& rpe_c = lt.rpe;
  const Tensor& extra_c = lt.extra;
  const at::TensorOptions copt = q.options().dtype(c.ct);
  Tensor out = at::empty({c.B, c.H, c.N, c.Dv}, q.options());
  Tensor out_c, inv;
  if (need_aux) {
    out_c = q.scalar_type() != c.ct ? at::empty({c.B, c.H, c.N, c.Dv}, copt) : at::empty({0}, copt);
    inv = normalize ? at::empty({c.B, c.H, c.N, c.M}, copt) : at::empty({0}, copt);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lisa_direct_cpu_forward", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const WeightTables<T> wt = weight_tables<T>(rpe_c, extra_c, ix, c.H * c.M);
    const RowView vv = row_view(v, c.ct);
    forward_impl<scalar_t, T>(z, ix, wt, q, k, static_cast<T>(scale), elu1, vv, normalize, eps, causal,
                              out.data_ptr<scalar_t>(),
                              out_c.defined() && out_c.numel() ? out_c.data_ptr<T>() : nullptr,
                              inv.defined() && inv.numel() ? inv.data_ptr<T>() : nullptr);
  });
  if (!need_aux) return {out};
  return {out, out_c, inv};
}

std::vector<Tensor> direct_cpu_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rpe,
                                        const c10::optional<Tensor>& rpe_extra, const Tensor& out, const Tensor& inv,
                                        const Tensor& grad_out, at::IntArrayRef grid, int64_t num_extra, bool elu1,
                                        bool normalize, double eps, bool circular, bool causal, double scale,
                                        int64_t block_q, int64_t block_k) {
  const Checked c = check_args("direct_cpu_backward", q, k, v, rpe, rpe_extra, grid, num_extra, eps, circular,
                               causal, scale);
  const Sizes z = make_sizes(c, block_q, block_k);
  TORCH_CHECK_VALUE(grad_out.defined() && grad_out.sizes() == v.sizes() && grad_out.device().is_cpu(),
                    "lisa_kernels.direct_cpu_backward: grad_out must be a CPU tensor of v's shape ", v.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type(), "lisa_kernels.direct_cpu_backward: grad_out must ",
                   "have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(out.defined() && out.sizes() == v.sizes() && out.device().is_cpu() &&
                        (out.scalar_type() == c.ct || out.scalar_type() == q.scalar_type()),
                    "lisa_kernels.direct_cpu_backward: out must be the forward's output (", v.sizes(), ")");
  if (normalize)
    TORCH_CHECK_VALUE(inv.defined() && inv.sizes() == at::IntArrayRef({c.B, c.H, c.N, c.M}) && inv.device().is_cpu(),
                      "lisa_kernels.direct_cpu_backward: inv must be the forward's (B, H, N, M) = (", c.B, ", ", c.H,
                      ", ", c.N, ", ", c.M, ") normalisers, got ", inv.defined() ? inv.sizes() : at::IntArrayRef{});
  const std::shared_ptr<const PairIndex> index = pair_index(grid, num_extra, circular, causal);
  const PairIndex& ix = *index;
  const LogTables lt = log_tables(rpe, rpe_extra, num_extra, c.ct);
  const Tensor& rpe_c = lt.rpe;
  const Tensor& extra_c = lt.extra;
  const bool has_extra = rpe_extra.has_value() && rpe_extra->defined();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor drpe = at::empty(rpe.sizes(), rpe.options());
  Tensor dextra = has_extra ? at::empty({c.H, c.M, 3}, rpe.options()) : at::empty({0}, rpe.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lisa_direct_cpu_backward", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_typed<scalar_t, T>(c, z, ix, q, k, v, rpe, rpe_c, extra_c, out, inv, grad_out, elu1, normalize,
                                circular, causal, scale, has_extra, dq, dk, dv, drpe, dextra);
  });
  return {dq, dk, dv, drpe, dextra};
}

std::string direct_cpu_gemm_name() { return have_blas() ? "blas" : "aten"; }

void direct_cpu_force_aten_gemm(bool force) { g_force_aten_gemm = force; }

}  // namespace lisa
