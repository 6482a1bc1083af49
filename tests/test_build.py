"""Build system: the CMake build of the extension works, and installs never pull torch."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_is_not_a_build_requirement():
    # A build requirement on torch would make pip install a second torch in isolation.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    assert not any(r.lower().startswith("torch") for r in requires), requires


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_an_extension_that_runs(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    libs = [p for p in os.listdir(build) if p.startswith("_C") and p.endswith(".so")]
    assert len(libs) == 1, os.listdir(build)
    # Load it in a fresh process instead of ddspo_fast._C and compare with the reference.
    script = textwrap.dedent(f"""
        import torch, ddspo_fast.loss._ops, ddspo_fast.loss.eager as ref
        torch.ops.load_library({str(build / libs[0])!r})
        m = torch.randn(4, 300, dtype=torch.bfloat16)
        tw, tl, rw, rl = (torch.randn(2, 300, dtype=torch.bfloat16) for _ in range(4))
        loss = torch.ops.ddspo_fast.cpu_fwd(m, tw, tl, rw, rl, None, 1000.0)[0]
        expect = ref.loss_rows(m, tw, tl, rw, rl, None, 1000.0).loss
        assert abs(loss.item() - expect.item()) <= 1e-4 * max(1.0, abs(expect.item())), (loss, expect)
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, env=env, cwd=str(tmp_path))
    assert out.stdout.strip().endswith("ok")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_when_torch_finds_python_first(tmp_path):
    """A CUDA torch's cmake calls find_package(Python COMPONENTS Interpreter); pybind11 then
    uses FindPython's results and needs python_add_library (Development.Module). Played
    here by running that call right after project(), as a CUDA torch would before us."""
    inject = tmp_path / "torch_cuda_like.cmake"
    inject.write_text("find_package(Python COMPONENTS Interpreter)\n")
    res = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"),
                          f"-DPython_EXECUTABLE={sys.executable}",
                          f"-DCMAKE_PROJECT_INCLUDE={inject}"], capture_output=True, text=True)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


# ------------------------------------------------------------------ GPU targets of a build

from ddspo_fast.loss import cuda_arch  # noqa: E402


def test_default_arch_list_has_ptx_for_the_newest_arch(monkeypatch):
    """setup.py's default builds machine code for sm_80 and sm_90 and PTX of the newest,
    so a GPU newer than Hopper still gets a kernel (JIT-compiled by the driver)."""
    import ast
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    default = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_LIST" for t in n.targets))
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    built = cuda_arch.archs_from_gencode(_get_cuda_arch_flags())
    assert built == ["sm_80", "sm_90", "compute_90"]
    built = ",".join(built)       # as the extension reports it (ddspo_fast::cuda_archs)
    for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert cuda_arch.unsupported_reason(cap, built) is None, cap
    reason = cuda_arch.unsupported_reason((7, 5), built)
    assert "7.5" in reason and "sm_80, sm_90, compute_90" in reason
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in reason


@pytest.mark.parametrize("cap,built,runs", [
    ((8, 6), "sm_80", True),            # same major, newer minor: binary compatible
    ((8, 0), "sm_86", False),           # older minor
    ((9, 0), "sm_80", False),           # machine code never crosses a major version
    ((10, 0), "sm_80,sm_90", False),    # Blackwell without PTX: the default before 9.0+PTX
    ((10, 0), "sm_80,compute_80", True),  # PTX JIT-compiles for any newer GPU
    ((7, 5), "compute_80", False),      # ... but not for an older one
    ((9, 0), "sm_90a", True),           # arch-specific: exactly 9.0
    ((10, 0), "compute_90a", False),
    ((10, 3), "sm_100f", True),         # family: same major, minor >= 0
    ((12, 0), "sm_100f", False),
    ((8, 0), "", True),                 # a build that does not say cannot be checked
    ((8, 0), "Ampere", True),           # nor can an unparsable list; never a false refusal
])
def test_capability_check(cap, built, runs):
    reason = cuda_arch.unsupported_reason(cap, built)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"{cap[0]}.{cap[1]}" in reason


def test_archs_from_gencode_forms():
    assert cuda_arch.archs_from_gencode(
        ["-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_80,code=sm_80",
         "-gencode", "arch=compute_90a,code=[sm_90a,compute_90a]", "-O3"]) == \
        ["sm_80", "sm_90a", "compute_90", "compute_90a"]


def test_device_reason_asks_the_device_and_the_build(monkeypatch):
    """The call dispatch makes: device capability (mocked: no GPU here) against the
    extension's report, cached per device index."""
    import torch
    calls = []

    def capability(index):
        calls.append(index)
        return (10, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(cuda_arch, "built_archs", lambda: "sm_80,sm_90")
    cuda_arch._reason_for.cache_clear()
    try:
        reason = cuda_arch.device_reason(torch.device("cuda", 1))
        assert "10.0" in reason and "sm_80, sm_90" in reason
        assert cuda_arch.device_reason(torch.device("cuda", 1)) == reason
        assert calls == [1]
        monkeypatch.setattr(cuda_arch, "built_archs", lambda: "sm_80,sm_90,compute_90")
        cuda_arch._reason_for.cache_clear()
        assert cuda_arch.device_reason(torch.device("cuda", 1)) is None
    finally:
        cuda_arch._reason_for.cache_clear()
