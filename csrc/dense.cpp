// The direct path's dense form, forward, as one C++ call (lisa_kernels/direct.py, _dense_pass with keep=False).
//
// On small problems (a ViT layer at B=1, say) the work of the dense form is a dozen tiny aten ops, and each
// op's fixed cost (dispatch, TensorIterator set-up, allocation: several microseconds on a CPU) is many times
// its arithmetic. For grid and extra tokens i, j with table entry index[i, j] (built in Python, cached per grid):
//
//     table     = [rpe flattened | rpe_extra or 0 (if num_extra) | -inf (if causal)]        (H, M, T')
//     W^m[i, j] = (phi(scale q_i) . phi(k_j)) * exp(table[h, m, index[i, j]])
//     out_i[c]  = sum_j W^m[i, j] v_j[c] / (sum_j W^m[i, j] + eps)        (numerator only if !normalize)
//
// Two forms of the same formula:
//   - on CPU tensors with little work (B H N^2 (Dk + Dv) <= kDenseLoopMaxWork), one loop nest over (b, h) blocks,
//     accumulating in float (double for double inputs): no intermediate tensor at all;
//   - otherwise (a GPU, or more work than that) the ATen sequence of _dense_pass, issued from C++: the same
//     ops in the same order, so the two agree to round-off, and BLAS or cuBLAS does the products.
// The caller (lisa_kernels.ops.direct_dense_attention) has validated every argument; the checks here only
// keep a misuse from reading out of bounds.
#include "dense.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace lisa {

namespace {

at::Tensor phi(const at::Tensor& x, bool elu1) { return elu1 ? at::elu(x).add_(1.0) : at::relu(x); }

template <typename A>
inline A phi_scalar(A x, bool elu1) {
  if (elu1) return x > A(0) ? x + A(1) : std::exp(x);
  return x > A(0) ? x : A(0);
}

// exp(table) for every head: (H, M, T') with T' = T + 3 (if num_extra) + 1 (if causal; exp(-inf) = 0).
template <typename A>
std::vector<A> exp_table(const at::Tensor& rpe3, const c10::optional<at::Tensor>& extra3, int64_t num_extra,
                         bool causal, int64_t Tp) {
  const int64_t H = rpe3.size(0), M = rpe3.size(1), T = rpe3.size(2);
  std::vector<A> out(static_cast<size_t>(H * M * Tp), A(0));
  const A* r = rpe3.data_ptr<A>();
  const A* x = extra3.has_value() ? extra3->data_ptr<A>() : nullptr;
  for (int64_t hm = 0; hm < H * M; ++hm) {
    A* row = out.data() + hm * Tp;
    for (int64_t t = 0; t < T; ++t) row[t] = std::exp(r[hm * T + t]);
    if (num_extra > 0)
      for (int64_t t = 0; t < 3; ++t) row[T + t] = x != nullptr ? std::exp(x[hm * 3 + t]) : A(1);
    if (causal) row[Tp - 1] = A(0);
  }
  return out;
}

// The loop form: one (b, h) pair per task; features of the block's keys computed once, each (i, j) dot
// product once and shared by the M groups.
template <typename T, typename A>
void dense_forward_loop(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<A>& et,
                        const int64_t* index, int64_t M, int64_t Tp, bool elu1, bool normalize, A eps, A scale,
                        at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dk = q.size(3), Dv = v.size(3), G = Dv / M;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const int64_t work = N * N * (Dk + Dv);
  at::parallel_for(0, B * H, std::max<int64_t>(1, kDenseLoopMaxWork / 8 / std::max<int64_t>(work, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> fq(N * Dk), fk(N * Dk), dots(N), num(G);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* qb = qp + b * qs[0] + h * qs[1];
      const T* kb = kp + b * ks[0] + h * ks[1];
      const T* vb = vp + b * vs[0] + h * vs[1];
      for (int64_t i = 0; i < N; ++i)
        for (int64_t d = 0; d < Dk; ++d) {
          fq[i * Dk + d] = phi_scalar<A>(static_cast<A>(qb[i * qs[2] + d * qs[3]]) * scale, elu1);
          fk[i * Dk + d] = phi_scalar<A>(static_cast<A>(kb[i * ks[2] + d * ks[3]]), elu1);
        }
      T* ob = op + bh * N * Dv;
      for (int64_t i = 0; i < N; ++i) {
        const A* fqi = fq.data() + i * Dk;
        for (int64_t j = 0; j < N; ++j) {
          const A* fkj = fk.data() + j * Dk;
          A s = 0;
          for (int64_t d = 0; d < Dk; ++d) s += fqi[d] * fkj[d];
          dots[j] = s;
        }
        const int64_t* ix = index + i * N;
        for (int64_t m = 0; m < M; ++m) {
          const A* e = et.data() + (h * M + m) * Tp;
          std::fill(num.begin(), num.end(), A(0));
          A den = 0;
          for (int64_t j = 0; j < N; ++j) {
            const A w = dots[j] * e[ix[j]];
            den += w;
            const T* vj = vb + j * vs[2] + m * G * vs[3];
            for (int64_t c = 0; c < G; ++c) num[c] += w * static_cast<A>(vj[c * vs[3]]);
          }
          const A inv = normalize ? A(1) / (den + eps) : A(1);
          for (int64_t c = 0; c < G; ++c) ob[i * Dv + m * G + c] = static_cast<T>(num[c] * inv);
        }
      }
    }
  });
}

}  // namespace

at::Tensor dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpe,
                         const c10::optional<at::Tensor>& rpe_extra, const at::Tensor& index, int64_t num_extra,
                         bool elu1, bool normalize, double eps, bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "lisa_kernels.dense_forward: q, k must be (B, H, N, Dk) and v (B, H, N, Dv), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dk = q.size(3), Dv = v.size(3);
  TORCH_CHECK(rpe.dim() >= 3 && rpe.size(0) == H && Dv % rpe.size(1) == 0,
              "lisa_kernels.dense_forward: rpe must be (H, M, ...) with M dividing Dv, got ", rpe.sizes());
  const int64_t M = rpe.size(1);
  TORCH_CHECK(index.dim() == 1 && index.numel() == N * N && index.scalar_type() == at::kLong &&
                  index.device() == q.device(),
              "lisa_kernels.dense_forward: index must be N*N int64 entries on q's device");
  const auto ct = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rpe_extra.has_value())
    TORCH_CHECK(rpe_extra->dim() == 3 && rpe_extra->size(0) == H && rpe_extra->size(1) == M &&
                    rpe_extra->size(2) == 3,
                "lisa_kernels.dense_forward: rpe_extra must be (H, M, 3), got ", rpe_extra->sizes());

  if (q.device().is_cpu() && B * H * N * N * (Dk + Dv) <= kDenseLoopMaxWork) {
    const at::Tensor rpe3 = rpe.reshape({H, M, -1}).to(ct).contiguous();
    c10::optional<at::Tensor> extra3;
    if (num_extra > 0 && rpe_extra.has_value()) extra3 = rpe_extra->to(ct).contiguous();
    const int64_t Tp = rpe3.size(2) + (num_extra > 0 ? 3 : 0) + (causal ? 1 : 0);
    const at::Tensor ix = index.contiguous();
    const int64_t* ixp = ix.data_ptr<int64_t>();
    for (int64_t t = 0; t < N * N; ++t)
      TORCH_CHECK(ixp[t] >= 0 && ixp[t] < Tp, "lisa_kernels.dense_forward: index entry ", ixp[t],
                  " outside the table of ", Tp, " entries");
    at::Tensor out = at::empty({B, H, N, Dv}, q.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lisa_dense_forward_loop", [&] {
      using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const std::vector<A> et = exp_table<A>(rpe3, extra3, num_extra, causal, Tp);
      dense_forward_loop<scalar_t, A>(q, k, v, et, ixp, M, Tp, elu1, normalize, static_cast<A>(eps),
                                      static_cast<A>(scale), out);
    });
    return out;
  }

  at::Tensor qc = q.to(ct);
  if (scale != 1.0) qc = qc.mul(scale);
  const at::Tensor fq = phi(qc, elu1).reshape({B * H, N, Dk});
  const at::Tensor fk = phi(k.to(ct), elu1).reshape({B * H, N, Dk});
  at::Tensor A = at::bmm(fq, fk.transpose(1, 2)).view({B, H, N, N});

  at::Tensor table = rpe.reshape({H, M, -1}).to(ct);
  std::vector<at::Tensor> parts{table};
  if (num_extra > 0) {
    if (rpe_extra.has_value()) {
      parts.push_back(rpe_extra->to(ct));
    } else {
      parts.push_back(at::zeros({H, M, 3}, table.options()));
    }
  }
  if (causal) parts.push_back(at::full({H, M, 1}, -std::numeric_limits<double>::infinity(), table.options()));
  if (parts.size() > 1) table = at::cat(parts, -1);
  const at::Tensor R = table.exp().index_select(-1, index);              // bounds-checked by index_select

  const at::Tensor vc = v.to(ct);
  at::Tensor num;
  at::Tensor W;
  if (M == 1) {
    W = A.mul_(R.view({H, N, N}));                                           // (B, H, N, N)
    num = at::bmm(W.view({B * H, N, N}), vc.reshape({B * H, N, Dv})).view({B, H, N, Dv});
  } else {
    W = A.unsqueeze(2) * R.view({H, M, N, N});                               // (B, H, M, N, N)
    num = at::matmul(W, vc.reshape({B, H, N, M, Dv / M}).transpose(2, 3));  // (B, H, M, N, G)
  }
  if (normalize) num.div_(W.sum(-1, /*keepdim=*/true).add_(eps));
  at::Tensor out = M == 1 ? num : num.transpose(2, 3).reshape({B, H, N, Dv});
  return out.to(q.scalar_type());
}

}  // namespace lisa
