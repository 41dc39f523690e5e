"""Which ``lisa_kernels`` the benchmark scripts time, the same rule as the tests' (``tests/conftest.py``):

1. the library at ``LISA_BENCH_LIBRARY_ROOT`` where that is set (``compare.py`` sets it to a worktree of a git
   ref, to time two versions with one harness; ``LISA_BENCH_LIBRARY_ROOT=.`` times this checkout as it is);
2. else the installed package, where one is installed (``pip install --no-build-isolation .``): the one a user
   runs, with its compiled extension ``lisa_kernels._C`` (a checkout's own ``lisa_kernels/`` has no ``_C``
   unless it was built in place, so timing it would time the pure-Python paths);
3. else this checkout.

The choice is exported in ``LISA_BENCH_LIBRARY_ROOT``, so that the processes a benchmark starts (the sweep's
per-case workers, whose interpreter may see the current directory first) import the same one.
"""

import importlib.machinery
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_library() -> str:
    """Put the library to time first on ``sys.path``; return the root of the git checkout it comes from (for the
    commit recorded with the results: this checkout's for an installed package)."""
    root = os.environ.get("LISA_BENCH_LIBRARY_ROOT")
    if root:
        root = os.path.abspath(root)
    else:
        cwd = os.getcwd()
        elsewhere = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) not in (REPO_ROOT, cwd)]
        spec = importlib.machinery.PathFinder.find_spec("lisa_kernels", elsewhere)
        root = os.path.dirname(os.path.dirname(spec.origin)) if spec is not None and spec.origin else REPO_ROOT
        os.environ["LISA_BENCH_LIBRARY_ROOT"] = root
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    return root if os.path.exists(os.path.join(root, ".git")) else REPO_ROOT
