// The direct path's fused CPU kernel, forward and backward: see direct_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace lisa {

// The whole LiSA attention (extra tokens, causal mask, normalisation) of q, k (B, H, N, Dk), v (B, H, N, Dv),
// rpe (H, M, table...) and rpe_extra (H, M, 3) or None, as lisa_kernels.lisa_attention defines it.
// Returns {out (B, H, N, Dv) in q's dtype} or, with need_aux, {out, out_c, inv}: what the backward takes besides out:
//   out_c  the output in the compute dtype (float32) when q's dtype is float16/bfloat16, else empty;
//   inv    (B, H, N, M) in the compute dtype: 1 / (den' + eps') per query and group when normalize, else empty
//          (den' and eps' are the denominator and eps scaled by the weight table's shift, see direct_cpu.cpp).
// block_q / block_k (0: the defaults) set the tile sizes, for tests of the block edges.
std::vector<at::Tensor> direct_cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& rpe, const c10::optional<at::Tensor>& rpe_extra,
                                           at::IntArrayRef grid, int64_t num_extra, bool elu1, bool normalize,
                                           double eps, bool circular, bool causal, double scale, bool need_aux,
                                           int64_t block_q, int64_t block_k);

// Gradients {dq, dk, dv, drpe, drpe_extra (empty if rpe_extra is None)} of direct_cpu_forward for the incoming
// gradient grad_out, from the forward's out (out_c where it is not empty) and inv.
std::vector<at::Tensor> direct_cpu_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& rpe, const c10::optional<at::Tensor>& rpe_extra,
                                            const at::Tensor& out, const at::Tensor& inv, const at::Tensor& grad_out,
                                            at::IntArrayRef grid, int64_t num_extra, bool elu1, bool normalize,
                                            double eps, bool circular, bool causal, double scale, int64_t block_q,
                                            int64_t block_k);

// Which matrix-product routine the kernel uses: "blas" (the sgemm_/dgemm_ that torch's library exports) or
// "aten" (ATen's addmm, where no BLAS symbol is exported).
std::string direct_cpu_gemm_name();

// Tests: run the ATen fallback even where BLAS is exported (the fallback's own check).
void direct_cpu_force_aten_gemm(bool force);

}  // namespace lisa
