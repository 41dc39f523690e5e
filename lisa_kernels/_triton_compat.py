"""Differences between the Triton versions this package supports (3.6 to 3.8) that its code must bridge.

Only one so far, and only in Triton's CPU interpreter (``TRITON_INTERPRET=1``): the interpreter holds every
scalar (a kernel argument, ``tl.program_id``, a value computed from them) as a one-element NumPy array, and a
``range`` bound that is such a scalar is turned into a Python int by the tensor's ``__index__``. Triton 3.8 does
``int(data.squeeze())``; Triton 3.6 does ``int(data)``, which NumPy 2.4 refuses for an array of one dimension
("only 0-dimensional arrays can be converted to Python scalars"; NumPy 1.25 to 2.3 only warned). So on Triton
3.6 with NumPy >= 2.4, every kernel whose loop bound is a runtime value (``for start_n in range(0, hi, BLOCK_N)``
with ``hi`` from ``N`` or the program id) fails under the interpreter. Compiled kernels (a GPU) are unaffected.

:func:`patch_interpreter` wraps the interpreter's per-launch tensor patching so that ``__index__`` reads the
one element the way 3.8 does. It changes nothing on Triton 3.7 and later, where the interpreter is not in use,
or where its internals are not the ones described here.
"""
from __future__ import annotations

import os

_PATCHED = False


def _index(self):
    return int(self.handle.data.reshape(()))


def patch_interpreter() -> bool:
    """Make Triton 3.6's interpreter accept runtime loop bounds under NumPy >= 2.4 (see the module docstring).

    Returns True if the interpreter was patched (now or before)."""
    global _PATCHED
    if _PATCHED:
        return True
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
        return False           # 3.7 and later squeeze the element themselves
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return False

    def patch_tensor_with_index(tensor, scope, *args, **kwargs):
        patch_tensor(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _index)     # restored with the rest when the launch ends

    interpreter._patch_lang_tensor = patch_tensor_with_index
    _PATCHED = True
    return True
