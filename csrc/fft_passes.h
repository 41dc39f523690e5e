// The per-chunk passes of LiSA's FFT path, as element functions shared by the CPU loops (ops.cpp) and
// the CUDA kernels (fft_passes.cu): one call computes one output element, so both devices run the same
// arithmetic and the CPU build of the extension tests the GPU code's math.
//
// A chunk covers nb (batch*head) rows from b0, nd feature dims from d0, nm groups from m0 and nc
// extended value channels from c0. Tensors (all contiguous):
//   a   (BH, Ng, Dk)        phi(k) or phi(q)
//   bt  (BH, Ng, M, G1)     [v, 1] or [gnum, gden], G1 = Dv / M + 1
//   X   (nb, nd, nm, nc, L0, .., L_{n-1})           real field, zero-padded to the FFT sizes L
//   Xh  (nb, nd, nm, nc, L0, .., L_{n-1} / 2 + 1)   its spectrum (complex, interleaved re/im)
//   Kh  (H, M, F)            the RPE kernel's spectrum, F = spectrum size per channel
// Pure C++ (no torch headers) so that nvcc compiles fft_passes.cu on its own in seconds.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LISA_HD __host__ __device__ __forceinline__
#else
#define LISA_HD inline
#endif

namespace lisa {

struct ChunkGeom {
  int64_t nb, nd, nm, nc;  // chunk extents
  int64_t b0, d0, m0, c0;  // chunk offsets in the full tensors
  int64_t Ng, Dk, M, G1;   // full sizes of a and bt
  int64_t H;               // heads: row b of the chunk belongs to head (b0 + b) % H
  int ndim;                // grid axes (1 to 3)
  int64_t S[3];            // grid sizes
  int64_t L[3];            // FFT sizes (L >= S)
  int64_t P;               // prod(L): real field size per channel
  int64_t F;               // prod(L[:-1]) * (L[-1] / 2 + 1): spectrum size per channel
};

// Grid token s (row-major over S) -> its offset in the zero-padded field (row-major over L).
LISA_HD int64_t padded_offset(const ChunkGeom& g, int64_t s) {
  int64_t off = 0, stride = 1;
  for (int a = g.ndim - 1; a >= 0; --a) {
    off += (s % g.S[a]) * stride;
    s /= g.S[a];
    stride *= g.L[a];
  }
  return off;
}

// Padded offset p -> grid token, or -1 where p lies in the zero padding.
LISA_HD int64_t grid_token(const ChunkGeom& g, int64_t p) {
  int64_t s = 0, stride = 1;
  for (int a = g.ndim - 1; a >= 0; --a) {
    int64_t coord = p % g.L[a];
    if (coord >= g.S[a]) return -1;
    s += coord * stride;
    p /= g.L[a];
    stride *= g.S[a];
  }
  return s;
}

// form: X[b, d, m, c, p] = a[b, s, d] * bt[b, s, m, c] at grid tokens s, 0 in the padding.
// Element i runs over nb * nd * nm * nc * P.
template <typename T>
LISA_HD void form_element(const ChunkGeom& g, int64_t i, const T* a, const T* bt, T* X) {
  int64_t p = i % g.P, r = i / g.P;
  int64_t c = r % g.nc; r /= g.nc;
  int64_t m = r % g.nm; r /= g.nm;
  int64_t d = r % g.nd;
  int64_t b = r / g.nd;
  int64_t s = grid_token(g, p);
  if (s < 0) { X[i] = T(0); return; }
  int64_t row = (g.b0 + b) * g.Ng + s;
  X[i] = a[row * g.Dk + g.d0 + d] * bt[(row * g.M + g.m0 + m) * g.G1 + g.c0 + c];
}

// multiply: Xh[b, d, m, c, f] *= Kh[head(b), m, f] (or its conjugate). Element i over nb*nd*nm*nc*F.
template <typename T>
LISA_HD void multiply_element(const ChunkGeom& g, int64_t i, T* Xh, const T* Kh, bool conj) {
  int64_t f = i % g.F, r = i / g.F;
  r /= g.nc;
  int64_t m = r % g.nm; r /= g.nm;
  int64_t b = r / g.nd;
  int64_t h = (g.b0 + b) % g.H;
  const T* k = Kh + 2 * ((h * g.M + g.m0 + m) * g.F + f);
  T kr = k[0], ki = conj ? -k[1] : k[1];
  T xr = Xh[2 * i], xi = Xh[2 * i + 1];
  Xh[2 * i] = xr * kr - xi * ki;
  Xh[2 * i + 1] = xr * ki + xi * kr;
}

// contract over d: out[b, m, c, s] = sum_d Y[b, d, m, c, pad(s)] * a[b, s, d]. Element i over nb*nm*nc*Ng.
template <typename T>
LISA_HD void contract_d_element(const ChunkGeom& g, int64_t i, const T* Y, const T* a, T* out) {
  int64_t s = i % g.Ng, r = i / g.Ng;
  int64_t c = r % g.nc; r /= g.nc;
  int64_t m = r % g.nm;
  int64_t b = r / g.nm;
  int64_t p = padded_offset(g, s);
  const T* arow = a + ((g.b0 + b) * g.Ng + s) * g.Dk + g.d0;
  T acc = T(0);
  for (int64_t d = 0; d < g.nd; ++d)
    acc += Y[(((b * g.nd + d) * g.nm + m) * g.nc + c) * g.P + p] * arow[d];
  out[i] = acc;
}

// contract over (m, c): out[b, d, s] = sum_{m, c} Y[b, d, m, c, pad(s)] * bt[b, s, m, c].
// Element i over nb*nd*Ng.
template <typename T>
LISA_HD void contract_mc_element(const ChunkGeom& g, int64_t i, const T* Y, const T* bt, T* out) {
  int64_t s = i % g.Ng, r = i / g.Ng;
  int64_t d = r % g.nd;
  int64_t b = r / g.nd;
  int64_t p = padded_offset(g, s);
  const T* brow = bt + ((g.b0 + b) * g.Ng + s) * g.M * g.G1;
  T acc = T(0);
  for (int64_t m = 0; m < g.nm; ++m)
    for (int64_t c = 0; c < g.nc; ++c)
      acc += Y[(((b * g.nd + d) * g.nm + m) * g.nc + c) * g.P + p] * brow[(g.m0 + m) * g.G1 + g.c0 + c];
  out[i] = acc;
}

// correlation spectrum: out[b, m, f] = sum_{d, c} Hh[b, d, m, c, f] * conj(Uh[b, d, m, c, f]).
// Element i over nb*nm*F; a fixed summation order, so the result is deterministic.
template <typename T>
LISA_HD void corr_element(const ChunkGeom& g, int64_t i, const T* Hh, const T* Uh, T* out) {
  int64_t f = i % g.F, r = i / g.F;
  int64_t m = r % g.nm;
  int64_t b = r / g.nm;
  T re = T(0), im = T(0);
  for (int64_t d = 0; d < g.nd; ++d)
    for (int64_t c = 0; c < g.nc; ++c) {
      int64_t j = 2 * ((((b * g.nd + d) * g.nm + m) * g.nc + c) * g.F + f);
      T hr = Hh[j], hi = Hh[j + 1], ur = Uh[j], ui = Uh[j + 1];
      re += hr * ur + hi * ui;
      im += hi * ur - hr * ui;
    }
  out[2 * i] = re;
  out[2 * i + 1] = im;
}

enum class Pass { Form, Multiply, MultiplyConj, ContractD, ContractMC, Corr };

// Element i of a pass: x and y are its inputs, out its output (multiply updates out in place, x unused).
template <typename T>
LISA_HD void pass_element(Pass pass, const ChunkGeom& g, int64_t i, const T* x, const T* y, T* out) {
  switch (pass) {
    case Pass::Form: form_element(g, i, x, y, out); break;
    case Pass::Multiply: multiply_element(g, i, out, y, false); break;
    case Pass::MultiplyConj: multiply_element(g, i, out, y, true); break;
    case Pass::ContractD: contract_d_element(g, i, x, y, out); break;
    case Pass::ContractMC: contract_mc_element(g, i, x, y, out); break;
    case Pass::Corr: corr_element(g, i, x, y, out); break;
  }
}

// CUDA launchers (fft_passes.cu); `stream` is a cudaStream_t passed as void* to keep this header plain C++.
void launch_pass_f32(Pass pass, const ChunkGeom& g, int64_t n, const float* x, const float* y, float* out,
                     void* stream);
void launch_pass_f64(Pass pass, const ChunkGeom& g, int64_t n, const double* x, const double* y, double* out,
                     void* stream);

}  // namespace lisa
