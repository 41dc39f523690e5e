"""Which ``lisa_kernels`` the benchmark scripts time, the same rule as the tests' (``tests/conftest.py``):

1. the library at ``LISA_BENCH_LIBRARY_ROOT`` where that is set (``compare.py`` sets it to a worktree of a git
   ref, to time two versions with one harness; ``LISA_BENCH_LIBRARY_ROOT=.`` times this checkout as it is);
2. else the installed package, where one is installed (``pip install --no-build-isolation .``): the one a user
   runs, with its compiled extension ``lisa_kernels._C`` (a checkout's own ``lisa_kernels/`` has no ``_C``
   unless it was built in place, so timing it would time the pure-Python paths);
3. else this checkout.
"""

import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_library() -> str:
    """Put the library to time on ``sys.path``; return the root of the git checkout it comes from (for the
    commit recorded with the results)."""
    root = os.environ.get("LISA_BENCH_LIBRARY_ROOT")
    if root:
        root = os.path.abspath(root)
    elif importlib.util.find_spec("lisa_kernels") is not None:
        return REPO_ROOT
    else:
        root = REPO_ROOT
    if root not in sys.path:
        sys.path.insert(0, root)
    return root
