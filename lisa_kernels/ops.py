"""Every kernel entry point as a ``torch.library`` custom op, with a fake (meta) implementation and autograd.

This is what makes ``torch.compile(fullgraph=True)`` see each core as one node instead of tracing
into its Python loops (and what ``torch.library.opcheck`` tests). Each core is a pair of ops, forward and
backward, joined by ``register_autograd``:

| op (namespace ``lisa_kernels``) | computes |
| --- | --- |
| ``direct_core`` / ``direct_core_backward`` | the direct path's grid-to-grid (num, den), :mod:`.direct` |
| ``direct_dense`` / ``direct_dense_backward`` | the direct path's whole output on small problems (one block), :mod:`.direct` |
| ``direct_cpu`` / ``direct_cpu_backward`` | the direct path's whole output on the CPU, the extension's fused kernel (csrc/direct_cpu.cpp) |
| ``fft_core`` / ``fft_core_backward`` | the FFT path's (num, den, below) with ``passes`` = "torch" (:mod:`.fft`), "cuda" (the extension, :mod:`.cuda_fft`) or "triton" (:mod:`.triton_fft`) |
| ``triton_direct`` / ``triton_direct_backward`` | the fused Triton kernels' (out, res, den', r', mx), :mod:`.triton_direct` |

Op arguments are tensors and plain values only (grid as ``int[]``, options as bool/float/str); the
:class:`~lisa_kernels._validate.Problem` each implementation needs is rebuilt from them.

Where Triton compiles (not its interpreter), ``triton_direct`` and ``triton_direct_backward`` are
``torch.library.triton_op``s: torch.export keeps them as ops, while torch.compile and AOTInductor trace into them
and compile (and package) their kernels (docs/deploy.md).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import direct as _direct
from ._problem import Problem
from .cuda_fft import ExtensionPasses
from .direct import (dense_backward, dense_backward_from, dense_forward, dense_forward_saving, dense_index,
                     dense_table_size, direct_core_backward, direct_core_forward)
from .direct import direct_cpu_built, direct_cpu_reason, direct_dense_first  # noqa: F401  (they were here)
from .fft import TorchPasses, fft_core_backward, fft_core_forward
from . import triton_direct as triton_direct_module
from .triton_direct import lisa_direct_bwd, lisa_direct_fwd, saved_table_shape
from .triton_fft import triton_fft_backward, triton_fft_forward

__all__ = ["direct_core", "direct_dense_first", "direct_dense_attention", "direct_cpu_reason",
           "direct_cpu_attention",
           "fft_core", "cuda_fft_core", "triton_fft_core", "triton_direct_attention"]


def _core_problem(fq: Tensor, v: Tensor, M: int, grid, causal: bool) -> Problem:
    """The Problem of a grid-to-grid core call (no extra tokens: compose handles those)."""
    B, H, ng, Dk = fq.shape
    return Problem(B=B, H=H, N=ng, Dk=Dk, Dv=v.shape[-1], M=M, grid=tuple(grid), num_extra=0, feature_map="elu1",
                   normalize=True, eps=0.0, boundary="zero", causal=causal, scale=1.0, dtype=fq.dtype,
                   device=fq.device)


def _contiguous(tensors):
    """Ops return fresh contiguous tensors: what their fake implementations promise, and never views of one
    another (torch.library forbids outputs that alias each other or the inputs)."""
    return tuple(t.clone(memory_format=torch.contiguous_format) if t._base is not None or not t.is_contiguous()
                 else t for t in tensors)


_CPU = torch.device("cpu")            # (comparing devices costs a tenth of reading device.type)


def _like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


# ---------------------------------------------------------------- direct path

@torch.library.custom_op("lisa_kernels::direct_core", mutates_args=())
def _direct_core(fq: Tensor, fk: Tensor, v: Tensor, logtab: Tensor, grid: List[int], causal: bool
                 ) -> Tuple[Tensor, Tensor]:
    return _contiguous(direct_core_forward(fq, fk, v, logtab, _core_problem(fq, v, logtab.shape[1], grid, causal)))


@_direct_core.register_fake
def _(fq, fk, v, logtab, grid, causal):
    B, H, ng, _ = fq.shape
    return fq.new_empty(B, H, ng, v.shape[-1]), fq.new_empty(B, H, ng, logtab.shape[1])


@torch.library.custom_op("lisa_kernels::direct_core_backward", mutates_args=())
def _direct_core_backward(fq: Tensor, fk: Tensor, v: Tensor, logtab: Tensor, gnum: Tensor, gden: Tensor,
                          grid: List[int], causal: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    p = _core_problem(fq, v, logtab.shape[1], grid, causal)
    return _contiguous(direct_core_backward(fq, fk, v, logtab, gnum, gden, p))


@_direct_core_backward.register_fake
def _(fq, fk, v, logtab, gnum, gden, grid, causal):
    return _like(fq), _like(fk), _like(v), _like(logtab)


def _direct_setup(ctx, inputs, output):
    fq, fk, v, logtab, grid, causal = inputs
    ctx.save_for_backward(fq, fk, v, logtab)
    ctx.grid, ctx.causal = grid, causal


def _direct_backward(ctx, gnum, gden):
    fq, fk, v, logtab = ctx.saved_tensors
    grads = _direct_core_backward(fq, fk, v, logtab, gnum, gden, ctx.grid, ctx.causal)
    return (*grads, None, None)


_direct_core.register_autograd(_direct_backward, setup_context=_direct_setup)


# ---------------------------------------------------------------- direct path, dense single-block form

@torch.library.custom_op("lisa_kernels::direct_dense", mutates_args=())
def _direct_dense(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], grid: List[int],
                  num_extra: int, feature_map: str, normalize: bool, eps: float, boundary: str, causal: bool,
                  scale: float) -> Tensor:
    return dense_forward(q, k, v, rpe, rpe_extra, tuple(grid), num_extra, feature_map, normalize, eps, boundary,
                         causal, scale)


@_direct_dense.register_fake
def _(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[-1])


@torch.library.custom_op("lisa_kernels::direct_dense_backward", mutates_args=())
def _direct_dense_backward(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor],
                           grad_out: Tensor, grid: List[int], num_extra: int, feature_map: str, normalize: bool,
                           eps: float, boundary: str, causal: bool, scale: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return dense_backward(q, k, v, rpe, rpe_extra, grad_out, tuple(grid), num_extra, feature_map, normalize, eps,
                          boundary, causal, scale)


@_direct_dense_backward.register_fake
def _(q, k, v, rpe, rpe_extra, grad_out, grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    size = dense_table_size(rpe.shape[2:], num_extra, causal)
    return _like(q), _like(k), _like(v), rpe.new_empty(rpe.shape[0], rpe.shape[1], size, dtype=ct)


def _dense_setup(ctx, inputs, output):
    q, k, v, rpe, rpe_extra = inputs[:5]
    ctx.save_for_backward(q, k, v, rpe, rpe_extra)
    ctx.options = inputs[5:]


def _dense_backward_rule(ctx, grad_out):
    q, k, v, rpe, rpe_extra = ctx.saved_tensors
    dq, dk, dv, dtable = _direct_dense_backward(q, k, v, rpe, rpe_extra, grad_out, *ctx.options)
    drpe, dextra = _table_grads(dtable, rpe.shape, rpe.dtype, None if rpe_extra is None else rpe_extra.dtype)
    return (dq, dk, dv, drpe, dextra) + (None,) * len(ctx.options)


_direct_dense.register_autograd(_dense_backward_rule, setup_context=_dense_setup)


def _table_grads(dtable, rpe_shape, rpe_dtype, extra_dtype):
    """d rpe (rpe's shape and dtype) and d rpe_extra (None if there is none) from the dense table's gradient."""
    T = math.prod(rpe_shape[2:])
    drpe = dtable[..., :T].reshape(rpe_shape)
    drpe = drpe if drpe.dtype is rpe_dtype else drpe.to(rpe_dtype)
    dextra = None if extra_dtype is None else dtable[..., T:T + 3].to(extra_dtype)
    return drpe, dextra


class _DenseFunction(torch.autograd.Function):
    """The eager form of the ``direct_dense`` op: the same computation without the dispatcher round trip, and
    the backward reads the forward's tiles (one block's worth) instead of recomputing them."""

    @staticmethod
    def forward(ctx, q, k, v, rpe, rpe_extra, options):
        out, parts = dense_forward_saving(q, k, v, rpe, rpe_extra, *options)
        # all through save_for_backward: freed after a backward without retain_graph, and the normalised
        # output among them may be ``out`` itself (no reference cycle)
        ctx.save_for_backward(*parts)
        ctx.options = options
        ctx.meta = (q.dtype, k.dtype, v.dtype, rpe.shape, rpe.dtype, None if rpe_extra is None else rpe_extra.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qd, kd, vd, rpe_shape, rpe_dtype, extra_dtype = ctx.meta
        options = ctx.options
        dq, dk, dv, dtable = dense_backward_from(ctx.saved_tensors, grad_out, options[2], options[7], (qd, kd, vd))
        drpe, dextra = _table_grads(dtable, rpe_shape, rpe_dtype, extra_dtype)
        return dq, dk, dv, drpe, dextra, None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True where a call may skip the dispatcher: eager mode (not compiling or exporting), no dispatch or
    function mode, no functorch transform, plain tensors. Anywhere else the registered custom op runs."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(t is None or type(t) in _PLAIN for t in tensors))


def direct_dense_attention(q, k, v, rpe, rpe_extra, p: Problem) -> Tensor:
    """``backend="direct"`` on a small problem: the ``direct_dense`` op, forward and backward (:mod:`.direct`).

    In plain eager mode the op's two functions are called through a ``torch.autograd.Function`` instead (the
    dispatcher and the custom op's autograd wrapper cost more than the whole computation on small inputs; on the
    CPU with the extension built, the fused kernel's, :class:`_DirectCPUFunction`), and
    a forward that autograd does not record runs as one call of the compiled extension where it is built
    (``_C.dense_forward``: a loop nest for little work on a CPU, else the same ATen ops in the same order, issued
    from C++); under torch.compile, export, dispatch modes or functorch the custom op itself runs."""
    rx = rpe_extra if p.num_extra else None
    if plain_eager(q, k, v, rpe, rx):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or rpe.requires_grad
                                        or (rx is not None and rx.requires_grad)):
            if _direct._C_DIRECT is not None and p.device == _CPU:       # fused forward and backward: 2x sooner
                return _DirectCPUFunction.apply(q, k, v, rpe, rx, _direct_cpu_args(
                    p.grid, p.num_extra, p.feature_map, p.normalize, p.eps, p.boundary, p.causal, p.scale))
            options = (p.grid, p.num_extra, p.feature_map, p.normalize, p.eps, p.boundary, p.causal, p.scale)
            return _DenseFunction.apply(q, k, v, rpe, rx, options)
        if _direct._C_DENSE_FORWARD is not None:
            index = dense_index(p.grid, p.num_extra, p.boundary, p.causal, q.device)
            return _direct._C_DENSE_FORWARD(q, k, v, rpe, rx, index, p.num_extra, p.feature_map == "elu1",
                                            p.normalize, p.eps, p.causal, p.scale)
        return dense_forward(q, k, v, rpe, rx, p.grid, p.num_extra, p.feature_map, p.normalize, p.eps, p.boundary,
                             p.causal, p.scale)
    return _direct_dense(q, k, v, rpe, rx, list(p.grid), p.num_extra, p.feature_map, p.normalize, p.eps,
                         p.boundary, p.causal, p.scale)


# ---------------------------------------------------------------- direct path, the fused CPU kernel

def _direct_cpu_args(grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    return (list(grid), num_extra, feature_map == "elu1", normalize, eps, boundary == "circular", causal, scale)


@torch.library.custom_op("lisa_kernels::direct_cpu", mutates_args=(), device_types="cpu")
def _direct_cpu(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], grid: List[int],
                num_extra: int, feature_map: str, normalize: bool, eps: float, boundary: str, causal: bool,
                scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, out_c, inv): the output, its float32 copy for float16/bfloat16 inputs (else empty) and the
    normalisers 1 / (den' + eps') (empty if not normalize); see csrc/direct_cpu.h."""
    args = _direct_cpu_args(grid, num_extra, feature_map, normalize, eps, boundary, causal, scale)
    out, out_c, inv = _direct._C_DIRECT.direct_cpu_forward(q, k, v, rpe, rpe_extra, *args, True)
    return out, out_c, inv


@_direct_cpu.register_fake
def _(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    B, H, N, _ = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_c = q.new_empty(B, H, N, v.shape[-1], dtype=ct) if q.dtype != ct else q.new_empty(0, dtype=ct)
    inv = q.new_empty(B, H, N, rpe.shape[1], dtype=ct) if normalize else q.new_empty(0, dtype=ct)
    return q.new_empty(B, H, N, v.shape[-1]), out_c, inv


@torch.library.custom_op("lisa_kernels::direct_cpu_backward", mutates_args=(), device_types="cpu")
def _direct_cpu_backward(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], out: Tensor,
                         out_c: Tensor, inv: Tensor, grad_out: Tensor, grid: List[int], num_extra: int,
                         feature_map: str, normalize: bool, eps: float, boundary: str, causal: bool, scale: float
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, drpe, drpe_extra); drpe_extra is empty when rpe_extra is None."""
    args = _direct_cpu_args(grid, num_extra, feature_map, normalize, eps, boundary, causal, scale)
    grads = _direct._C_DIRECT.direct_cpu_backward(q, k, v, rpe, rpe_extra, out_c if out_c.numel() else out, inv,
                                                  grad_out, *args)
    return tuple(grads)


@_direct_cpu_backward.register_fake
def _(q, k, v, rpe, rpe_extra, out, out_c, inv, grad_out, grid, num_extra, feature_map, normalize, eps, boundary,
      causal, scale):
    return _like(q), _like(k), _like(v), _like(rpe), _like(rpe_extra) if rpe_extra is not None else rpe.new_empty(0)


def _save_inputs_and_outputs(ctx, inputs, output):
    """setup_context of the fused ops (direct_cpu, triton_direct): the five tensors, every output, the options."""
    q, k, v, rpe, rpe_extra = inputs[:5]
    ctx.save_for_backward(q, k, v, rpe, rpe_extra, *output)
    ctx.options = inputs[5:]


def _direct_cpu_backward_rule(ctx, grad_out, _gout_c, _ginv):
    q, k, v, rpe, rpe_extra, out, out_c, inv = ctx.saved_tensors
    dq, dk, dv, drpe, drex = _direct_cpu_backward(q, k, v, rpe, rpe_extra, out, out_c, inv, grad_out, *ctx.options)
    return (dq, dk, dv, drpe, drex if rpe_extra is not None else None) + (None,) * len(ctx.options)


_direct_cpu.register_autograd(_direct_cpu_backward_rule, setup_context=_save_inputs_and_outputs)


class _DirectCPUFunction(torch.autograd.Function):
    """The eager form of the ``direct_cpu`` op: the extension's two calls without the dispatcher round trips."""

    @staticmethod
    def forward(ctx, q, k, v, rpe, rpe_extra, args):
        out, out_c, inv = _direct._C_DIRECT.direct_cpu_forward(q, k, v, rpe, rpe_extra, *args, True)
        ctx.save_for_backward(q, k, v, rpe, rpe_extra, out_c if out_c.numel() else out, inv)
        ctx.args = args
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, rpe, rpe_extra, out, inv = ctx.saved_tensors
        dq, dk, dv, drpe, drex = _direct._C_DIRECT.direct_cpu_backward(q, k, v, rpe, rpe_extra, out, inv, grad_out,
                                                                       *ctx.args)
        return dq, dk, dv, drpe, drex if rpe_extra is not None else None, None


def direct_cpu_attention(q, k, v, rpe, rpe_extra, p: Problem) -> Tensor:
    """``backend="direct"`` on the CPU where the extension is built: the fused kernel, forward and backward.

    In plain eager mode the extension is called directly (through :class:`_DirectCPUFunction` when autograd
    records the call, once without saving anything otherwise); under torch.compile, export, dispatch modes or
    functorch the ``direct_cpu`` custom op runs."""
    rx = rpe_extra if p.num_extra else None
    if plain_eager(q, k, v, rpe, rx):
        args = _direct_cpu_args(p.grid, p.num_extra, p.feature_map, p.normalize, p.eps, p.boundary, p.causal,
                                p.scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or rpe.requires_grad
                                        or (rx is not None and rx.requires_grad)):
            return _DirectCPUFunction.apply(q, k, v, rpe, rx, args)
        return _direct._C_DIRECT.direct_cpu_forward(q, k, v, rpe, rx, *args, False)[0]
    return _direct_cpu(q, k, v, rpe, rx, list(p.grid), p.num_extra, p.feature_map, p.normalize, p.eps, p.boundary,
                       p.causal, p.scale)[0]


# ---------------------------------------------------------------- FFT path (torch, extension or Triton passes)

def _fft_forward(fq, fk, v, logtab, p, circular, passes):
    if passes == "triton":
        return triton_fft_forward(fq, fk, v, logtab, p, circular)
    return fft_core_forward(fq, fk, v, logtab, p, circular, ExtensionPasses if passes == "cuda" else TorchPasses)


def _fft_backward(fq, fk, v, logtab, below, gnum, gden, p, circular, passes):
    if passes == "triton":
        return triton_fft_backward(fq, fk, v, logtab, below, gnum, gden, p, circular)
    return fft_core_backward(fq, fk, v, logtab, below, gnum, gden, p, circular,
                             ExtensionPasses if passes == "cuda" else TorchPasses)


@torch.library.custom_op("lisa_kernels::fft_core", mutates_args=())
def _fft_core(fq: Tensor, fk: Tensor, v: Tensor, logtab: Tensor, grid: List[int], causal: bool, circular: bool,
              passes: str) -> Tuple[Tensor, Tensor, Tensor]:
    p = _core_problem(fq, v, logtab.shape[1], grid, causal)
    return _contiguous(_fft_forward(fq, fk, v, logtab, p, circular, passes))


@_fft_core.register_fake
def _(fq, fk, v, logtab, grid, causal, circular, passes):
    B, H, ng, _ = fq.shape
    M = logtab.shape[1]
    return (fq.new_empty(B, H, ng, v.shape[-1]), fq.new_empty(B, H, ng, M),
            fq.new_empty(B * H, M, ng, dtype=torch.bool))


@torch.library.custom_op("lisa_kernels::fft_core_backward", mutates_args=())
def _fft_core_backward(fq: Tensor, fk: Tensor, v: Tensor, logtab: Tensor, below: Tensor, gnum: Tensor,
                       gden: Tensor, grid: List[int], causal: bool, circular: bool, passes: str
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    p = _core_problem(fq, v, logtab.shape[1], grid, causal)
    return _contiguous(_fft_backward(fq, fk, v, logtab, below, gnum, gden, p, circular, passes))


@_fft_core_backward.register_fake
def _(fq, fk, v, logtab, below, gnum, gden, grid, causal, circular, passes):
    return _like(fq), _like(fk), _like(v), _like(logtab)


def _fft_setup(ctx, inputs, output):
    fq, fk, v, logtab, grid, causal, circular, passes = inputs
    ctx.save_for_backward(fq, fk, v, logtab, output[2])
    ctx.options = (grid, causal, circular, passes)


def _fft_backward_rule(ctx, gnum, gden, _gbelow):
    fq, fk, v, logtab, below = ctx.saved_tensors
    grads = _fft_core_backward(fq, fk, v, logtab, below, gnum, gden, *ctx.options)
    return (*grads, None, None, None, None)


_fft_core.register_autograd(_fft_backward_rule, setup_context=_fft_setup)


# ---------------------------------------------------------------- fused Triton direct kernel

def _triton_problem(q, v, rpe, grid, num_extra, feature_map, normalize, eps, causal, boundary, scale) -> Problem:
    B, H, N, Dk = q.shape
    return Problem(B=B, H=H, N=N, Dk=Dk, Dv=v.shape[-1], M=rpe.shape[1], grid=tuple(grid), num_extra=num_extra,
                   feature_map=feature_map, normalize=normalize, eps=eps, boundary=boundary, causal=causal,
                   scale=scale, dtype=q.dtype, device=q.device)


# Where Triton compiles its kernels, the two ops are ``torch.library.triton_op``s: each launch goes through
# ``wrap_triton`` (triton_direct._run), so torch.compile and AOTInductor trace into them and see (and package)
# the kernels, and the implementation is its own fake. In the interpreter (CI) they are custom ops with the fake
# implementations below: an interpreted kernel cannot be traced.
_COMPILED = triton_direct_module.HAS_TRITON and triton_direct_module.compiled_kernels()
_triton_custom_op = torch.library.triton_op if _COMPILED else torch.library.custom_op


def _fake_unless_traced(op):
    """Registers the decorated fake implementation on ``op`` where it is a custom op (a triton_op's own
    implementation is its fake)."""
    def register(fake):
        return fake if _COMPILED else op.register_fake(fake)
    return register


@_triton_custom_op("lisa_kernels::triton_direct", mutates_args=())
def _triton_direct(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], grid: List[int],
                   num_extra: int, feature_map: str, normalize: bool, eps: float, causal: bool, boundary: str,
                   scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, res, den', r', mx): the output, its rounding residual (empty for fp32), the scaled denominators,
    the extended weight table and its log-max."""
    p = _triton_problem(q, v, rpe, grid, num_extra, feature_map, normalize, eps, causal, boundary, scale)
    return lisa_direct_fwd(q, k, v, rpe, rpe_extra, p)


@_fake_unless_traced(_triton_direct)
def _(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, causal, boundary, scale):
    B, H, N, Dk = q.shape
    M = rpe.shape[1]
    f32 = dict(dtype=torch.float32)
    res = q.new_empty(B, H, N, v.shape[-1]) if q.dtype != torch.float32 else q.new_empty(0)
    return (q.new_empty(B, H, N, v.shape[-1]), res, q.new_empty(B, H, N, M, **f32),
            q.new_empty(saved_table_shape(grid, num_extra, boundary, causal, H, M, Dk), **f32),
            q.new_empty(H * M, **f32))


@_triton_custom_op("lisa_kernels::triton_direct_backward", mutates_args=())
def _triton_direct_backward(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], out: Tensor,
                            res: Tensor, den: Tensor, r: Tensor, mx: Tensor, grad_out: Tensor, grid: List[int], num_extra: int,
                            feature_map: str, normalize: bool, eps: float, causal: bool, boundary: str, scale: float
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, drpe, drpe_extra); drpe_extra is empty when rpe_extra is None."""
    p = _triton_problem(q, v, rpe, grid, num_extra, feature_map, normalize, eps, causal, boundary, scale)
    dq, dk, dv, drpe, drex = lisa_direct_bwd(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p)
    return dq, dk, dv, drpe, drex if drex is not None else rpe.new_empty(0)


@_fake_unless_traced(_triton_direct_backward)
def _(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, grid, num_extra, feature_map, normalize, eps, causal,
      boundary, scale):
    return _like(q), _like(k), _like(v), _like(rpe), _like(rpe_extra) if rpe_extra is not None else rpe.new_empty(0)


def _triton_backward_rule(ctx, grad_out, _gres, _gden, _gr, _gmx):
    q, k, v, rpe, rpe_extra, out, res, den, r, mx = ctx.saved_tensors
    dq, dk, dv, drpe, drex = _triton_direct_backward(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out,
                                                     *ctx.options)
    return (dq, dk, dv, drpe, drex if rpe_extra is not None else None) + (None,) * len(ctx.options)


_triton_direct.register_autograd(_triton_backward_rule, setup_context=_save_inputs_and_outputs)

if _COMPILED:
    # torch.compile's AOTAutograd cache keys a graph by the Triton source of the triton_ops in it, from this registry
    # (torch._library.triton; triton_op fills it from the kernels it finds in the implementation's own text: here
    # some, the launcher calls them). The backward op is not in dynamo's graph: every kernel goes under both.
    for _name in ("lisa_kernels::triton_direct", "lisa_kernels::triton_direct_backward"):
        torch._library.triton.triton_ops_to_kernels[_name] = list(triton_direct_module.KERNELS)


# ---------------------------------------------------------------- the cores that compose() takes

def direct_core(fq, fk, v, logtab, p: Problem, circular: bool = False):
    """Core of ``backend="direct"`` (linear tables only); see :mod:`lisa_kernels._compose`."""
    if circular:
        raise ValueError("the direct core takes linear (2S-1) rpe tables only")
    return _direct_core(fq, fk, v, logtab, list(p.grid), p.causal)


def _fft_core_with(passes: str):
    def core(fq, fk, v, logtab, p: Problem, circular: bool = False):
        num, den, _ = _fft_core(fq, fk, v, logtab, list(p.grid), p.causal, circular, passes)
        return num, den
    core.__name__ = core.__qualname__ = f"fft_core[{passes}]"
    core.__doc__ = f"Core of the FFT path with the {passes!r} passes; see :mod:`lisa_kernels._compose`."
    return core


fft_core = _fft_core_with("torch")            # backend="fft"
cuda_fft_core = _fft_core_with("cuda")        # backend="cuda"
triton_fft_core = _fft_core_with("triton")    # backend="triton-fft"


def triton_direct_attention(q, k, v, rpe, rpe_extra, p: Problem) -> Tensor:
    """``backend="triton"``: the fused kernels, forward and backward, on q, k, v, rpe and rpe_extra."""
    out = _triton_direct(q, k, v, rpe, rpe_extra, list(p.grid), p.num_extra, p.feature_map, p.normalize, p.eps,
                         p.causal, p.boundary, p.scale)[0]
    return out
