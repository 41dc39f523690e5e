"""The source distribution carries the whole project, and a fresh environment installs a working package from it.

A user who installs from the sdist (``pip install lisa_kernels-*.tar.gz``) must get the compiled extension's
sources and build files (``csrc/``, ``CMakeLists.txt``) and the docs (``docs/operator.md`` defines the operator).
This test builds the sdist from the checkout, compares its files with ``git ls-files``, installs it into a new
virtual environment (the pure-Python build: CI's compile of the extension is tested elsewhere), and runs the
installed package there, from outside the checkout.
"""

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# must be in the sdist: every tracked file under these, and these files
TRACKED_DIRS = ("csrc", "docs", "lisa_kernels", "tests")
FILES = ("CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "benchmarks/run.py")
PURE_PYTHON = {"LISA_BUILD_EXT": "0"}


def _git_files(*paths):
    try:
        out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in out.splitlines() if f]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    if _git_files("setup.py") is None:
        pytest.skip("not a git checkout (the sdist is compared with git ls-files)")
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **PURE_PYTHON}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lisa_kernels-*.tar.gz")
    return path


def test_sdist_has_sources_build_files_and_docs(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    wanted = set(_git_files(*TRACKED_DIRS)) | set(FILES)
    missing = sorted(f for f in wanted if f not in inside)
    assert not missing, f"tracked files missing from {sdist.name}: {missing}"
    assert "docs/operator.md" in inside and any(n.startswith("csrc/") and n.endswith(".cpp") for n in inside)
    assert not any("__pycache__" in n or n.endswith((".so", ".pyc")) for n in inside)


def test_sdist_installs_into_a_fresh_venv(sdist, tmp_path):
    """pip installs the sdist into a new venv; the package imports from there and computes what the reference
    computes. torch comes from this environment through a .pth file (no second multi-GB torch)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages after the venv's own: the venv's lisa_kernels wins over any installed here
    with open(os.path.join(site, "outer_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                           "--no-build-isolation", str(sdist)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **PURE_PYTHON}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check = textwrap.dedent(f"""
        import os, torch, lisa_kernels
        assert os.path.realpath(lisa_kernels.__file__).startswith(os.path.realpath({str(venv)!r})), lisa_kernels.__file__
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 1 + 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
        rpe = 0.3 * torch.randn(2, 1, 5, 7, generator=g, dtype=torch.float64)
        ref = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(3, 4), num_extra=1, backend="reference")
        for backend in ("direct", "fft", "auto"):
            out = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(3, 4), num_extra=1, backend=backend)
            assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12), backend
        print("ok", lisa_kernels.__version__)
    """)
    run = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]
