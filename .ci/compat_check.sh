#!/usr/bin/env bash
# make compat-check: install the project as a user of the GPU machine's stack would, with
# no GPU, and run the suite there. Run it before any GPU run; it is not part of `make test`
# (it downloads several GB: a CUDA build of torch and its CUDA libraries).
#
#   stack      torch 2.11.0 built for CUDA 13.0, triton 3.6.0, transformers 5.17.0,
#              accelerate 1.15.0, Python 3.12 (COMPAT_PYTHON), in $COMPAT_DIR/venv
#   build      a copy of this working tree in $COMPAT_DIR/src, then, with default settings
#              (DDSPO_FAST_CUDA=auto, TORCH_CUDA_ARCH_LIST unset = 8.0;9.0+PTX):
#              1. `pip install --no-build-isolation .` with CUDA_HOME unset: where torch
#                 cannot find the toolkit by itself, the CPU extension and one warning;
#              2. `pip install --no-build-isolation .` with CUDA_HOME pointed at the
#                 toolkit nvcc belongs to: the CUDA kernels for 8.0;9.0+PTX;
#              3. the CMake build (CPU extension) against that CUDA torch;
#   tests      the whole suite (or the pytest arguments given: COMPAT_PYTEST_ARGS).
# Each stage logs to $COMPAT_DIR/<stage>.log; the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMPAT_DIR=${COMPAT_DIR:-$ROOT/build/compat}
pick_python() {  # the GPU machine's Python (3.12) where there is one, else python3
    local c
    for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        "$c" -c "" 2>/dev/null && { echo "$c"; return; }
    done
    echo "compat-check: no Python 3.12 found, using python3 (set COMPAT_PYTHON)" >&2
    echo python3
}
COMPAT_PYTHON=${COMPAT_PYTHON:-$(pick_python)}
COMPAT_PYTEST_ARGS=${COMPAT_PYTEST_ARGS:-}
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0)
VENV=$COMPAT_DIR/venv
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
mkdir -p "$COMPAT_DIR"

stage() {  # stage NAME CMD...: run CMD, log to NAME.log, show the tail on failure
    local name=$1; shift
    echo "== $name"
    local rc=0
    set +e
    (set -e; "$@") > "$COMPAT_DIR/$name.log" 2>&1   # not in a condition: set -e holds inside
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$COMPAT_DIR/$name.log"
        echo "compat-check: stage '$name' failed (log: $COMPAT_DIR/$name.log)" >&2
        exit 1
    fi
}

install_stack() {
    [ -x "$PY" ] || "$COMPAT_PYTHON" -m venv "$VENV"
    "${PIP[@]}" install -q --upgrade pip setuptools wheel pybind11 ninja cmake
    "${PIP[@]}" install "${PINS[@]}"
    printf '%s\n' "${PINS[@]}" > "$COMPAT_DIR/pins.txt"
    # The project's other dependencies, the pins held (no second torch, no newer stack).
    (cd "$ROOT" && DDSPO_FAST_NO_EXT=1 "${PIP[@]}" install --no-build-isolation \
        -c "$COMPAT_DIR/pins.txt" ".[test]")
    "${PIP[@]}" uninstall -y ddspo_fast
    "$PY" - <<'EOF'
import torch, triton, transformers, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| accelerate", accelerate.__version__)
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert torch.version.cuda and torch.version.cuda.startswith("13.0"), (
    f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, not 13.0")
EOF
}

copy_tree() {  # the tracked and untracked-not-ignored files, as a clean clone would have
    rm -rf "$COMPAT_DIR/src"
    mkdir -p "$COMPAT_DIR/src"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' \
        | tar -cf - -T -) | tar -xf - -C "$COMPAT_DIR/src"
}

toolkit_of_nvcc() {  # the toolkit nvcc on PATH belongs to (it may be a wrapper script)
    nvcc -v --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
        | sed -n 's/^#\$ TOP=\(.*\)$/\1/p' | head -n 1 | xargs -r realpath
}

build_without_cuda_home() {
    cd "$COMPAT_DIR/src"
    rm -rf build
    env -u CUDA_HOME -u CUDA_PATH "${PIP[@]}" install -v --no-build-isolation . 2>&1 \
        | tee "$COMPAT_DIR/install-auto.out"
    local warnings
    warnings=$(grep -c "ddspo_fast: building the CPU extension only" "$COMPAT_DIR/install-auto.out" || true)
    echo "fallback warnings: $warnings"
    [ "$warnings" -eq 1 ]
    # The installed package (not the source tree in the current directory) has the CPU kernels.
    (cd "$COMPAT_DIR" && "$PY" -c "import ddspo_fast as d; b = d.available_backends(); print('backends', b); assert 'cpu' in b")
}

build_with_cuda_home() {
    cd "$COMPAT_DIR/src"
    local home
    home=${CUDA_HOME:-$(toolkit_of_nvcc)}
    [ -n "$home" ] && [ -e "$home/include/cuda_runtime.h" ] || {
        echo "no usable CUDA toolkit (nvcc on PATH: $(command -v nvcc || echo none))"; return 1; }
    echo "CUDA_HOME=$home"
    rm -rf build
    CUDA_HOME=$home MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install -v --no-build-isolation .
    # The same build in place, for the suite (ninja reuses the objects just compiled).
    CUDA_HOME=$home MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace
    (cd "$COMPAT_DIR" && "$PY" -c "import ddspo_fast.loss._ext as e; assert e.has_cuda_kernels()")
    "$PY" - <<'EOF'
import torch, ddspo_fast.loss._ext as ext
assert ext.has_cuda_kernels(), "the build has no CUDA kernels"
print("CUDA kernels built for", torch.ops.ddspo_fast.cuda_archs())
assert torch.ops.ddspo_fast.cuda_archs() == "sm_80,sm_90,compute_90"
EOF
}

cmake_build() {
    local home
    home=${CUDA_HOME:-$(toolkit_of_nvcc)}
    rm -rf "$COMPAT_DIR/cmake"
    PATH=$VENV/bin:$PATH CUDA_HOME=$home cmake -S "$COMPAT_DIR/src" -B "$COMPAT_DIR/cmake" \
        -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release
    cmake --build "$COMPAT_DIR/cmake" -j "${MAX_JOBS:-2}"
    local so
    so=$(ls "$COMPAT_DIR"/cmake/_C*.so)
    # It loads into the CUDA torch and computes the loss (the CPU kernels).
    (cd "$COMPAT_DIR" && PYTHONPATH="$COMPAT_DIR/src" "$PY" - "$so" <<'EOF'
import sys, torch
import ddspo_fast.loss._ops, ddspo_fast.loss.eager as ref
torch.ops.load_library(sys.argv[1])
m = torch.randn(4, 300)
tw, tl, rw, rl = (torch.randn(2, 300) for _ in range(4))
loss = torch.ops.ddspo_fast.cpu_fwd(m, tw, tl, rw, rl, None, 1000.0)[0]
want = ref.loss_rows(m, tw, tl, rw, rl, None, 1000.0).loss
assert abs(loss.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item())), (loss, want)
print("CMake-built extension runs:", sys.argv[1])
EOF
    )
}

run_suite() {
    cd "$COMPAT_DIR/src"
    # CUDA_HOME for the CMake test: a CUDA torch's cmake needs the toolkit.
    # shellcheck disable=SC2086
    CUDA_HOME=${CUDA_HOME:-$(toolkit_of_nvcc)} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q -p no:cacheprovider $COMPAT_PYTEST_ARGS
}

# Stages to run: all by default, or those named (COMPAT_STAGES="install copy").
STAGES=${COMPAT_STAGES:-install copy build-auto build-cuda cmake tests}
for s in $STAGES; do
    case $s in
        install) stage install install_stack ;;
        copy) stage copy copy_tree ;;
        build-auto) stage build-auto build_without_cuda_home ;;
        build-cuda) stage build-cuda build_with_cuda_home ;;
        cmake) stage cmake cmake_build ;;
        tests) echo "== tests (log: $COMPAT_DIR/tests.log)"
               set +e; run_suite 2>&1 | tee "$COMPAT_DIR/tests.log"; rc=${PIPESTATUS[0]}; set -e
               [ "$rc" -eq 0 ] || { echo "compat-check: tests failed" >&2; exit "$rc"; } ;;
        *) echo "compat-check: unknown stage '$s'" >&2; exit 2 ;;
    esac
done
echo "compat-check: all stages passed ($STAGES)"
