"""Shared test setup: nothing may reach the network, and runs are deterministic."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; it
# must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Each test starts seeded and leaves no global state behind for the next one:
    torch's thread counts, environment variables and the determinism / precision flags."""
    torch.manual_seed(0)
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    env = dict(os.environ)
    det = torch.are_deterministic_algorithms_enabled()
    matmul = torch.get_float32_matmul_precision()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    del interop  # can only be set once per process; recorded for the assertion in tests
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    torch.use_deterministic_algorithms(det)
    torch.set_float32_matmul_precision(matmul)


def _triton_interpreter_problem():
    """Why Triton's interpreter cannot run our kernels here, or None.

    Triton's interpreter up to 3.6 turns a runtime loop bound into an int with int() on a
    one-element array, which numpy >= 2.4 refuses (triton issue 9171, fixed by triton PR
    9172 after 3.6): every kernel of the Triton backend loops over runtime bounds, and
    keeping the compiled code as it is leaves no loop form that avoids it. Probed with a
    one-line kernel, not guessed from versions; compiled kernels are unaffected."""
    import importlib.util

    import numpy as np

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or importlib.util.find_spec("triton") is None:
        return None
    if tuple(int(x) for x in np.__version__.split(".")[:2]) < (2, 4):
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n):
        for i in range(0, n, 1):
            tl.store(x_ptr + i, 1.0)

    try:
        _probe[(1,)](torch.zeros(2), 2)
    except Exception as exc:  # InterpreterError(TypeError(...)) where the bug is present
        if "0-dimensional" not in str(exc):
            raise
        return (f"Triton {triton.__version__}'s interpreter cannot run loops over runtime bounds "
                f"with numpy {np.__version__} (triton issue 9171, fixed after triton 3.6; use "
                "numpy < 2.4 with triton <= 3.6 to run these tests on a CPU)")
    return None


_TRITON_PROBLEM = []  # [reason or None] once probed


def _triton_problem_once():
    if not _TRITON_PROBLEM:
        _TRITON_PROBLEM.append(_triton_interpreter_problem())
    return _TRITON_PROBLEM[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test that reaches the Triton interpreter through another path (a benchmark over
    every backend, say) and fails with exactly that bug is reported as skipped for it."""
    outcome = yield
    exc = outcome.excinfo
    if exc is not None and "only 0-dimensional arrays can be converted" in str(exc[1]):
        problem = _triton_problem_once()
        if problem:
            outcome.force_exception(pytest.skip.Exception(problem, _use_item_location=True))


def _runs_triton_interpreter(item) -> bool:
    name = os.path.basename(str(item.fspath))
    return name == "test_triton.py" or (name != "test_triton_compile.py"
                                        and "triton" in item.name.lower())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
    interpreted = [item for item in items if _runs_triton_interpreter(item)]
    problem = _triton_problem_once() if interpreted else None
    if problem:
        for item in interpreted:
            item.add_marker(pytest.mark.skip(reason=problem))
