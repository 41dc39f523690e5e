"""Test configuration. Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter, which must be
switched on before triton (and so lisa_kernels) is imported.

Also, for every test:

* the installed lisa_kernels is tested; without an installed one, the checkout's (``pytest tests`` works
  without installing the package);
* torch's global RNG is seeded (tests that need randomness use their own seeded ``torch.Generator``);
* ``lisa_kernels``' settings (``set_config``) are restored after each test;
* uninitialised memory is poisoned: ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided``,
  ``Tensor.new_empty`` and ``Tensor.new_empty_strided`` return NaN-filled tensors for floating and complex
  dtypes, so a backend that forgets to write an element of a buffer it allocated fails its test
  (``tests/test_backends.py::test_poison_reaches_the_backends`` checks that this reaches the package);
* torch runs single-threaded (``torch.set_num_threads(1)``; override with ``LISA_TEST_NUM_THREADS``): the
  shapes here are tiny, and on a busy 2-core machine each tiny multi-threaded FFT waited ~8 ms on thread
  synchronisation (4 us single-threaded), which made the fft-path tests 100x slower;
* hypothesis profiles: ``ci`` (default: derandomized, 25 examples) and ``long`` (500 examples), selected
  with the environment variable ``HYPOTHESIS_PROFILE`` (e.g. ``HYPOTHESIS_PROFILE=long pytest tests``).
"""

import dataclasses
import importlib.util
import os
import random
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ.get("LISA_TEST_NUM_THREADS", "1")))

# The tests run against the installed package (with its compiled extension, where one was built); a checkout
# that was never installed is imported from its root instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("lisa_kernels") is None and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

import lisa_kernels  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # test_hypothesis.py skips itself (with a reason) when hypothesis is missing
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, database=None,
                              print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=500, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_config():
    """Whatever a test sets with lisa_kernels.set_config is undone afterwards."""
    saved = dataclasses.asdict(lisa_kernels.get_config())
    yield
    lisa_kernels.set_config(**saved)


# ------------------------------------------------------------------------------------------------ poisoning

def _poison(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() > 0 \
            and t.device.type != "meta":
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _poisoned_function(fn):
    def wrapper(*args, **kwargs):
        return _poison(fn(*args, **kwargs))
    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "poisoned")
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    return wrapper


def _poisoned_method(fn):
    def wrapper(self, *args, **kwargs):
        return _poison(fn(self, *args, **kwargs))
    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "poisoned")
    return wrapper


POISONED_FUNCTIONS = ("empty", "empty_like", "empty_strided")
POISONED_METHODS = ("new_empty", "new_empty_strided")


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory(monkeypatch):
    for name in POISONED_FUNCTIONS:
        monkeypatch.setattr(torch, name, _poisoned_function(getattr(torch, name)))
    for name in POISONED_METHODS:
        monkeypatch.setattr(torch.Tensor, name, _poisoned_method(getattr(torch.Tensor, name)))
    yield
