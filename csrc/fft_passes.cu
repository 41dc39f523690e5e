// CUDA kernels of the FFT path's per-chunk passes: one thread per output element (grid-stride loop),
// each calling the element function of fft_passes.h that the CPU loops in ops.cpp also call.
// No torch headers: `nvcc -c csrc/fft_passes.cu` compiles this file on its own.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fft_passes.h"

namespace lisa {
namespace {

template <typename T>
__global__ void pass_kernel(Pass pass, ChunkGeom g, int64_t n, const T* __restrict__ x, const T* __restrict__ y,
                            T* out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    pass_element(pass, g, i, x, y, out);
}

template <typename T>
void launch(Pass pass, const ChunkGeom& g, int64_t n, const T* x, const T* y, T* out, void* stream) {
  if (n <= 0) return;
  constexpr int kThreads = 256;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;  // grid-stride loop covers the rest
  pass_kernel<T><<<(unsigned)blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(pass, g, n, x, y, out);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("lisa_kernels: FFT-pass kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void launch_pass_f32(Pass pass, const ChunkGeom& g, int64_t n, const float* x, const float* y, float* out,
                     void* stream) {
  launch<float>(pass, g, n, x, y, out, stream);
}

void launch_pass_f64(Pass pass, const ChunkGeom& g, int64_t n, const double* x, const double* y, double* out,
                     void* stream) {
  launch<double>(pass, g, n, x, y, out, stream);
}

}  // namespace lisa
