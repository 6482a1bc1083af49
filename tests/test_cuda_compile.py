"""Compile checks for the CUDA sources, runnable on a machine without a GPU.

* every kernels/*.cu compiles with plain nvcc (they include no torch headers) for the
  default GPU targets of setup.py (machine code for sm_80 and sm_90, PTX for newer), with
  exactly the nvcc flags setup.py's build uses;
* the sm_90 machine code (SASS, via cuobjdump) has what the kernels are written for:
  16-byte stores in the backward, and every 16-byte load of a step issued before the
  step's first FMA (forward) or store (backward);
* csrc/cuda_ops.cpp passes a host-compiler syntax check against the installed torch's
  headers and the CUDA toolkit's, so the torch side is checked too before a CUDA build;
* setup.py, run as pip runs it with a torch that says it has CUDA, gives nvcc no -D value
  with a comma (nvcc splits those), falls back to the CPU extension with one warning on
  an unusable toolkit in auto mode and stops with one line under DDSPO_FAST_CUDA=1, and
  its default CUDA build compiles (compile-only, no GPU) through torch's BuildExtension.
Each skips with the reason when the tool it needs is missing.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
NVCC = shutil.which("nvcc")


def _setup_constant(name):
    """A literal assigned at the top of setup.py (read, not imported: importing builds)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _gencode(arch_list, monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    return _get_cuda_arch_flags()


def _nvcc_flags():
    """What torch's BuildExtension hands nvcc for kernels/*.cu, less the -gencode flags:
    its common flags, -fPIC, and setup.py's NVCC_FLAGS; plus host warnings, as errors."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return (list(COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC"]
            + list(_setup_constant("NVCC_FLAGS")) + ["-Xcompiler", "-Wall"])


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton ships one with its CUDA backend
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else None


def _cuda_include():
    for base in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                              NVCC and os.path.dirname(os.path.dirname(os.path.realpath(NVCC))),
                              "/usr/local/cuda")):
        inc = os.path.join(base, "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    return None


def test_there_are_cuda_sources():
    assert CU_SOURCES, "kernels/*.cu is empty"


def test_build_keeps_accurate_math():
    # The per-pair math relies on accurate expf/log1pf (kernels/ddspo_loss.cu, pair_math).
    assert not any("fast_math" in f or "fast-math" in f for f in _setup_constant("NVCC_FLAGS"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", CU_SOURCES, ids=os.path.basename)
def test_nvcc_compiles_default_targets(src, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    gencode = _gencode(_setup_constant("DEFAULT_CUDA_ARCH_LIST"), monkeypatch)
    assert any("code=compute_" in g for g in gencode), gencode  # PTX for newer GPUs
    cmd = [NVCC, *_nvcc_flags(), *gencode, "-c", src, "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]


# ------------------------------------------------------------------------------ SASS

def _sass_functions(sass):
    """{demangled-ish kernel name: [opcode, ...]} from `cuobjdump -sass` output."""
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body)
    return out


@pytest.fixture(scope="module")
def sm90_sass(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not on PATH")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    pytest.importorskip("torch")
    src = os.path.join(ROOT, "kernels", "ddspo_loss.cu")
    cubin = tmp_path_factory.mktemp("sass") / "ddspo_loss.cubin"
    cmd = [NVCC, *_nvcc_flags(), "-arch=sm_90", "-cubin", src, "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    res = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return _sass_functions(res.stdout)


def _kernels(sass, pattern):
    found = {k: v for k, v in sass.items() if re.search(pattern, k)}
    assert found, (pattern, sorted(sass))
    return found


def _wide_loads_before(ops, stop):
    first = next(i for i, op in enumerate(ops) if stop(op))
    return sum(1 for op in ops[:first] if op.startswith("LDG") and ".128" in op)


def test_backward_stores_16_bytes_after_all_loads(sm90_sass):
    # bwd_kernel<T, VEC=true>, one per dtype (Lb1E is a mangled `true`).
    kernels = _kernels(sm90_sass, r"bwd_kernelI.*Lb1EEEv")
    assert len(kernels) == 3
    for name, ops in kernels.items():
        assert ops.count("STG.E.128") == 2, (name, [o for o in ops if o.startswith("STG")])
        # No 32-bit store pieces of a split vector (16-bit dtypes' scalar tail uses U16).
        if "__half" in name or "bfloat16" in name:
            assert "STG.E" not in ops, name
        assert _wide_loads_before(ops, lambda op: op.startswith("STG")) == 4, name


def test_forward_issues_a_steps_loads_before_its_math(sm90_sass):
    # fwd_partials<T, VEC=true, HAS_RW>: 5 row loads (6 with ref_w) before the first FMA.
    kernels = _kernels(sm90_sass, r"fwd_partialsI.*Lb1ELb[01]E")
    assert len(kernels) == 6
    for name, ops in kernels.items():
        wide = sum(1 for op in ops if op.startswith("LDG") and ".128" in op)
        assert wide == (6 if "Lb1ELb1E" in name else 5), name
        assert _wide_loads_before(ops, lambda op: op == "FFMA") == wide, name


# ------------------------------------------------------------------------------ host side

@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_cuda_ops_cpp_syntax(tmp_path):
    pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime_api.h) not found")
    incs = list(include_paths())
    # A CPU build of torch ships c10/cuda headers but not this generated one; an empty
    # stand-in is enough for a syntax check (it only configures DLL export macros).
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in incs):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path))
    # The macros setup.py defines for a CUDA build, the arch list as setup.py spells it.
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DDDSPO_WITH_CUDA=1",
           "-DDDSPO_CUDA_ARCHS=sm_80,sm_90,compute_90",
           *[f"-I{p}" for p in incs], f"-I{sysconfig.get_paths()['include']}",
           f"-I{cuda_inc}", os.path.join(ROOT, "csrc", "cuda_ops.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert res.returncode == 0, "\n".join(errors[:20]) or res.stderr[-4000:]


# ------------------------------------------------- setup.py's own flags, with a CUDA torch

# Runs setup.py as pip would, in a child process whose (CPU) torch is told it has CUDA and
# whose CUDA_HOME is the test's: "capture" prints the extension setup.py asks for;
# "build" runs build_ext with linking switched off (a compile-only CUDA build: the CPU
# torch has no CUDA libraries to link against).
_DRIVER = r'''
import json, os, runpy, sys
import torch
import torch.utils.cpp_extension as ce
torch.version.cuda = os.environ["FAKE_TORCH_CUDA"]
ce.CUDA_HOME = os.environ["CUDA_HOME"]
mode, root = sys.argv[1], sys.argv[2]
os.chdir(root)
if mode == "capture":
    import setuptools
    seen = {}
    setuptools.setup = lambda **kw: seen.update(kw)
    sys.argv = ["setup.py", "build_ext"]
    runpy.run_path("setup.py", run_name="__main__")
    ext = seen["ext_modules"][0]
    print(json.dumps({"macros": ext.define_macros, "args": ext.extra_compile_args,
                      "sources": ext.sources}))
else:
    stub = os.environ.get("STUB_INCLUDE")
    if stub:  # c10/cuda/impl/cuda_cmake_macros.h, which a CPU torch lacks
        paths = ce.include_paths
        ce.include_paths = lambda *a, **k: paths(*a, **k) + [stub]
    import setuptools  # noqa: F401  (its distutils)
    from distutils.unixccompiler import UnixCCompiler
    UnixCCompiler.link = lambda self, *a, **k: None
    sys.argv = ["setup.py", "build_ext", "--build-temp", sys.argv[3], "--build-lib", sys.argv[4]]
    runpy.run_path("setup.py", run_name="__main__")
'''


def _run_setup(tmp_path, mode, cuda_home, *args, env=None, torch_cuda="13.0"):
    import sys
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    e = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "DDSPO_FAST_CUDA",
                                                          "DDSPO_FAST_NO_EXT", "CUDA_PATH")}
    e.update(FAKE_TORCH_CUDA=torch_cuda, CUDA_HOME=str(cuda_home), **(env or {}))
    return subprocess.run([sys.executable, str(driver), mode, *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=1200)


def _fake_toolkit(tmp_path, complete=True):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    if complete:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
    return home


def _defines(flags):
    return [f for f in flags if f.startswith("-D")]


def test_nvcc_gets_no_comma_inside_a_define(tmp_path):
    """BuildExtension passes define_macros to nvcc too, which splits a -D value on commas:
    the arch list (sm_80,sm_90,compute_90) must reach the C++ compiler only."""
    import json
    res = _run_setup(tmp_path, "capture", _fake_toolkit(tmp_path), ROOT,
                     env={"DDSPO_FAST_CUDA": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ext = json.loads(res.stdout.strip().splitlines()[-1])
    assert any(s.endswith(".cu") for s in ext["sources"])
    to_nvcc = [f"-D{n}={v}" for n, v in ext["macros"]] + _defines(ext["args"]["nvcc"])
    assert not [d for d in to_nvcc if "," in d], to_nvcc
    assert "-DDDSPO_CUDA_ARCHS=sm_80,sm_90,compute_90" in ext["args"]["cxx"]


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_unusable_toolkit(tmp_path, mode):
    """A CUDA torch whose CUDA_HOME lacks cuda_runtime.h (torch guessed it from a wrapper
    nvcc): auto builds the CPU extension with one warning saying why and what to set;
    DDSPO_FAST_CUDA=1 stops with one line naming CUDA_HOME."""
    import json
    home = _fake_toolkit(tmp_path, complete=False)
    res = _run_setup(tmp_path, "capture", home, ROOT, env={"DDSPO_FAST_CUDA": mode})
    if mode == "auto":
        assert res.returncode == 0, res.stderr[-4000:]
        ext = json.loads(res.stdout.strip().splitlines()[-1])
        assert not any(s.endswith(".cu") or "cuda_" in s for s in ext["sources"])
        warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("ddspo_fast:")]
        assert len(warnings) == 1, res.stderr
        assert "CPU extension only" in warnings[0] and f"CUDA_HOME={home}" in warnings[0]
        assert "include/cuda_runtime.h" in warnings[0] and "set CUDA_HOME" in warnings[0]
    else:
        assert res.returncode != 0
        # torch may log its own line first (a CUDA torch without a GPU does); ours is one
        # line, the last, and no traceback.
        lines = res.stderr.strip().splitlines()
        ours = [ln for ln in lines if "DDSPO_FAST_CUDA" in ln or "ddspo_fast" in ln]
        assert ours == lines[-1:], res.stderr
        assert ours[0].startswith("DDSPO_FAST_CUDA=1 but") and "CUDA_HOME" in ours[0]
        assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_build_compiles_through_setup_py(tmp_path):
    """The default CUDA build (TORCH_CUDA_ARCH_LIST unset: 8.0;9.0+PTX), compile-only,
    with setup.py's own flag assembly and torch's BuildExtension driving nvcc: the
    kernels and csrc/cuda_ops.cpp compile; no -D value given to nvcc has a comma."""
    cuda_home = os.path.dirname(_cuda_include() or "")
    if not cuda_home:
        pytest.skip("CUDA toolkit headers (cuda_runtime_api.h) not found")
    version = re.search(r"release (\d+\.\d+)", subprocess.run(
        [NVCC, "--version"], capture_output=True, text=True).stdout)
    assert version, "nvcc --version names no release"
    # A copy holding only the CUDA sources: the CPU ones are compiled by every other build.
    src = tmp_path / "src"
    for rel in ["setup.py", "csrc/cuda_ops.cpp", "ddspo_fast/loss/cuda_arch.py",
                *[os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "kernels", "*"))]]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), src / rel)
    stub = tmp_path / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    temp = tmp_path / "temp"
    res = _run_setup(tmp_path, "build", cuda_home, src, temp, tmp_path / "lib",
                     env={"STUB_INCLUDE": str(stub), "MAX_JOBS": "2"},
                     torch_cuda=version.group(1))
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    objects = [os.path.basename(p) for p in glob.glob(str(temp / "**" / "*.o"), recursive=True)]
    assert sorted(objects) == ["cuda_ops.o", "ddspo_loss.o"], objects
    ninja = (temp / "build.ninja").read_text()
    cuda_cflags = next(ln for ln in ninja.splitlines() if ln.startswith("cuda_cflags"))
    assert not [d for d in cuda_cflags.split() if d.startswith("-D") and "," in d], cuda_cflags
    for g in ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
              "arch=compute_90,code=compute_90"):
        assert g in ninja, g
    cxx_lines = [ln for ln in ninja.splitlines() if ln.startswith(("cflags", "post_cflags"))]
    assert any("-DDDSPO_CUDA_ARCHS=sm_80,sm_90,compute_90" in ln for ln in cxx_lines), cxx_lines
