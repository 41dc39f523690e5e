"""LiSAAttention under DistributedDataParallel (2 CPU processes, gloo) matches a single-process run.

Two worker processes (this file run as a script, rank 0 and 1) each train a ``LiSAAttention`` with RPE
tables (``rpe`` for a 4 x 5 grid and ``rpe_extra`` for one extra token, M = 2 groups, both initialised
randomly so the structure matters) on their half of each batch, wrapped in DDP; the parent test trains the
same module on the full batch in one process. With a mean loss, DDP's averaged gradient is the full-batch
gradient, so the first step's gradients and the parameters after a few SGD steps must agree. Everything
is float64, so the only differences are the order of floating-point sums (the all-reduce adds the two
halves, the single run adds over the whole batch): ~1e-16 relative, checked at 1e-9.

The workers talk over 127.0.0.1 only (a free port picked here, GLOO_SOCKET_IFNAME=lo), the process group has
a timeout and the parent kills the workers if they run past ``_TIMEOUT_S``, so a hang fails the test.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:   # when run as a worker script
    sys.path.insert(0, str(_REPO))

from lisa_kernels.nn import LiSAAttention  # noqa: E402

WORLD = 2
BATCH = 4                 # global batch; each rank takes BATCH // WORLD
STEPS = 3
DIM, HEADS, GRID, NUM_EXTRA, NUM_RPE = 16, 2, (4, 5), 1, 2
BACKENDS = ("auto", "fft", "direct")
_TIMEOUT_S = 180          # whole DDP run (both workers, all backends)
_PG_TIMEOUT_S = 60        # a collective that waits longer than this raises in the workers
RTOL, ATOL = 1e-9, 1e-12

dist_available = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = pytest.mark.skipif(not dist_available, reason="torch.distributed with the gloo backend is not available")


def _build(backend: str) -> LiSAAttention:
    torch.manual_seed(0)
    m = LiSAAttention(DIM, num_heads=HEADS, qkv_bias=True, grid=GRID, num_extra=NUM_EXTRA, num_rpe=NUM_RPE,
                      backend=backend).double()
    with torch.no_grad():   # random, not the zero init, so that gradients depend on the RPE structure
        m.rpe.rpe.normal_(0.0, 0.5)
        m.rpe.rpe_extra.normal_(0.0, 0.5)
    return m


def _batches():
    g = torch.Generator().manual_seed(1)
    n = NUM_EXTRA + GRID[0] * GRID[1]
    return [(torch.randn(BATCH, n, DIM, generator=g, dtype=torch.float64),
             torch.randn(BATCH, n, DIM, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def _train(model: torch.nn.Module, module: LiSAAttention, rank: int = 0, world: int = 1):
    """SGD on the rank's share of each batch; returns (first-step grads, final params) of ``module``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    per = BATCH // world
    first_grads = None
    for step, (x, y) in enumerate(_batches()):
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)   # mean: DDP's average of means is the global mean
        loss.backward()
        if step == 0:
            first_grads = {k: p.grad.detach().clone() for k, p in module.named_parameters()}
        opt.step()
    params = {k: p.detach().clone() for k, p in module.named_parameters()}
    return first_grads, params


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=_PG_TIMEOUT_S))
    try:
        results = {}
        for backend in BACKENDS:
            module = _build(backend)
            model = DDP(module)
            results[backend] = _train(model, module, rank, WORLD)
        dist.barrier()
        with open(out, "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(_REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out / f"rank{rank}.pkl")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for rank in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        pytest.fail(f"DDP workers did not finish within {_TIMEOUT_S} s (hung?)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"DDP worker {rank} exited with {p.returncode}:\n{log[-4000:]}"
    results = []
    for rank in range(WORLD):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_matches_single_process(ddp_results, backend):
    module = _build(backend)
    grads, params = _train(module, module)

    # the RPE tables take part: nonzero gradients, and they moved
    for name in ("rpe.rpe", "rpe.rpe_extra"):
        assert grads[name].abs().sum() > 0, f"{name} got a zero gradient"
        assert (params[name] - dict(_build(backend).named_parameters())[name]).abs().max() > 1e-6
    assert grads["rpe.rpe"].count_nonzero() > grads["rpe.rpe"].numel() // 2

    for rank, res in enumerate(ddp_results):
        ddp_grads, ddp_params = res[backend]
        _assert_same(ddp_grads, grads, f"rank {rank} first-step grad")
        _assert_same(ddp_params, params, f"rank {rank} param after {STEPS} steps")


def test_ddp_half_batch_differs(ddp_results):
    """Sanity check that the comparison is sharp: one rank's un-averaged half-batch gradient is not the answer."""
    module = _build("direct")
    x, y = _batches()[0]
    torch.nn.functional.mse_loss(module(x[:BATCH // WORLD]), y[:BATCH // WORLD]).backward()
    ddp_grads = ddp_results[0]["direct"][0]
    assert not torch.allclose(module.rpe.rpe.grad, ddp_grads["rpe.rpe"], rtol=1e-3, atol=0)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
