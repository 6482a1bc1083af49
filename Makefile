# The two commands of the README; each sets up everything it needs on a fresh machine.
#   make demo   the main job: the toy DDSPO reproduction + a tiny end-to-end run (no downloads)
#   make test   the whole test suite
# The environment is a venv in .venv that sees system packages, so a torch already
# installed is reused; otherwise TORCH_SPEC is installed (on the project machines pip
# finds the CPU wheel of torch 2.13.0 locally, with no CUDA downloads).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: env ext test demo bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11 ninja
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch', torch.__version__)"
	# Dependencies and the editable package only; the extension is built once, below.
	DDSPO_FAST_NO_EXT=1 $(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

env: $(VENV)/.deps ext

# The C++ (and, where torch has CUDA and nvcc exists, CUDA) extension, rebuilt
# incrementally by ninja when a source changes.
ext: $(VENV)/.deps
	@$(PY) setup.py build_ext --inplace > $(VENV)/build.log 2>&1 || { tail -n 60 $(VENV)/build.log; exit 1; }
	$(PY) -c "import ddspo_fast as df; print('backends:', df.available_backends())"

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: env
	$(VENV)/bin/ddspo-fast demo --quick --out demo_out

bench: env
	$(VENV)/bin/ddspo-fast bench loss

clean:
	rm -rf build ddspo_fast/*.so $(VENV)

# Benchmarks beyond `make bench` (the loss kernels):
#   make bench-step   the step ablation ladder on tiny models, CPU (what CI can run)
#   make gpu-check    on an NVIDIA GPU machine, offline: build with CUDA, GPU tests, loss
#                     benchmark and the SD1.5 (+SDXL) step ladder in < 10 min; writes
#                     benchmarks/results/*-<gpu>.json (benchmarks/gpu_check.sh; README "GPU check")
#   make plan-check   the memory planner against published measured peaks, on this CPU
#                     (rewrites benchmarks/results/plan-vs-published.json; fails when a
#                     row leaves its band; README "Plan before you rent")
.PHONY: bench-step gpu-check plan-check

bench-step: env
	$(VENV)/bin/ddspo-fast bench step --tiny --device cpu
	# each row's settings at real size: planned peak memory (an estimate, no GPU)
	$(PY) -m ddspo_fast.plan.ladder benchmarks/results/step-cpu-tiny.json --write

plan-check: env
	$(PY) -m ddspo_fast.plan.published --write benchmarks/results/plan-vs-published.json

gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# Compatibility checks beyond `make test` (not part of it):
#   make test-cpus      the suite under each CPU code path torch may take on some machine:
#                       ATEN_CPU_CAPABILITY=default, avx2, avx512 (where this CPU has it),
#                       then oneDNN and MKL limited to AVX2 (.ci/test_cpus.sh)
#   make compat-check   a venv with the GPU machine's versions (torch 2.11.0 for CUDA 13.0,
#                       triton 3.6.0, transformers 5.17.0, accelerate 1.15.0), the default
#                       build with nvcc, the CMake build, the whole suite; downloads several
#                       GB (.ci/compat_check.sh; README "GPU check")
.PHONY: test-cpus compat-check

test-cpus: env
	PY=$(PY) bash .ci/test_cpus.sh $(PYTEST_ARGS)

compat-check:
	bash .ci/compat_check.sh
