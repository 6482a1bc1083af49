#!/usr/bin/env bash
# make test-cpus: the whole suite under each CPU code path torch (and the oneDNN / MKL it
# calls) may take on a user's machine; each must pass. Extra arguments go to pytest.
#   ATEN_CPU_CAPABILITY=default | avx2 | avx512 (the last where the CPU has AVX-512)
#   ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 (the library kernels
#   limited to AVX2 while torch's own take the CPU's best)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
caps="default avx2"
grep -qw avx512f /proc/cpuinfo 2>/dev/null && caps="$caps avx512"
failed=()
run() {  # run LABEL ENV...: the suite with ENV set
    local label=$1; shift
    echo "== $label"
    # a compile cache of its own: code inductor generated for one CPU capability (and its
    # precompiled header) must not be reused under another (seen: at::vec kernels from an
    # AVX-512 run failing to build under ATEN_CPU_CAPABILITY=default)
    local cache
    cache=$(mktemp -d)
    env TORCHINDUCTOR_CACHE_DIR="$cache" "$@" "$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}" \
        || failed+=("$label")
    rm -rf "$cache"
}
ARGS=("$@")
for cap in $caps; do
    run "ATEN_CPU_CAPABILITY=$cap" ATEN_CPU_CAPABILITY="$cap"
done
run "oneDNN/MKL limited to AVX2" ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-cpus: failed under: ${failed[*]}" >&2
    exit 1
fi
echo "test-cpus: passed under: $caps, oneDNN/MKL limited to AVX2"
