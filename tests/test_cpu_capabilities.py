"""The comparisons most exposed to the CPU's vector code path, re-run under a second one.

torch picks its CPU kernels by the best instruction set the CPU has (AVX-512, AVX2, or
none: ATEN_CPU_CAPABILITY=default), and they round differently: a bound read off one CPU
breaks on another. The whole suite runs under every capability in `make test-cpus`; here,
in the default suite, the cache-vs-live and resume-vs-uninterrupted comparisons and the
C++ kernels' accuracy also run with ATEN_CPU_CAPABILITY=default in a child process, so a
machine with AVX2 or AVX-512 checks two code paths.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPOSED = [
    "tests/test_refcache.py::test_cached_run_equals_live_run[sd15-ddcpp-full-mix]",
    "tests/test_train_resume.py::test_resume_latest_equals_uninterrupted",
    "tests/test_loss.py::test_cpu_matches_reference",
    "tests/test_loss.py::test_cpu_large_rows_split_into_chunks",
]


def test_capability_is_forced_by_the_environment():
    """The child processes below rely on torch honouring ATEN_CPU_CAPABILITY."""
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, ATEN_CPU_CAPABILITY="default"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "DEFAULT", res.stdout


@pytest.mark.slow
def test_exposed_comparisons_hold_without_vector_kernels():
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU runs the default (non-vector) kernels already")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXPOSED],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]
