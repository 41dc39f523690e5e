"""Shared helpers of the CPU test suite: random LiSA inputs, forward+backward runs, relative errors.

Nothing here calls into lisa_kernels except through its public ``lisa_attention`` and its list of backends
(``lisa_kernels.backends``: the tests that loop over backends take them from there).
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

import lisa_kernels

INPUT_NAMES = ("q", "k", "v", "rpe", "rpe_extra")


def runnable_backends(dtype: torch.dtype, device: str = "cpu") -> Tuple[str, ...]:
    """The backends of the registry but the reference (the yardstick) that can run a small ``dtype`` problem on
    ``device``, in the registry's order: on the CPU in float64, the ones the CPU test files compare with the
    reference."""
    from lisa_kernels.backends import REGISTRY
    x = torch.zeros(1, 1, 4, 2, dtype=dtype, device=device)
    p = lisa_kernels.check_inputs(x, x, x, torch.zeros(1, 1, 7, dtype=dtype, device=device), grid=(4,))
    return tuple(b.name for b in REGISTRY if b.name != "reference" and b.reason(p) is None)


# the exact backends that run float64 on the CPU ("direct", "fft"; plus any new one that does)
CPU_FLOAT64 = runnable_backends(torch.float64)


def triton_test_device() -> str:
    """The device of a Triton test module: "cuda" where torch sees a GPU, else "cpu" through Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); skips the module where neither runs."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before importing triton)",
                    allow_module_level=True)
    return "cpu"


def table_shape(grid: Sequence[int], boundary: str) -> Tuple[int, ...]:
    """Offsets per axis of an RPE table: 2S-1 (zero boundary) or S (circular)."""
    return tuple(s if boundary == "circular" else 2 * s - 1 for s in grid)


def make_inputs(grid: Sequence[int], *, E: int = 0, M: int = 1, Dk: int = 3, Dv: int = 4, B: int = 2,
                H: int = 2, boundary: str = "zero", dtype: torch.dtype = torch.float64, seed: int = 0,
                rpe_extra: Optional[bool] = None, rpe_scale: float = 0.5,
                requires_grad: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """Random q, k, v (B, H, N, D), rpe (H, M, table...) and rpe_extra (H, M, 3) (None when E == 0).

    The tables are ``rpe_scale * randn`` so that the structure (which offset reads which entry) matters.
    """
    gen = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)

    def rnd(*shape, scale=1.0):
        t = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
        return t.requires_grad_(requires_grad)

    out = {"q": rnd(B, H, N, Dk), "k": rnd(B, H, N, Dk), "v": rnd(B, H, N, Dv),
           "rpe": rnd(H, M, *table_shape(grid, boundary), scale=rpe_scale)}
    with_extra = E > 0 if rpe_extra is None else rpe_extra
    out["rpe_extra"] = rnd(H, M, 3, scale=rpe_scale) if with_extra else None
    return out


def cast_inputs(inputs, dtype: torch.dtype, requires_grad: bool = True):
    """Detached copies of the inputs in another dtype (new leaves)."""
    return {n: None if t is None else t.detach().to(dtype).requires_grad_(requires_grad)
            for n, t in inputs.items()}


def grad_inputs(inputs) -> Tuple[str, ...]:
    """Names of the inputs that require a gradient."""
    return tuple(n for n in INPUT_NAMES if inputs.get(n) is not None and inputs[n].requires_grad)


def attend(inputs, backend: str, **options) -> torch.Tensor:
    return lisa_kernels.lisa_attention(inputs["q"], inputs["k"], inputs["v"], inputs["rpe"],
                                       rpe_extra=inputs.get("rpe_extra"), backend=backend, **options)


def forward_backward(inputs, backend: str, grad_out: Optional[torch.Tensor] = None, **options):
    """(out, {name: grad}) for every input that requires grad, with upstream gradient ``grad_out``."""
    out = attend(inputs, backend, **options)
    names = grad_inputs(inputs)
    if not names:
        return out, {}
    if grad_out is None:
        gen = torch.Generator().manual_seed(1234)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out.to(out.dtype))
    return out.detach(), dict(zip(names, grads))


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0, nonfinite_ok: bool = False) -> float:
    """max|a - b| / max|b|, computed in float64.

    ``floor`` (default 0) is a lower bound on the denominator, for gradients that are structurally of the order
    of eps (e.g. of a query whose keys all have phi(k) = 0): their values come from cancellation of O(1)
    terms, so only an absolute error is meaningful. Where b is identically zero the error is max|a|.
    Non-finite values in ``a`` fail, unless ``nonfinite_ok`` (then the error is inf).
    """
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not torch.isfinite(a).all():
        assert nonfinite_ok, "non-finite values in the result under test"
        return math.inf
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def errors(result, expected, floor: float = 0.0, nonfinite_ok: bool = False) -> Dict[str, float]:
    """Relative errors of the output and of every gradient: {"out": e, "q": e, ...}."""
    out, grads = result
    ref_out, ref_grads = expected
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    errs = {"out": rel_err(out, ref_out, floor, nonfinite_ok)}
    errs.update({n: rel_err(grads[n], ref_grads[n], floor, nonfinite_ok) for n in ref_grads})
    return errs


def assert_close_to_reference(inputs, backend: str, tol: float, grad_out=None, floor: float = 0.0,
                              **options) -> Dict[str, float]:
    """Forward and every gradient of ``backend`` within ``tol`` (relative) of backend='reference'."""
    gen = torch.Generator().manual_seed(4321)
    out_shape = inputs["v"].shape
    if grad_out is None:
        grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(inputs["v"].dtype)
    expected = forward_backward(inputs, "reference", grad_out, **options)
    result = forward_backward(inputs, backend, grad_out, **options)
    assert result[0].dtype == inputs["q"].dtype
    errs = errors(result, expected, floor)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"backend={backend!r} {options}: relative errors over {tol:g}: {bad} (all: {errs})"
    return errs


def config_id(c) -> str:
    """A test id naming a random configuration (grid, extra tokens, M, head dims, options; eps where drawn)."""
    g = "x".join(map(str, c["grid"]))
    eps = f"-eps{c['eps']:g}" if "eps" in c else ""
    return (f"g{g}-E{c['E']}{'x' if c['rpe_extra'] else ''}-M{c['M']}-Dk{c['Dk']}-Dv{c['Dv']}-{c['boundary'][:4]}"
            f"{'-causal' if c['causal'] else ''}{'' if c['normalize'] else '-unnorm'}{eps}-{c['feature_map']}"
            f"-s{c['scale']}-B{c['B']}H{c['H']}")
