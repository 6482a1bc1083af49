"""Build of the compiled extension `ddspo_fast._C` against the torch already installed.

Install with `pip install --no-build-isolation .` (or `-e .`): torch is not a build
requirement, so no second torch is ever pulled in. Switches (environment variables):

  DDSPO_FAST_CUDA=auto|0|1   CUDA kernels: auto builds them when torch has CUDA and the
                             CUDA toolkit torch finds (CUDA_HOME) is usable, else the CPU
                             extension with one warning saying why; 1 requires them and
                             stops with one line naming CUDA_HOME; 0 skips them.
  CUDA_HOME                  the CUDA toolkit (bin/nvcc, include/cuda_runtime.h); torch
                             guesses it from nvcc on PATH, wrongly if that is a wrapper.
  DDSPO_FAST_NO_EXT=1        build no extension at all (pure-Python install; the `torch`
                             and `triton` backends still work).
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0+PTX": machine code for
                             Ampere and Hopper, and PTX that newer GPUs JIT-compile).
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Our nvcc flags; torch's BuildExtension adds its COMMON_NVCC_FLAGS and the -gencode flags.
# No --use_fast_math: the per-pair math keeps accurate expf/log1pf and IEEE division.
# The standard is pinned because kernels/*.cu include no torch headers.
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]
# The commands that compile (pip runs this file also for metadata, which compiles nothing).
_BUILDING = any(a in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop",
                      "install", "bdist_egg") for a in sys.argv[1:])


def _cuda_archs():
    """The GPU code torch will ask nvcc for, as nvcc names ("sm_80", "compute_90", ...),
    recorded in the extension so dispatch can check a device against it."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags  # private, long stable
    except ImportError:
        return []
    spec = importlib.util.spec_from_file_location(
        "ddspo_fast_cuda_arch", os.path.join("ddspo_fast", "loss", "cuda_arch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.archs_from_gencode(_get_cuda_arch_flags())


def _toolkit_of_nvcc_on_path():
    """Where nvcc on PATH says its toolkit is (it may be a wrapper script elsewhere), or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line[len("#$ TOP="):].strip())
    return None


def _toolkit_problem(cuda_home):
    """None when CUDA_HOME is a toolkit torch can build with, else what is wrong with it."""
    if cuda_home is None:
        return "no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH)"
    missing = [f for f in (os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"))
               if not os.path.exists(os.path.join(cuda_home, f))]
    if missing:
        return f"CUDA_HOME={cuda_home} is not a usable CUDA toolkit (no {' or '.join(missing)})"
    return None


def _point_at_toolkit():
    found = _toolkit_of_nvcc_on_path()
    if found and _toolkit_problem(found) is None:
        return f"set CUDA_HOME={found} (the toolkit of nvcc on PATH)"
    return "set CUDA_HOME to the CUDA toolkit's directory (the one holding bin/nvcc and include/cuda_runtime.h)"


def _cuda_wanted(torch_mod, cuda_home) -> bool:
    """Build the CUDA kernels? Exits with one line where DDSPO_FAST_CUDA=1 cannot be met;
    in auto mode a torch with CUDA but an unusable toolkit gives the CPU extension and
    one warning saying why and how to point at the toolkit."""
    mode = os.environ.get("DDSPO_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"DDSPO_FAST_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if not torch_mod.version.cuda:
        if mode == "1":
            sys.exit(f"DDSPO_FAST_CUDA=1 but the installed torch {torch_mod.__version__} has no "
                     "CUDA: install a CUDA build of torch first")
        return False
    problem = _toolkit_problem(cuda_home)
    if problem is None:
        return True
    if mode == "1":
        sys.exit(f"DDSPO_FAST_CUDA=1 but the CUDA kernels cannot be built: {problem}; "
                 f"{_point_at_toolkit()}")
    if not _BUILDING:  # pip also runs this file for metadata: warn once, when it builds
        return False
    print(f"ddspo_fast: building the CPU extension only: torch {torch_mod.__version__} has CUDA "
          f"{torch_mod.version.cuda}, but {problem}. To build the CUDA kernels, "
          f"{_point_at_toolkit()} and reinstall; DDSPO_FAST_CUDA=0 builds the CPU extension "
          "without this warning.", file=sys.stderr)
    return False


def cuda_compile_args(archs):
    """(define_macros, extra cxx args) of a CUDA build recording `archs` (nvcc code names).

    DDSPO_CUDA_ARCHS goes to the C++ compiler only: BuildExtension hands define_macros to
    nvcc as well, and nvcc reads a -D value as a comma-separated list (sm_90 and
    compute_90 would become macros of their own and break the CUDA headers). Only
    csrc/cuda_ops.cpp, a C++ file, reads it."""
    macros = [("DDSPO_WITH_CUDA", "1")]
    cxx = []
    if archs:  # bare tokens, e.g. sm_80,sm_90,compute_90: nothing the shell would eat
        cxx.append("-DDDSPO_CUDA_ARCHS=" + ",".join(archs))
    return macros, cxx


def extensions():
    if os.environ.get("DDSPO_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        print("ddspo_fast: torch is not installed, building without the compiled extension "
              "(install torch first, then `pip install --no-build-isolation .`)", file=sys.stderr)
        return [], {}
    cpu_sources = [s for s in sorted(glob.glob("csrc/*.cpp")) if not os.path.basename(s).startswith("cuda_")]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # C++ standard: whatever this torch asks for
    link = ["-fopenmp"]
    if _cuda_wanted(torch, CUDA_HOME):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources = cpu_sources + sorted(glob.glob("csrc/cuda_*.cpp")) + sorted(glob.glob("kernels/*.cu"))
        macros, cxx_cuda = cuda_compile_args(_cuda_archs())
        ext = CUDAExtension(
            "ddspo_fast._C", sources, include_dirs=[os.path.abspath("kernels")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx + cxx_cuda, "nvcc": list(NVCC_FLAGS)},
            extra_link_args=link)
    else:
        ext = CppExtension("ddspo_fast._C", cpu_sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
