# pysparse: `make demo` and `make test` work on a fresh clone of a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch 2.13.0 CPU build: on the development machines its wheel lies on disk. Asking for
# the +cpu local version never resolves to PyPI's multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0+cpu
DEPS := numpy tqdm pytest pytest-benchmark hypothesis scikit-learn triton torchao matplotlib \
        ninja setuptools wheel expecttest safetensors onnx onnxruntime onnxscript pyyaml \
        fastapi uvicorn httpx
# Torch-Pruning is a benchmark peer; --no-deps so its torch requirement can never pull another torch.
NODEPS := torch-pruning

.PHONY: setup build test demo bench bench-kernels bench-amx benchmarks gpu-check gpu-check-dry gpu-check-aot cross-aarch64 sanitize clean

$(VPY):
	$(PY) -m venv --system-site-packages $(VENV)

# Setup runs again only when the build inputs change (the extension build takes minutes on 2
# cores): `make test` then `make demo` builds once. Python sources need no reinstall (editable).
SETUP_STAMP := $(VENV)/.pysparse-setup
BUILD_INPUTS := $(shell find csrc -type f) setup.py pyproject.toml Makefile

$(SETUP_STAMP): $(VPY) $(BUILD_INPUTS)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_CPU)" || \
	  { echo "setup: no torch installed and $(TORCH_CPU) is not available here; install a CPU torch 2.11-2.14 first" >&2; exit 1; }
	$(VPY) -m pip install -q $(DEPS)
	$(VPY) -m pip install -q --no-deps $(NODEPS)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

setup: $(SETUP_STAMP)

build: $(VPY)
	$(VPY) setup.py -q build_ext --inplace

test: setup
	$(VPY) -m pytest -q tests

demo: setup
	$(VPY) -m pysparse.demo

bench: setup
	$(VPY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds

bench-kernels: setup
	$(VPY) -m pysparse bench kernels --json bench_out/kernels.json --plot bench_out/kernels.png

# Issue 12's one command for an AMX machine: AMX (tile-packed and previous GEMM) vs VNNI over M,
# the crossover and the PYSPARSE_AMX_*_MIN_ROWS to set (elsewhere: what this CPU can run)
bench-amx: setup
	$(VPY) bench/bench_amx.py --json bench_out/amx.json

# Regenerate BENCHMARKS.md: the full kernel grid and a model run (about 5 minutes on 2
# cores; run it on a quiet machine), then the report with docs/bench/NOTES.md first.
BENCH_DIR := docs/bench
benchmarks: setup
	$(VPY) -m pysparse bench kernels --json $(BENCH_DIR)/kernels.json --csv $(BENCH_DIR)/kernels.csv \
	  --plot $(BENCH_DIR)/kernels.png
	$(VPY) -m pysparse bench model --builtin transformer --json $(BENCH_DIR)/model_transformer.json
	$(VPY) -m pysparse bench compact --json $(BENCH_DIR)/compact_resnet50.json
	$(VPY) -m pysparse bench report --json $(BENCH_DIR)/kernels.json --json $(BENCH_DIR)/model_transformer.json \
	  --json $(BENCH_DIR)/compact_resnet50.json \
	  --notes $(BENCH_DIR)/NOTES.md --out BENCHMARKS.md

# On a GPU machine (PyTorch, Triton, CUDA; no network, nothing to install): build in place
# with the system Python, then scripts/gpu_check.py (correctness, timings, compact conv,
# ResNet-50; see its docstring). Made for one 10-minute device command: build + check stop
# within GPU_CHECK_SECONDS (the script's --budget is what the build left), and everything,
# the build log too, lands in $$OUT when it is set (else gpu_check_out/).
GPU_CHECK_SECONDS ?= 540
GPU_CHECK_ARGS ?=
gpu-check:
	@set -o pipefail; out=$${OUT:-gpu_check_out}; mkdir -p $$out; start=$$(date +%s); \
	$(PY) setup.py -q build_ext --inplace 2>&1 | tee $$out/build.log || exit 1; \
	left=$$(( $(GPU_CHECK_SECONDS) - ($$(date +%s) - start) )); \
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py --out $$out --budget $$left $(GPU_CHECK_ARGS)

# The rehearsal, here: the whole script on CPU tensors (Triton interpreter, tiny shapes, a
# fake timer); tests/test_gpu_check_dry.py runs it in `make test`.
gpu-check-dry: setup
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) $(VPY) scripts/gpu_check.py --dry --out $${OUT:-gpu_check_out}

# Every Triton kernel configuration compiled ahead of time for sm_90a, no GPU needed
# (skipped, with the reason, where Triton's CUDA backend or ptxas is missing).
gpu-check-aot: setup
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(VPY) scripts/aot_compile_check.py

# AddressSanitizer + UndefinedBehaviorSanitizer: the extension built instrumented in
# build/sanitize (a copy; the normal build is untouched), the CPU tests run with libasan
# preloaded. Not part of `make test` (the instrumented build takes 10+ minutes on 2 cores).
sanitize: setup
	PY=$(abspath $(VPY)) SANITIZE_JOBS=2 scripts/sanitize.sh

# The build off x86-64: cross-compile the torch-free kernel units (the scalar kernels, CPU
# feature detection, the dispatch policy) for aarch64 with Debian's cross compiler, and
# syntax-check the ATen wrappers against torch's headers, so nothing x86-only is left
# unguarded (csrc/cpu/isa.h PYSPARSE_X86). Installs g++-aarch64-linux-gnu if it is missing.
AARCH64_CXX ?= aarch64-linux-gnu-g++
CROSS_UNITS := csrc/cpu/int8_linear_scalar.cpp csrc/cpu/bsr_linear_scalar.cpp csrc/cpu/compact_conv2d_scalar.cpp csrc/cpu/int8_conv2d_scalar.cpp \
               csrc/cpu/cpu_features.cpp \
               csrc/cpu/dispatch.cpp
CROSS_WRAPPERS := csrc/ops/int8_linear.cpp csrc/ops/bsr_linear.cpp csrc/ops/compact_conv2d.cpp csrc/ops/int8_conv2d.cpp
cross-aarch64:
	@command -v $(AARCH64_CXX) >/dev/null || { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu; }
	@mkdir -p build/aarch64
	for f in $(CROSS_UNITS); do \
	  $(AARCH64_CXX) -std=c++20 -O2 -Wall -Werror -ffp-contract=off -Icsrc -c $$f -o build/aarch64/$$(basename $$f .cpp).o || exit 1; \
	done
	TORCH_INC=$$($(VPY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))"); \
	for f in $(CROSS_WRAPPERS); do \
	  $(AARCH64_CXX) -std=c++20 -fsyntax-only -Icsrc $$TORCH_INC $$f || exit 1; \
	done
	@echo "cross-aarch64: ok"

clean:
	rm -rf build *.egg-info pysparse/_C*.so $(SETUP_STAMP)
