"""torch.autograd.gradcheck (float64, finite differences) of q, k, v, rpe and rpe_extra for every CPU path.

The fast paths have hand-written backwards (custom autograd); gradcheck validates them, and the reference,
against finite differences of their own forwards, independently of the comparisons in test_backends.py.
"""

import math

import pytest
import torch

import lisa_kernels
from lisa_test_utils import CPU_FLOAT64, make_inputs

CASES = [
    # grid, E, M, boundary, causal, normalize, feature_map
    ((4,), 1, 2, "zero", False, True, "elu1"),
    ((5,), 2, 1, "zero", True, True, "elu1"),
    ((4,), 1, 2, "circular", True, False, "elu1"),
    ((2, 3), 1, 2, "zero", False, True, "elu1"),
    ((3, 2), 2, 2, "circular", False, True, "relu"),
    ((2, 1, 3), 1, 2, "zero", False, False, "elu1"),
    ((2, 2, 2), 1, 1, "circular", False, True, "elu1"),
]


@pytest.mark.parametrize("backend", ("reference",) + CPU_FLOAT64)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck(case, backend):
    grid, E, M, boundary, causal, normalize, feature_map = case
    x = make_inputs(grid, E=E, M=M, Dk=2, Dv=2 * M if M > 1 else 2, B=1, H=2, boundary=boundary,
                    seed=100 + int(math.prod(grid)))
    names = ("q", "k", "v", "rpe", "rpe_extra")
    assert all(x[n].requires_grad and x[n].dtype == torch.float64 for n in names)

    def fn(q, k, v, rpe, rpe_extra):
        return lisa_kernels.lisa_attention(q, k, v, rpe, rpe_extra=rpe_extra, grid=grid, num_extra=E,
                                           boundary=boundary, causal=causal, normalize=normalize,
                                           feature_map=feature_map, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(x[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_FLOAT64)
def test_gradcheck_without_rpe_extra(backend):
    """rpe_extra=None with extra tokens: gradients of the four tensors only."""
    grid, E = (2, 3), 2
    x = make_inputs(grid, E=E, M=2, Dk=2, Dv=4, B=2, H=1, seed=7, rpe_extra=False)

    def fn(q, k, v, rpe):
        return lisa_kernels.lisa_attention(q, k, v, rpe, grid=grid, num_extra=E, backend=backend)

    assert torch.autograd.gradcheck(fn, (x["q"], x["k"], x["v"], x["rpe"]), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_a_wrong_gradient():
    """The harness can fail: a backward scaled by 1.01 is rejected."""
    grid = (3,)
    x = make_inputs(grid, E=1, M=1, Dk=2, Dv=2, B=1, H=1, seed=8)

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    def fn(q):
        return lisa_kernels.lisa_attention(Scaled.apply(q), x["k"], x["v"], x["rpe"], rpe_extra=x["rpe_extra"],
                                           grid=grid, num_extra=1, backend="direct")

    assert not torch.autograd.gradcheck(fn, (x["q"],), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)
