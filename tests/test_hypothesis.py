"""A hypothesis-driven sweep: random problems, "direct" and "fft" against the reference in float64.

Each example draws a grid (1 to 3 axes of small sizes), the number of extra tokens E, the number of RPE
groups M, Dk, Dv (a multiple of M), the boundary, causal (1D grids only), normalize, the feature map, the
backend, and a seed for the tensors; forward and the gradients of q, k, v, rpe and rpe_extra must match the
reference to a relative error of 1e-9 (relative to max(max|reference|, 1e-3): see FLOOR).

Profiles (registered in tests/conftest.py), chosen with the environment variable HYPOTHESIS_PROFILE:

    pytest tests/test_hypothesis.py                              # "ci": derandomized, 25 examples (default)
    HYPOTHESIS_PROFILE=long pytest tests/test_hypothesis.py      # "long": 500 random examples
"""

import math

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install '.[test]')")
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lisa_test_utils import CPU_FLOAT64, assert_close_to_reference, make_inputs  # noqa: E402


# inputs are O(1); a gradient whose largest entry is below FLOOR is eps-dominated (e.g. every key an extra
# query sees has phi(k) = 0 with "relu"), and is compared in absolute terms: |a - b| <= 1e-9 * FLOOR
FLOOR = 1e-3


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    max_size = {1: 12, 2: 6, 3: 4}[ndim]
    grid = tuple(draw(st.lists(st.integers(1, max_size), min_size=ndim, max_size=ndim)))
    E = draw(st.integers(0, 3))
    if E + math.prod(grid) < 2:
        E = 1   # a lone token: its normalized gradients are round-off, relative errors meaningless
    M = draw(st.sampled_from([1, 2, 3]))
    G = draw(st.integers(1, 3))
    normalize = draw(st.booleans())
    # Dk = 1 with normalize: phi(q_i) cancels between numerator and denominator except against eps, so the
    # q-gradient is pure eps-scale round-off and its relative error meaningless
    Dk = draw(st.integers(2 if normalize else 1, 5))
    return dict(
        grid=grid, E=E, M=M, Dk=Dk, Dv=M * G, normalize=normalize,
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)),
        boundary=draw(st.sampled_from(["zero", "circular"])),
        causal=draw(st.booleans()) if ndim == 1 else False,
        feature_map=draw(st.sampled_from(["elu1", "relu"])),
        rpe_extra=draw(st.booleans()) if E > 0 else False,
        backend=draw(st.sampled_from(CPU_FLOAT64)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(problems())
def test_random_problems_match_reference(problem):
    note(str(problem))
    p = dict(problem)
    inputs = make_inputs(p["grid"], E=p["E"], M=p["M"], Dk=p["Dk"], Dv=p["Dv"], B=p["B"], H=p["H"],
                         boundary=p["boundary"], seed=p["seed"], rpe_extra=p["rpe_extra"])
    assert_close_to_reference(inputs, p["backend"], 1e-9, grid=p["grid"], num_extra=p["E"], boundary=p["boundary"],
                              causal=p["causal"], normalize=p["normalize"], feature_map=p["feature_map"], floor=FLOOR)


@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(problems(), st.integers(64, 4096))
def test_random_problems_with_small_budgets(problem, budget):
    """The same, with workspaces so small that the blocking and chunking loops run many times."""
    import lisa_kernels
    lisa_kernels.set_config(direct_block_bytes=budget, fft_workspace_bytes=budget)
    p = dict(problem)
    inputs = make_inputs(p["grid"], E=p["E"], M=p["M"], Dk=p["Dk"], Dv=p["Dv"], B=p["B"], H=p["H"],
                         boundary=p["boundary"], seed=p["seed"], rpe_extra=p["rpe_extra"])
    assert_close_to_reference(inputs, p["backend"], 1e-9, grid=p["grid"], num_extra=p["E"], boundary=p["boundary"],
                              causal=p["causal"], normalize=p["normalize"], feature_map=p["feature_map"], floor=FLOOR)


def test_profile_is_selected_by_the_environment():
    import os
    expected = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    assert settings.get_current_profile_name() == expected
    if expected == "ci":
        assert settings.default.derandomize and settings.default.max_examples == 25
    if expected == "long":
        assert settings.default.max_examples == 500
