// The FFT path's chunk loop on the CPU (lisa_kernels/fft.py), one feature channel at a time, in cache.
//
// For each (batch*head bh, group m, extended value channel c) -- a "unit", owned by one thread -- and each
// feature channel d:
//
//     X   = FFT(fk[bh, d] * ve[bh, m, c])          the field, zero-padded to L per axis (pruned, see below)
//     X  *= khat[bh % H, m]                        the kernel's spectrum, pre-divided by prod(L)
//     out[bh, m, c] += fq[bh, d] * IFFT(X)         cropped to the grid
//
// Why: the batched torch.fft form of the same loop (TorchPasses) runs each stage over chunks of tens of MiB,
// and the transforms along the leading axes of a chunk (lead, L0, half) have two batch dims that cannot be
// collapsed into one, so torch.fft copies the chunk for each of them; the products and the contraction are
// more passes over memory. One channel's padded spectrum (1 MiB at a 256x256 grid) stays in the core's caches
// through the whole sequence, the leading-axes transform of one channel has a single batch dim (no copy), and
// the field is formed and contracted by the loops here, straight into and out of the transforms' buffers.
//
// The transforms are ATen's (at::_fft_r2c / _fft_c2c / _fft_c2r: MKL or pocketfft, whichever torch has),
// called from the worker threads of an at::parallel_for over units (each runs them single-threaded).
// Pruned as in fft.py: the last axis (r2c, length L) runs on the S nonzero rows only; the leading axes are
// one c2c call over the padded volume (on big 2D grids, one per block of columns: column_blocks below); the
// inverse crops the leading axes before the c2r of the kept rows.
//
// The backward is the same loop over units with H = fq[d] * ge[c] as the second field (fft.py's docstring):
// dfq[d] += ge[c] IFFT(FFT(U) K), dfk[d] += ve[c] Q, dve[c] += fk[d] Q with Q = IFFT(FFT(H) conj(K)), and the
// RPE gradient's spectrum dkhat[h, m] += FFT(H) conj(FFT(U)). dfq and dfk are summed over c, i.e. over units,
// so each thread sums them into its own buffers for one bh at a time and those are added up after each bh.
#include "fft_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace lisa {
namespace {

using at::Tensor;

struct Geom {
  int nd = 0;                   // grid axes
  std::vector<int64_t> S, L;    // grid and FFT sizes per axis
  std::vector<int64_t> lead1;   // the leading axes 1 .. nd-1 of a block (nb, S0.., L_last): one c2c call
  int64_t ng = 1, rows = 1;     // tokens; rows = tokens / S_last
  bool lead_padded = false;     // some leading axis has L > S
};

Geom make_geom(at::IntArrayRef grid, at::IntArrayRef sizes) {
  TORCH_CHECK(grid.size() >= 1 && grid.size() <= 3 && sizes.size() == grid.size(),
              "lisa_kernels fft_cpu: grid and sizes must have the same 1 to 3 axes, got ", grid, " and ", sizes);
  Geom g;
  g.nd = static_cast<int>(grid.size());
  for (int a = 0; a < g.nd; ++a) {
    TORCH_CHECK(grid[a] >= 1 && sizes[a] >= grid[a], "lisa_kernels fft_cpu: FFT sizes ", sizes,
                " must be >= the grid ", grid);
    g.S.push_back(grid[a]);
    g.L.push_back(sizes[a]);
    g.ng *= grid[a];
    if (a + 1 < g.nd) {
      g.lead1.push_back(a + 1);
      g.rows *= grid[a];
      g.lead_padded = g.lead_padded || sizes[a] > grid[a];
    }
  }
  return g;
}

// How many feature channels one transform call takes: a block whose padded fields stay in cache. A single 1D
// transform is several times slower per signal than a batch of them (MKL: 7x at length 32768), and on small
// grids the fixed cost of the calls (a few microseconds each) would exceed the arithmetic. On big 2D and 3D
// grids the block is one channel: its leading-axes c2c then has a single batch dim (no copy by torch.fft).
int64_t channel_block(const Geom& g, int64_t Dk, int64_t itemsize) {
  constexpr int64_t kBlockBytes = int64_t(2) << 20;
  int64_t P = 1;
  for (int64_t L : g.L) P *= L;
  return std::max<int64_t>(1, std::min<int64_t>(Dk, kBlockBytes / (4 * itemsize * P)));
}

// Column blocks of the leading-axis transform of a 2D grid: when one channel's padded spectrum exceeds a core's
// L2 cache (512 KiB on the development machine; 1 MiB at 256x256), its last axis (L_last/2+1 columns) is cut
// so that the leading-axis c2c, product and inverse run on one block of columns at a time, in cache. Measured
// 2026-12-02 on the 2-core CPU: 1.3-2.7x faster per channel in isolation (one thread, torch.fft), about 8%
// on the whole 256x256 D=32 forward; on 3D grids (a 2D leading transform over narrow blocks) and on blocks of
// several channels it was slower, so those stay whole.
constexpr int64_t kColumnBlockBytes = int64_t(256) << 10;   // a block's padded spectrum, at most (roughly)
constexpr int64_t kWholeSpectrumBytes = int64_t(512) << 10;  // up to this, one block

std::vector<std::pair<int64_t, int64_t>> column_blocks(const Geom& g, int64_t nb, int64_t csize) {
  const int64_t half = g.L.back() / 2 + 1;
  int64_t lead = nb * csize;
  for (int a = 0; a + 1 < g.nd; ++a) lead *= g.L[a];
  if (g.nd != 2 || nb > 1 || lead * half <= kWholeSpectrumBytes) return {{0, half}};
  const int64_t wmax = std::max<int64_t>(1, kColumnBlockBytes / lead);
  const int64_t nblk = (half + wmax - 1) / wmax, w = (half + nblk - 1) / nblk;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t j = 0; j < half; j += w) out.emplace_back(j, std::min(w, half - j));
  return out;
}

// One thread's buffers and the stages of a block of nb feature channels. Per block of channels:
//     R = rows(a, nb, b)                    r2c of the formed fields along the last axis
//     for each column block k:  X = col_spectrum(R, k); X *= kernel(.., k); Y = col_inverse(X, k, ybuf)
//     y = finish(Y)                         c2r along the last axis (of the kept rows)
template <typename T>
struct Worker {
  using C = c10::complex<T>;
  const Geom& g;
  int64_t nbmax, M;
  std::vector<std::pair<int64_t, int64_t>> cols;   // column blocks (start, width) of the spectrum's last axis
  Tensor real;                 // (nbmax, S0 .. S_{nd-2}, L_last): the fields, zero beyond S_last (never written)
  std::vector<Tensor> cpad;    // per column block (nbmax, L0 .. L_{nd-2}, width): zero beyond S on leading axes
  Tensor ybuf[2];              // (nbmax, S0 .. S_{nd-2}, L_last/2+1): inverse columns gathered (several blocks)
  std::vector<Tensor> kcache;  // per (h, m, column block): the kernel laid out like one channel's block spectrum

  Worker(const Geom& geom, const at::TensorOptions& opt, int64_t H, int64_t M_, int64_t nb)
      : g(geom), nbmax(nb), M(M_) {
    const auto copt = opt.dtype(c10::toComplexType(opt.dtype().toScalarType()));
    cols = column_blocks(g, nb, 2 * opt.dtype().itemsize());
    std::vector<int64_t> rshape = {nbmax};
    rshape.insert(rshape.end(), g.S.begin(), g.S.end() - 1);
    rshape.push_back(g.L.back());
    real = at::zeros(rshape, opt);
    if (g.nd > 1 && g.lead_padded) {
      for (const auto& c : cols) {
        std::vector<int64_t> cshape = {nbmax};
        cshape.insert(cshape.end(), g.L.begin(), g.L.end() - 1);
        cshape.push_back(c.second);
        cpad.push_back(at::zeros(cshape, copt));
      }
    }
    if (g.nd > 1 && cols.size() > 1) {
      rshape.back() = g.L.back() / 2 + 1;
      ybuf[0] = at::empty(rshape, copt);
      ybuf[1] = at::empty(rshape, copt);
    }
    kcache.resize(static_cast<size_t>(H * M) * cols.size());
  }

  // r2c along the last axis of the fields a_i[s] b[s], i < nb (a_i = a + i ng: consecutive channels),
  // zero-padded: a fresh (nb, S0.., L_last/2+1) complex tensor (on 1D grids: the spectrum).
  Tensor rows(const T* a, int64_t nb, const T* b) {
    T* rp = real.data_ptr<T>();
    const int64_t Sl = g.S.back(), Ll = g.L.back();
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t r = 0; r < g.rows; ++r) {
        const T* ar = a + i * g.ng + r * Sl;
        const T* br = b + r * Sl;
        T* o = rp + (i * g.rows + r) * Ll;
        for (int64_t s = 0; s < Sl; ++s) o[s] = ar[s] * br[s];
      }
    return at::_fft_r2c(real.narrow(0, 0, nb), {g.nd}, /*normalization=*/0, /*onesided=*/true);
  }

  // The spectrum of column block k: the leading axes of R's columns, zero-padded: (nb, L0.., width), fresh.
  Tensor col_spectrum(const Tensor& R, size_t k) {
    if (g.nd == 1) return R;
    const int64_t nb = R.size(0);
    const Tensor Rk = R.narrow(g.nd, cols[k].first, cols[k].second);
    if (!g.lead_padded) return at::_fft_c2c(Rk, g.lead1, 0, /*forward=*/true);
    Tensor pad = cpad[k].narrow(0, 0, nb);
    Tensor region = pad;
    for (int a = 0; a + 1 < g.nd; ++a) region = region.narrow(a + 1, 0, g.S[a]);
    region.copy_(Rk);
    return at::_fft_c2c(pad, g.lead1, 0, /*forward=*/true);
  }

  // khat[h, m] (column block k) in the memory layout of one channel of X (made once, then reused).
  const C* kernel(const Tensor& khat, int64_t h, int64_t m, const Tensor& X, size_t k) {
    const Tensor X1 = X.select(0, 0);
    Tensor& kc = kcache[static_cast<size_t>(h * M + m) * cols.size() + k];
    if (!kc.defined() || kc.strides() != X1.strides()) {
      kc = at::empty_strided(X1.sizes(), X1.strides(), X1.options());
      kc.copy_(khat.select(0, h).select(0, m).narrow(-1, cols[k].first, cols[k].second));
    }
    return kc.const_data_ptr<C>();
  }

  // The memory of channel i of a block of spectra (dense, in the kernel's layout), and its length.
  static C* channel(const Tensor& X, int64_t i, int64_t& n) {
    const Tensor Xi = X.select(0, i);
    TORCH_CHECK(Xi.is_non_overlapping_and_dense(), "lisa_kernels fft_cpu: a spectrum is not dense");
    n = Xi.numel();
    return Xi.data_ptr<C>();
  }

  // X *= K (or conj(K)), channel by channel: flat loops over memory that X's channels and K share.
  static void multiply(Tensor& X, const C* K, bool conj) {
    for (int64_t i = 0; i < X.size(0); ++i) {
      int64_t n = 0;
      C* x = channel(X, i, n);
      if (conj) {
        for (int64_t j = 0; j < n; ++j) x[j] *= std::conj(K[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) x[j] *= K[j];
      }
    }
  }

  // acc (one channel's block layout) += sum_i A_i conj(B_i), for the RPE gradient's spectrum.
  static void add_corr(Tensor& acc, const Tensor& A, const Tensor& B) {
    TORCH_CHECK(A.strides() == B.strides() && acc.strides() == A.select(0, 0).strides(),
                "lisa_kernels fft_cpu: spectra of one unit differ in layout");
    C* o = acc.data_ptr<C>();
    for (int64_t i = 0; i < A.size(0); ++i) {
      int64_t n = 0;
      const C* a = channel(A, i, n);
      const C* b = channel(B, i, n);
      for (int64_t j = 0; j < n; ++j) o[j] += a[j] * std::conj(b[j]);
    }
  }

  // Inverse leading-axes transform of column block k (unnormalised: prod(L) is in the kernel), cropped to the
  // grid; gathered into ybuf[slot] when there are several blocks. After the last block the returned tensor
  // holds every column: (nb, S0.., L_last/2+1), any strides.
  Tensor col_inverse(const Tensor& X, size_t k, int slot) {
    if (g.nd == 1) return X;
    Tensor Y = at::_fft_c2c(X, g.lead1, 0, /*forward=*/false);
    for (int a = 0; a + 1 < g.nd; ++a)
      if (g.S[a] < g.L[a]) Y = Y.narrow(a + 1, 0, g.S[a]);
    if (cols.size() == 1) return Y;
    Tensor out = ybuf[slot].narrow(0, 0, X.size(0));
    out.narrow(g.nd, cols[k].first, cols[k].second).copy_(Y);
    return out;
  }

  // c2r along the last axis of the kept rows: (nb, S0.., L_last), any strides.
  Tensor finish(const Tensor& Y) const { return at::_fft_c2r(Y, {g.nd}, 0, g.L.back()); }

  // acc[s] += w_i[s] y_i[s] over the grid for i < nb (w_i = w + i ng), or acc_i (acc + i ng) += w y_i if
  // per_channel_acc; y from inverse(), cropped here.
  void accumulate(T* acc, const T* w, const Tensor& y, bool per_channel_acc) const {
    const T* yp = y.const_data_ptr<T>();
    const int64_t Sl = g.S.back(), cs = y.stride(g.nd);
    for (int64_t i = 0; i < y.size(0); ++i) {
      T* acci = per_channel_acc ? acc + i * g.ng : acc;
      const T* wi = per_channel_acc ? w : w + i * g.ng;
      int64_t idx[3] = {0, 0, 0};
      for (int64_t r = 0; r < g.rows; ++r) {
        int64_t off = i * y.stride(0);
        for (int a = 0; a + 1 < g.nd; ++a) off += idx[a] * y.stride(a + 1);
        const T* yr = yp + off;
        T* o = acci + r * Sl;
        const T* wr = wi + r * Sl;
        if (cs == 1) {
          for (int64_t s = 0; s < Sl; ++s) o[s] += wr[s] * yr[s];
        } else {
          for (int64_t s = 0; s < Sl; ++s) o[s] += wr[s] * yr[s * cs];
        }
        for (int a = g.nd - 2; a >= 0; --a) {   // next row: row-major over the leading axes
          if (++idx[a] < g.S[a]) break;
          idx[a] = 0;
        }
      }
    }
  }
};

void check_inputs(const Tensor& fk, const Tensor& ve, const Tensor& fq, const Tensor& khat, const Geom& g) {
  TORCH_CHECK(fk.device().is_cpu(), "lisa_kernels fft_cpu: expected CPU tensors, got ", fk.device());
  TORCH_CHECK(fk.scalar_type() == at::kFloat || fk.scalar_type() == at::kDouble,
              "lisa_kernels fft_cpu: expected float32 or float64, got ", fk.scalar_type());
  for (const Tensor* t : {&fk, &ve, &fq}) {
    TORCH_CHECK(t->device() == fk.device() && t->scalar_type() == fk.scalar_type() && t->is_contiguous(),
                "lisa_kernels fft_cpu: fk, ve, fq must be contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(fk.dim() == 3 && fk.size(2) == g.ng && fq.sizes() == fk.sizes(),
              "lisa_kernels fft_cpu: fk and fq must be (BH, Dk, Ng=", g.ng, "), got ", fk.sizes(), " and ",
              fq.sizes());
  TORCH_CHECK(ve.dim() == 4 && ve.size(0) == fk.size(0) && ve.size(3) == g.ng,
              "lisa_kernels fft_cpu: ve must be (BH, M, G1, Ng=", g.ng, "), got ", ve.sizes());
  std::vector<int64_t> kshape = {khat.size(0), ve.size(1)};
  kshape.insert(kshape.end(), g.L.begin(), g.L.end() - 1);
  kshape.push_back(g.L.back() / 2 + 1);
  TORCH_CHECK(khat.scalar_type() == c10::toComplexType(fk.scalar_type()) && khat.dim() == g.nd + 2 &&
                  khat.sizes() == at::IntArrayRef(kshape) && khat.device().is_cpu() && khat.size(0) >= 1 &&
                  fk.size(0) % khat.size(0) == 0,
              "lisa_kernels fft_cpu: khat must be (H, M, L.., L_last/2+1) ", c10::toComplexType(fk.scalar_type()),
              " with H dividing BH, expected ", at::IntArrayRef(kshape), ", got ", khat.sizes(), " ",
              khat.scalar_type());
}

template <typename T>
Tensor forward_impl(const Tensor& fk, const Tensor& ve, const Tensor& fq, const Tensor& khat, const Geom& g) {
  const int64_t BH = fk.size(0), Dk = fk.size(1), M = ve.size(1), G1 = ve.size(2), H = khat.size(0);
  Tensor out = at::zeros({BH, M, G1, g.ng}, fk.options());
  const T* fkp = fk.const_data_ptr<T>();
  const T* fqp = fq.const_data_ptr<T>();
  const T* vep = ve.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t nb = channel_block(g, Dk, fk.element_size());
  at::parallel_for(0, BH * M * G1, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Worker<T> w(g, fk.options(), H, M, nb);
    for (int64_t u = begin; u < end; ++u) {          // u = (bh * M + m) * G1 + c
      const int64_t bh = u / (M * G1), m = (u / G1) % M;
      for (int64_t d = 0; d < Dk; d += nb) {
        const int64_t n = std::min(nb, Dk - d);
        const Tensor R = w.rows(fkp + (bh * Dk + d) * g.ng, n, vep + u * g.ng);
        Tensor Y;
        for (size_t k = 0; k < w.cols.size(); ++k) {
          Tensor X = w.col_spectrum(R, k);
          Worker<T>::multiply(X, w.kernel(khat, bh % H, m, X, k), false);
          Y = w.col_inverse(X, k, 0);
        }
        w.accumulate(op + u * g.ng, fqp + (bh * Dk + d) * g.ng, w.finish(Y), false);
      }
    }
  });
  return out;
}

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& fk, const Tensor& ve, const Tensor& fq, const Tensor& ge,
                                  const Tensor& khat, const Geom& g) {
  using C = c10::complex<T>;
  const int64_t BH = fk.size(0), Dk = fk.size(1), M = ve.size(1), G1 = ve.size(2), H = khat.size(0);
  Tensor dfq = at::zeros_like(fq), dfk = at::zeros_like(fk), dve = at::zeros_like(ve);
  Tensor dkhat = at::zeros(khat.sizes(), khat.options());
  const T* fkp = fk.const_data_ptr<T>();
  const T* fqp = fq.const_data_ptr<T>();
  const T* vep = ve.const_data_ptr<T>();
  const T* gep = ge.const_data_ptr<T>();
  T* dvp = dve.data_ptr<T>();
  // Per-thread state, kept across the bh loop: buffers, and sums over this thread's units of one bh.
  struct State {
    std::unique_ptr<Worker<T>> w;
    Tensor dq, dk;                // (Dk, Ng)
    std::vector<Tensor> dK;       // per (m, column block), in the spectra's layout (undefined until used)
    bool used = false;
  };
  const int64_t nb = channel_block(g, Dk, fk.element_size());
  const int nthreads = at::get_num_threads();
  std::vector<State> states(static_cast<size_t>(nthreads));
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t h = bh % H;
    at::parallel_for(0, M * G1, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView guard;
      const int tid = at::get_thread_num();
      TORCH_CHECK(tid >= 0 && tid < nthreads, "lisa_kernels fft_cpu: thread id ", tid, " out of range");
      State& st = states[static_cast<size_t>(tid)];
      if (!st.w) {
        st.w = std::make_unique<Worker<T>>(g, fk.options(), H, M, nb);
        st.dq = at::zeros({Dk, g.ng}, fk.options());
        st.dk = at::zeros({Dk, g.ng}, fk.options());
        st.dK.resize(static_cast<size_t>(M) * st.w->cols.size());
      }
      st.used = true;
      Worker<T>& w = *st.w;
      for (int64_t mc = begin; mc < end; ++mc) {
        const int64_t m = mc / G1, u = bh * M * G1 + mc;
        const T* vec = vep + u * g.ng;
        const T* gec = gep + u * g.ng;
        for (int64_t d = 0; d < Dk; d += nb) {
          const int64_t n = std::min(nb, Dk - d);
          const T* fkd = fkp + (bh * Dk + d) * g.ng;
          const T* fqd = fqp + (bh * Dk + d) * g.ng;
          const Tensor Ru = w.rows(fkd, n, vec);
          const Tensor Rh = w.rows(fqd, n, gec);
          Tensor F, Q;
          for (size_t k = 0; k < w.cols.size(); ++k) {
            Tensor Xu = w.col_spectrum(Ru, k);
            Tensor Xh = w.col_spectrum(Rh, k);
            Tensor& dK = st.dK[static_cast<size_t>(m) * w.cols.size() + k];
            if (!dK.defined()) dK = at::zeros_like(Xu.select(0, 0));   // one channel's (dense) layout
            Worker<T>::add_corr(dK, Xh, Xu);
            const C* K = w.kernel(khat, h, m, Xu, k);
            Worker<T>::multiply(Xu, K, false);
            F = w.col_inverse(Xu, k, 0);
            Worker<T>::multiply(Xh, K, true);
            Q = w.col_inverse(Xh, k, 1);
          }
          w.accumulate(st.dq.template data_ptr<T>() + d * g.ng, gec, w.finish(F), true);
          const Tensor q = w.finish(Q);
          w.accumulate(st.dk.template data_ptr<T>() + d * g.ng, vec, q, true);
          w.accumulate(dvp + u * g.ng, fkd, q, false);
        }
      }
    });
    for (State& st : states) {       // this bh's sums, in thread order (deterministic for a thread count)
      if (!st.used) continue;
      dfq.select(0, bh).add_(st.dq);
      dfk.select(0, bh).add_(st.dk);
      st.dq.zero_();
      st.dk.zero_();
      const auto& cols = st.w->cols;
      for (int64_t m = 0; m < M; ++m)
        for (size_t k = 0; k < cols.size(); ++k) {
          Tensor& dK = st.dK[static_cast<size_t>(m) * cols.size() + k];
          if (dK.defined()) {
            dkhat.select(0, h).select(0, m).narrow(-1, cols[k].first, cols[k].second).add_(dK);
            dK.zero_();
          }
        }
      st.used = false;
    }
  }
  return {dfq, dfk, dve, dkhat};
}

}  // namespace

int64_t fft_cpu_workspace_bytes(at::IntArrayRef grid, at::IntArrayRef sizes, int64_t H, int64_t M, int64_t Dk,
                                int64_t itemsize, bool backward) {
  const Geom g = make_geom(grid, sizes);
  const int64_t nb = channel_block(g, Dk, itemsize);
  const int64_t real = g.rows * g.L.back() * itemsize;             // one channel's padded real field
  int64_t half = g.L.back() / 2 + 1;
  for (int a = 0; a + 1 < g.nd; ++a) half *= g.L[a];
  const int64_t cspec = half * 2 * itemsize;                       // one channel's padded spectrum
  // real buffer, c2r output; padded column blocks, r2c output, a block's spectrum and inverse, the gathered
  // inverse columns (each at most one channel's padded spectrum); kernels per (h, m)
  int64_t per = nb * (2 * real + 5 * cspec) + H * M * cspec;
  if (backward)   // the second field's r2c, block spectrum and inverse, gathered columns; dfq, dfk sums of one
    per += nb * (real + 3 * cspec) + 2 * Dk * g.ng * itemsize + M * cspec;   // bh; RPE-gradient sums
  return per * at::get_num_threads();
}

Tensor fft_cpu_forward(const Tensor& fk, const Tensor& ve, const Tensor& fq, const Tensor& khat,
                       at::IntArrayRef grid, at::IntArrayRef sizes) {
  const Geom g = make_geom(grid, sizes);
  check_inputs(fk, ve, fq, khat, g);
  const Tensor kh = khat.contiguous();
  if (fk.scalar_type() == at::kDouble) return forward_impl<double>(fk, ve, fq, kh, g);
  return forward_impl<float>(fk, ve, fq, kh, g);
}

std::vector<Tensor> fft_cpu_backward(const Tensor& fk, const Tensor& ve, const Tensor& fq, const Tensor& ge,
                                     const Tensor& khat, at::IntArrayRef grid, at::IntArrayRef sizes) {
  const Geom g = make_geom(grid, sizes);
  check_inputs(fk, ve, fq, khat, g);
  TORCH_CHECK(ge.sizes() == ve.sizes() && ge.scalar_type() == ve.scalar_type() && ge.is_contiguous() &&
                  ge.device().is_cpu(),
              "lisa_kernels fft_cpu: ge must be a contiguous CPU tensor like ve ", ve.sizes(), ", got ", ge.sizes());
  const Tensor kh = khat.contiguous();
  if (fk.scalar_type() == at::kDouble) return backward_impl<double>(fk, ve, fq, ge, kh, g);
  return backward_impl<float>(fk, ve, fq, ge, kh, g);
}

}  // namespace lisa
