"""The registry of backends (lisa_kernels.backends.REGISTRY) and the tests every record gets from it alone.

For every record, on the CPU (and on a CUDA GPU where torch sees one):

* its record is well formed, and the names, ``auto``'s candidates, ``available_backends()``, ``explain()``, the
  cost model and docs/backends.md's table all agree with the registry;
* its can-run check answers None or one line;
* forward and every gradient against ``backend="reference"``, in float64 and float32, wherever it can run
  (a skip names its reason); where its ``grad_reason`` says it has no backward (flex on the CPU), the forward,
  and a gradient asked of it raises NotImplementedError with that reason;
* ``torch.compile(fullgraph=True)`` of a call (dynamo and AOTAutograd through its ops) matches eager.

Elsewhere, from the same list: bad inputs are refused before any backend runs, for every name
(tests/test_validation.py); every backend that runs float64 on the CPU gets the whole battery of
tests/test_backends.py, gradcheck (tests/test_gradcheck.py), hypothesis (tests/test_hypothesis.py) and the module
tests (tests/test_nn.py); the cost model's fit and its check take the backends that have constants
(tests/test_cost_model.py, benchmarks/fit_cost_model.py).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import lisa_kernels
from lisa_kernels import _extension, backends, dispatch
from lisa_test_utils import assert_close_to_reference, make_inputs

NAMES = backends.NAMES
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "backends.md")

# one small case with every part of the operator: a 2D grid, an extra token, two RPE groups
GRID, E, M = (3, 4), 1, 2


def _problem(dtype, device):
    x = make_inputs(GRID, E=E, M=M, Dk=4, Dv=4, dtype=dtype, requires_grad=False)
    x = {n: None if t is None else t.to(device) for n, t in x.items()}
    p = lisa_kernels.check_inputs(x["q"], x["k"], x["v"], x["rpe"], grid=GRID, num_extra=E, rpe_extra=x["rpe_extra"])
    return x, p


def _grad_reason(name, dtype, device):
    """Why the backend has no backward for the small problem (None: it has one)."""
    check = backends.BY_NAME[name].grad_reason
    return None if check is None else check(_problem(dtype, device)[1])


def _runs_or_skip(name, dtype, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    _, p = _problem(dtype, device)
    reason = backends.BY_NAME[name].reason(p)
    if reason is not None:
        pytest.skip(f"{name} cannot run {dtype} on {device}: {reason}")


# ---------------------------------------------------------------- the list and everything derived from it

def test_records_are_well_formed():
    assert len(set(NAMES)) == len(NAMES) and "auto" not in NAMES
    for b in backends.REGISTRY:
        assert re.fullmatch(r"[a-z][a-z0-9-]*", b.name), b.name
        assert b.computes and "\n" not in b.computes, b.name
        assert callable(b.reason) and callable(b.run), b.name
        assert b.form in ("dense", "direct", "fft"), b.name
        assert b.gpu_kernels in ("", "triton", "cuda"), b.name
        assert b.auto is None or b.cost is not None, f"{b.name}: auto compares estimates, it needs a cost key"
    ranks = [b.auto for b in backends.REGISTRY if b.auto is not None]
    assert len(set(ranks)) == len(ranks), "auto's tie order must be strict"


def test_everything_takes_the_names_from_the_registry():
    assert lisa_kernels.BACKENDS == ("auto",) + NAMES
    assert set(lisa_kernels.available_backends()) == set(NAMES)
    assert set(dispatch.AUTO_CANDIDATES) == {b.name for b in backends.REGISTRY if b.auto is not None}
    assert list(dispatch._RUNNERS) == list(NAMES)
    x, _ = _problem(torch.float32, "cpu")
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=GRID, num_extra=E, rpe_extra=x["rpe_extra"])
    assert set(expl.estimates) == set(NAMES) and expl.chosen in dispatch.AUTO_CANDIDATES
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        dispatch.backend_reason("flash", _problem(torch.float32, "cpu")[1])


def test_cost_model_entries_match_the_records():
    """Each cost key names an entry of some device class, whose formula (kind) is the record's form."""
    for b in backends.REGISTRY:
        entries = [dispatch.model_backends(c)[b.cost] for c in dispatch.COST_MODEL.values()
                   if isinstance(c, dict) and b.cost in c]
        assert (b.cost is None) == (not entries), b.name
        assert all(e["kind"] == b.form for e in entries), (b.name, entries)


def test_docs_table_has_a_row_per_record():
    """docs/backends.md's table of backends: one row per record, in the registry's order, then auto."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## The backends", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in section.split("\n\n") if block.startswith("| backend |"))
    rows = [re.match(r"\| `([^`]+)` \|", line).group(1) for line in table.splitlines()[2:]]
    assert rows == list(NAMES) + ["auto"]


def test_the_extension_is_loaded_in_one_place():
    assert _extension.HAS_EXTENSION == (_extension.C is not None)
    assert (_extension.provides("fft_cpu_forward") is not None) == (lisa_kernels.fft._C_FFT_CPU is not None)
    assert _extension.provides("no_such_entry") is None
    assert (_extension.extension_reason() is None) == _extension.HAS_EXTENSION


# ---------------------------------------------------------------- what every record gets

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_can_run_check_answers_none_or_one_line(name, dtype, device):
    _, p = _problem(dtype, device)
    reason = backends.BY_NAME[name].reason(p)
    assert reason is None or (isinstance(reason, str) and reason.strip() and "\n" not in reason), reason
    assert lisa_kernels.backend_reason(name, p) == reason


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_reference(name, dtype, device):
    _runs_or_skip(name, dtype, device)
    grad_reason = _grad_reason(name, dtype, device)
    inputs = {n: None if t is None else t.detach().to(device).requires_grad_(grad_reason is None)
              for n, t in make_inputs(GRID, E=E, M=M, Dk=4, Dv=4, dtype=dtype, seed=7).items()}
    assert_close_to_reference(inputs, name, TOL[dtype], grid=GRID, num_extra=E)
    if grad_reason is not None:       # forward only here: the forward runs, a gradient asked of it raises
        leaves = {n: None if t is None else t.requires_grad_() for n, t in inputs.items()}
        out = lisa_kernels.lisa_attention(*(leaves[n] for n in ("q", "k", "v", "rpe")), grid=GRID, num_extra=E,
                                          rpe_extra=leaves["rpe_extra"], backend=name)
        with pytest.raises(NotImplementedError, match=re.escape(grad_reason)):
            out.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_graph_breaks(name, device):
    """torch.compile(fullgraph=True) with AOTAutograd (the aot_eager backend: dynamo traces the checks and the
    backend's ops through their fake implementations) matches eager, forward and gradients."""
    dtype = torch.float32
    _runs_or_skip(name, dtype, device)
    torch._dynamo.reset()
    x = make_inputs(GRID, E=E, M=M, Dk=4, Dv=4, dtype=dtype, seed=8, requires_grad=False)
    x = {n: t.to(device) for n, t in x.items()}

    def attend(q, k, v, rpe, rpe_extra):
        return lisa_kernels.lisa_attention(q, k, v, rpe, grid=GRID, num_extra=E, rpe_extra=rpe_extra, backend=name)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    backward = _grad_reason(name, dtype, device) is None          # (else forward only)
    results = []
    for fn in (compiled, attend):
        leaves = {n: t.clone().requires_grad_(backward) for n, t in x.items()}
        out = fn(**leaves)
        results.append([out] + (list(torch.autograd.grad(out.square().sum(), list(leaves.values())))
                                if backward else []))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
