// The direct path's dense form (small problems) as one C++ call: see dense.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lisa {

// Above about this many multiply-adds (B H N^2 (Dk + Dv)) the ATen form, with BLAS products, is the faster one
// on a CPU (measured on the 2-core CI machine, one thread: both about 115 us at 2^17).
inline constexpr int64_t kDenseLoopMaxWork = int64_t(1) << 17;

at::Tensor dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpe,
                         const c10::optional<at::Tensor>& rpe_extra, const at::Tensor& index, int64_t num_extra,
                         bool elu1, bool normalize, double eps, bool causal, double scale);

}  // namespace lisa
