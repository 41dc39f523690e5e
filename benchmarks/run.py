"""The main job: check that LiSA's fast backends agree with the reference, then run the benchmark sweep.

    python benchmarks/run.py              # correctness check, then the default set (2-4 min on 2 CPU cores)
    python benchmarks/run.py --full       # correctness check, then the full sweep (30-50 min on 2 CPU cores)
    python benchmarks/run.py --quick      # correctness check, then a tiny sweep (about a minute)
    python benchmarks/run.py --check-only # the correctness check alone (a few seconds)

Every argument other than --check-only is passed to ``benchmarks/benchmark.py`` (see its --help). The default
set (``benchmark.DEFAULT_CASES``) is ViT sizes and one large grid where the fft path wins, forward and
forward+backward; it stops starting cases that would end more than ``--budget-seconds`` (270) after this
command started, so that the whole job ends within 5 minutes.

The check runs backends "direct", "fft" and "auto" against backend="reference" in float64 on small random
inputs (1D, 2D and 3D grids, extra tokens with rpe_extra, M = 2 RPE groups, the circular boundary, causal),
comparing the output and the gradients of q, k, v, rpe and rpe_extra. The error of a tensor is
max|x - x_ref| / max|x_ref| (relative to the reference's largest entry, so that entries near zero do not
blow it up). Exit code 1 if any error exceeds 1e-9; the sweep then does not run.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()     # the time budget of the default set counts from here, imports included

import os  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(HERE), HERE) if p not in sys.path]

import torch  # noqa: E402

import benchmark  # noqa: E402
import lisa_kernels  # noqa: E402

TOLERANCE = 1e-9


def float64_cpu_backends():
    """The backends the check compares with the reference: every other one that runs float64 on this CPU, and
    auto."""
    x = torch.zeros(1, 1, 4, 1, dtype=torch.float64)
    p = lisa_kernels.check_inputs(x, x, x, torch.zeros(1, 1, 7, dtype=torch.float64), grid=(4,))
    others = [n for n in lisa_kernels.BACKENDS if n not in ("auto", "reference")]
    return tuple(n for n in others if lisa_kernels.backend_reason(n, p) is None) + ("auto",)


BACKENDS = float64_cpu_backends()

# small problems that cover the operator's options: (name, grid, options)
CHECK_CASES = (
    ("1D grid", (13,), {}),
    ("2D grid", (5, 6), {}),
    ("2D, 1 extra token, M=2", (4, 5), {"num_extra": 1, "M": 2}),
    ("3D grid, 2 extra tokens", (2, 3, 4), {"num_extra": 2}),
    ("2D circular, M=2", (4, 6), {"boundary": "circular", "M": 2}),
    ("1D causal, relu", (11,), {"causal": True, "feature_map": "relu"}),
)


def make_check_inputs(grid, num_extra: int = 0, M: int = 1, boundary: str = "zero", seed: int = 0,
                      B: int = 2, H: int = 2, Dk: int = 5, Dv: int = 6) -> Dict[str, Optional[torch.Tensor]]:
    """Random float64 inputs that require gradients; rpe_extra only where there are extra tokens."""
    gen = torch.Generator().manual_seed(seed)
    N = num_extra + int(torch.tensor(grid).prod())
    table = grid if boundary == "circular" else tuple(2 * s - 1 for s in grid)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_(True)

    return {"q": randn(B, H, N, Dk), "k": randn(B, H, N, Dk), "v": randn(B, H, N, Dv),
            "rpe": randn(H, M, *table, scale=0.5),
            "rpe_extra": randn(H, M, 3, scale=0.5) if num_extra else None}


def forward_and_grads(x: Dict[str, Optional[torch.Tensor]], grid, backend: str, options: Dict) -> Dict:
    """The output and the gradients of every input for a fixed random upstream gradient."""
    out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=grid, rpe_extra=x["rpe_extra"],
                                      backend=backend, **options)
    names = [n for n, t in x.items() if t is not None]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [x[n] for n in names], upstream)
    return {"out": out.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def check_case(name: str, grid, options: Dict) -> List[float]:
    """Print each backend's largest error against the reference on one problem; return those errors."""
    options = dict(options)
    make = {k: options.pop(k) for k in ("num_extra", "M", "boundary") if k in options}
    x = make_check_inputs(grid, **make)
    options.update({k: v for k, v in make.items() if k in ("num_extra", "boundary")})
    ref = forward_and_grads(x, grid, "reference", options)
    errors = []
    for backend in BACKENDS:
        got = forward_and_grads(x, grid, backend, options)
        errs = {k: relative_error(got[k], ref[k]) for k in ref}
        worst = max(errs, key=errs.get)
        errors.append(errs[worst])
        flag = "ok" if errs[worst] <= TOLERANCE else "FAIL"
        print(f"  {name:<26} {backend:<7} max rel. error {errs[worst]:.2e} (in {worst:<10}) {flag}")
    return errors


def correctness_check() -> bool:
    """Run every check case; True if all errors are within TOLERANCE."""
    print(f"Correctness: backends {', '.join(BACKENDS)} vs reference, float64, output and gradients "
          f"(tolerance {TOLERANCE:g})")
    t0 = time.perf_counter()
    errors = [e for name, grid, options in CHECK_CASES for e in check_case(name, grid, options)]
    ok = max(errors) <= TOLERANCE
    print(f"Correctness: {'passed' if ok else 'FAILED'} (largest error {max(errors):.2e}; "
          f"{time.perf_counter() - t0:.1f} s)\n", flush=True)
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("--check-only: the correctness check alone. The other options are benchmarks/benchmark.py's:\n")
        return benchmark.main(["--help"])
    check_only = "--check-only" in argv
    argv = [a for a in argv if a != "--check-only"]
    if not correctness_check():
        return 1
    if check_only:
        return 0
    return benchmark.main(argv, started=STARTED)


if __name__ == "__main__":
    sys.exit(main())
