// The FFT path's chunk loop on the CPU, one channel at a time in cache: see fft_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace lisa {

// Forward: out[bh, m, c] = sum_d fq[bh, d] * IFFT( FFT(fk[bh, d] * ve[bh, m, c]) * khat[bh % H, m] ), cropped.
// fk, fq (BH, Dk, Ng), ve (BH, M, G1, Ng) contiguous float/double; khat (H, M, L..., L_d/2+1) complex, the
// kernel's spectrum already divided by prod(L). Returns out (BH, M, G1, Ng).
at::Tensor fft_cpu_forward(const at::Tensor& fk, const at::Tensor& ve, const at::Tensor& fq, const at::Tensor& khat,
                           at::IntArrayRef grid, at::IntArrayRef sizes);

// Backward of the same loop for incoming gradients ge (BH, M, G1, Ng) (see lisa_kernels/fft.py):
// returns {dfq (BH, Dk, Ng), dfk (BH, Dk, Ng), dve (BH, M, G1, Ng), dkhat (H, M, L..., L_d/2+1)} where dkhat is
// the unnormalised sum over (b of head h, d, c of group m) of FFT(fq[d] ge[c]) * conj(FFT(fk[d] ve[c])).
std::vector<at::Tensor> fft_cpu_backward(const at::Tensor& fk, const at::Tensor& ve, const at::Tensor& fq,
                                         const at::Tensor& ge, const at::Tensor& khat, at::IntArrayRef grid,
                                         at::IntArrayRef sizes);

// An upper estimate of the bytes the two loops above allocate besides their inputs and outputs, over all threads.
int64_t fft_cpu_workspace_bytes(at::IntArrayRef grid, at::IntArrayRef sizes, int64_t H, int64_t M, int64_t Dk,
                                int64_t itemsize, bool backward);

}  // namespace lisa
