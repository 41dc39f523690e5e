// torch custom ops (namespace lisa_kernels) for the per-chunk passes of LiSA's FFT path.
//
// Each op checks its inputs up front (device, dtype, contiguity, sizes), then runs the element
// functions of fft_passes.h: on a CUDA tensor through the kernels of fft_passes.cu, on the current stream
// of the tensor's device; on a CPU tensor through an at::parallel_for loop (the same arithmetic, which is
// how CI tests the GPU code's math on machines without a GPU). The transforms themselves are torch.fft
// (cuFFT on a GPU, with torch's per-device plan cache), called from Python (lisa_kernels/cuda_fft.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef LISA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "dense.h"
#include "direct_cpu.h"
#include "fft_cpu.h"
#include "fft_passes.h"

namespace lisa {
namespace {

using at::IntArrayRef;
using at::Tensor;

// chunk = [b0, nb, d0, nd, m0, nm, c0, nc, H]
ChunkGeom make_geom(IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes) {
  TORCH_CHECK(chunk.size() == 9, "lisa_kernels: chunk must be [b0, nb, d0, nd, m0, nm, c0, nc, H], got ",
              chunk.size(), " values");
  TORCH_CHECK(grid.size() >= 1 && grid.size() <= 3 && sizes.size() == grid.size(),
              "lisa_kernels: grid and sizes must have the same 1 to 3 axes, got ", grid, " and ", sizes);
  ChunkGeom g{};
  g.b0 = chunk[0]; g.nb = chunk[1]; g.d0 = chunk[2]; g.nd = chunk[3];
  g.m0 = chunk[4]; g.nm = chunk[5]; g.c0 = chunk[6]; g.nc = chunk[7]; g.H = chunk[8];
  for (int64_t x : chunk) TORCH_CHECK(x >= 0, "lisa_kernels: chunk values must be >= 0, got ", chunk);
  TORCH_CHECK(g.nb > 0 && g.nd > 0 && g.nm > 0 && g.nc > 0 && g.H > 0, "lisa_kernels: empty chunk ", chunk);
  g.ndim = static_cast<int>(grid.size());
  g.P = 1;
  g.Ng = 1;
  for (int a = 0; a < g.ndim; ++a) {
    TORCH_CHECK(grid[a] >= 1 && sizes[a] >= grid[a], "lisa_kernels: FFT sizes ", sizes,
                " must be >= the grid ", grid);
    g.S[a] = grid[a];
    g.L[a] = sizes[a];
    g.P *= sizes[a];
    g.Ng *= grid[a];
  }
  g.F = g.P / g.L[g.ndim - 1] * (g.L[g.ndim - 1] / 2 + 1);
  return g;
}

void check_real(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "lisa_kernels: ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lisa_kernels: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "lisa_kernels: ", name, " must be contiguous");
}

void check_a(ChunkGeom& g, const Tensor& a) {
  TORCH_CHECK(a.dim() == 3 && a.size(1) == g.Ng, "lisa_kernels: a must be (BH, Ng=", g.Ng, ", Dk), got ",
              a.sizes());
  TORCH_CHECK(g.b0 + g.nb <= a.size(0), "lisa_kernels: chunk rows [", g.b0, ", ", g.b0 + g.nb,
              ") out of range for BH=", a.size(0));
  g.Dk = a.size(2);
  TORCH_CHECK(g.d0 + g.nd <= g.Dk, "lisa_kernels: chunk dims [", g.d0, ", ", g.d0 + g.nd,
              ") out of range for Dk=", g.Dk);
}

void check_bt(ChunkGeom& g, const Tensor& bt) {
  TORCH_CHECK(bt.dim() == 4 && bt.size(1) == g.Ng, "lisa_kernels: bt must be (BH, Ng=", g.Ng, ", M, G1), got ",
              bt.sizes());
  TORCH_CHECK(g.b0 + g.nb <= bt.size(0), "lisa_kernels: chunk rows out of range for BH=", bt.size(0));
  g.M = bt.size(2);
  g.G1 = bt.size(3);
  TORCH_CHECK(g.m0 + g.nm <= g.M && g.c0 + g.nc <= g.G1, "lisa_kernels: chunk groups/channels out of range for ",
              "M=", g.M, ", G1=", g.G1);
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "lisa_kernels: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Runs `pass` over n output elements on the device of `out`.
template <typename T>
void run_pass(Pass pass, const ChunkGeom& g, int64_t n, const T* x, const T* y, T* out, const Tensor& where) {
  if (where.is_cuda()) {
#ifdef LISA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(where.device());
    void* stream = at::cuda::getCurrentCUDAStream(where.device().index()).stream();
    if constexpr (std::is_same<T, float>::value) launch_pass_f32(pass, g, n, x, y, out, stream);
    else launch_pass_f64(pass, g, n, x, y, out, stream);
    return;
#else
    TORCH_CHECK(false, "lisa_kernels: this build of the extension has no CUDA kernels");
#endif
  }
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pass_element(pass, g, i, x, y, out);
  });
}

template <typename F>
void dispatch_float(const Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) f(float());
  else f(double());
}

std::vector<int64_t> field_shape(const ChunkGeom& g, bool spectrum) {
  std::vector<int64_t> shape{g.nb, g.nd, g.nm, g.nc};
  for (int a = 0; a < g.ndim; ++a) shape.push_back(g.L[a]);
  if (spectrum) shape.back() = g.L[g.ndim - 1] / 2 + 1;
  return shape;
}

void check_field(const Tensor& Y, const ChunkGeom& g, const char* name, bool spectrum) {
  TORCH_CHECK(Y.sizes() == IntArrayRef(field_shape(g, spectrum)), "lisa_kernels: ", name, " must have shape ",
              IntArrayRef(field_shape(g, spectrum)), ", got ", Y.sizes());
  TORCH_CHECK(Y.is_contiguous(), "lisa_kernels: ", name, " must be contiguous");
}

Tensor fft_form(const Tensor& a, const Tensor& bt, IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes) {
  ChunkGeom g = make_geom(chunk, grid, sizes);
  check_float(a, "a");
  check_real(bt, "bt", a);
  TORCH_CHECK(a.is_contiguous(), "lisa_kernels: a must be contiguous");
  check_a(g, a);
  check_bt(g, bt);
  Tensor X = at::empty(field_shape(g, false), a.options());
  dispatch_float(a, [&](auto zero) {
    using T = decltype(zero);
    run_pass<T>(Pass::Form, g, X.numel(), a.data_ptr<T>(), bt.data_ptr<T>(), X.data_ptr<T>(), a);
  });
  return X;
}

void fft_multiply_(Tensor& Xh, const Tensor& Kh, IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes,
                   bool conj) {
  ChunkGeom g = make_geom(chunk, grid, sizes);
  TORCH_CHECK(Xh.is_complex() && Kh.scalar_type() == Xh.scalar_type() && Kh.device() == Xh.device(),
              "lisa_kernels: xh and kh must be complex tensors of one dtype on one device, got ", Xh.scalar_type(),
              " on ", Xh.device(), " and ", Kh.scalar_type(), " on ", Kh.device());
  check_field(Xh, g, "xh", true);
  TORCH_CHECK(Kh.is_contiguous() && Kh.dim() == 2 + g.ndim && Kh.size(0) == g.H && Kh.numel() == g.H * Kh.size(1) * g.F,
              "lisa_kernels: kh must be a contiguous (H, M, spectrum...) tensor with H=", g.H, ", got ", Kh.sizes());
  g.M = Kh.size(1);
  TORCH_CHECK(g.m0 + g.nm <= g.M, "lisa_kernels: chunk groups out of range for M=", g.M);
  Tensor xr = at::view_as_real(Xh);
  Tensor kr = at::view_as_real(Kh);
  dispatch_float(xr, [&](auto zero) {
    using T = decltype(zero);
    run_pass<T>(conj ? Pass::MultiplyConj : Pass::Multiply, g, Xh.numel(), nullptr, kr.data_ptr<T>(),
                xr.data_ptr<T>(), xr);
  });
}

Tensor fft_contract_d(const Tensor& Y, const Tensor& a, IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes) {
  ChunkGeom g = make_geom(chunk, grid, sizes);
  check_float(Y, "y");
  check_real(a, "a", Y);
  check_a(g, a);
  check_field(Y, g, "y", false);
  Tensor out = at::empty({g.nb, g.nm, g.nc, g.Ng}, Y.options());
  dispatch_float(Y, [&](auto zero) {
    using T = decltype(zero);
    run_pass<T>(Pass::ContractD, g, out.numel(), Y.data_ptr<T>(), a.data_ptr<T>(), out.data_ptr<T>(), Y);
  });
  return out;
}

Tensor fft_contract_mc(const Tensor& Y, const Tensor& bt, IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes) {
  ChunkGeom g = make_geom(chunk, grid, sizes);
  check_float(Y, "y");
  check_real(bt, "bt", Y);
  check_bt(g, bt);
  check_field(Y, g, "y", false);
  Tensor out = at::empty({g.nb, g.nd, g.Ng}, Y.options());
  dispatch_float(Y, [&](auto zero) {
    using T = decltype(zero);
    run_pass<T>(Pass::ContractMC, g, out.numel(), Y.data_ptr<T>(), bt.data_ptr<T>(), out.data_ptr<T>(), Y);
  });
  return out;
}

Tensor fft_corr(const Tensor& Hh, const Tensor& Uh, IntArrayRef chunk, IntArrayRef grid, IntArrayRef sizes) {
  ChunkGeom g = make_geom(chunk, grid, sizes);
  TORCH_CHECK(Hh.is_complex() && Uh.scalar_type() == Hh.scalar_type() && Uh.device() == Hh.device(),
              "lisa_kernels: hh and uh must be complex tensors of one dtype on one device");
  check_field(Hh, g, "hh", true);
  check_field(Uh, g, "uh", true);
  std::vector<int64_t> shape{g.nb, g.nm};
  for (int a = 0; a < g.ndim; ++a) shape.push_back(a + 1 < g.ndim ? g.L[a] : g.L[a] / 2 + 1);
  Tensor out = at::empty(shape, Hh.options());
  Tensor hr = at::view_as_real(Hh), ur = at::view_as_real(Uh), outr = at::view_as_real(out);
  dispatch_float(hr, [&](auto zero) {
    using T = decltype(zero);
    run_pass<T>(Pass::Corr, g, out.numel(), hr.data_ptr<T>(), ur.data_ptr<T>(), outr.data_ptr<T>(), hr);
  });
  return out;
}

}  // namespace
}  // namespace lisa

TORCH_LIBRARY(lisa_kernels, m) {
  m.def("fft_form(Tensor a, Tensor bt, int[] chunk, int[] grid, int[] sizes) -> Tensor");
  m.def("fft_multiply_(Tensor(a!) xh, Tensor kh, int[] chunk, int[] grid, int[] sizes, bool conj) -> ()");
  m.def("fft_contract_d(Tensor y, Tensor a, int[] chunk, int[] grid, int[] sizes) -> Tensor");
  m.def("fft_contract_mc(Tensor y, Tensor bt, int[] chunk, int[] grid, int[] sizes) -> Tensor");
  m.def("fft_corr(Tensor hh, Tensor uh, int[] chunk, int[] grid, int[] sizes) -> Tensor");
}

TORCH_LIBRARY_IMPL(lisa_kernels, CPU, m) {
  m.impl("fft_form", &lisa::fft_form);
  m.impl("fft_multiply_", &lisa::fft_multiply_);
  m.impl("fft_contract_d", &lisa::fft_contract_d);
  m.impl("fft_contract_mc", &lisa::fft_contract_mc);
  m.impl("fft_corr", &lisa::fft_corr);
}

#ifdef LISA_WITH_CUDA
TORCH_LIBRARY_IMPL(lisa_kernels, CUDA, m) {
  m.impl("fft_form", &lisa::fft_form);
  m.impl("fft_multiply_", &lisa::fft_multiply_);
  m.impl("fft_contract_d", &lisa::fft_contract_d);
  m.impl("fft_contract_mc", &lisa::fft_contract_mc);
  m.impl("fft_corr", &lisa::fft_corr);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lisa_kernels._C: custom ops torch.ops.lisa_kernels.fft_* (CPU and CUDA) dense_forward and fft_cpu_{forward,backward}";
  m.def("dense_forward", &lisa::dense_forward,
        "The direct path's dense form, forward (lisa_kernels/direct.py): one call, no Python between the ops",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("rpe"),
        pybind11::arg("rpe_extra"), pybind11::arg("index"), pybind11::arg("num_extra"), pybind11::arg("elu1"),
        pybind11::arg("normalize"), pybind11::arg("eps"), pybind11::arg("causal"), pybind11::arg("scale"));
  m.attr("dense_loop_max_work") = lisa::kDenseLoopMaxWork;
  m.def("direct_cpu_forward", &lisa::direct_cpu_forward,
        "The direct path's fused CPU kernel, forward (csrc/direct_cpu.cpp): {out, out_c, inv}", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("rpe"), pybind11::arg("rpe_extra"),
        pybind11::arg("grid"), pybind11::arg("num_extra"), pybind11::arg("elu1"), pybind11::arg("normalize"),
        pybind11::arg("eps"), pybind11::arg("circular"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("need_aux"), pybind11::arg("block_q") = 0, pybind11::arg("block_k") = 0,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("direct_cpu_backward", &lisa::direct_cpu_backward,
        "The direct path's fused CPU kernel, backward (csrc/direct_cpu.cpp): {dq, dk, dv, drpe, drpe_extra}",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("rpe"), pybind11::arg("rpe_extra"),
        pybind11::arg("out"), pybind11::arg("inv"), pybind11::arg("grad_out"), pybind11::arg("grid"),
        pybind11::arg("num_extra"), pybind11::arg("elu1"), pybind11::arg("normalize"), pybind11::arg("eps"),
        pybind11::arg("circular"), pybind11::arg("causal"), pybind11::arg("scale"), pybind11::arg("block_q") = 0,
        pybind11::arg("block_k") = 0, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("direct_cpu_gemm", &lisa::direct_cpu_gemm_name,
        "The matrix-product routine of the fused direct kernel: 'blas' (torch's exported sgemm_/dgemm_) or 'aten'");
  m.def("_direct_cpu_force_aten_gemm", &lisa::direct_cpu_force_aten_gemm,
        "Tests: make the fused direct kernel use ATen's addmm (True) or BLAS where exported (False)",
        pybind11::arg("force"));
  m.def("fft_cpu_forward", &lisa::fft_cpu_forward,
        "The FFT path's forward loop on the CPU, one channel at a time (csrc/fft_cpu.cpp)", pybind11::arg("fk"),
        pybind11::arg("ve"), pybind11::arg("fq"), pybind11::arg("khat"), pybind11::arg("grid"),
        pybind11::arg("sizes"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("fft_cpu_workspace_bytes", &lisa::fft_cpu_workspace_bytes,
        "Workspace estimate of fft_cpu_forward / fft_cpu_backward (all threads)", pybind11::arg("grid"),
        pybind11::arg("sizes"), pybind11::arg("H"), pybind11::arg("M"), pybind11::arg("Dk"), pybind11::arg("itemsize"),
        pybind11::arg("backward"));
  m.def("fft_cpu_backward", &lisa::fft_cpu_backward,
        "The FFT path's backward loop on the CPU, one channel at a time (csrc/fft_cpu.cpp)", pybind11::arg("fk"),
        pybind11::arg("ve"), pybind11::arg("fq"), pybind11::arg("ge"), pybind11::arg("khat"), pybind11::arg("grid"),
        pybind11::arg("sizes"), pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef LISA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
