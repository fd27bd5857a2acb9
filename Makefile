# pysparse: `make demo` and `make test` work on a fresh clone of a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch 2.13.0 CPU build: on the development machines its wheel lies on disk. Asking for
# the +cpu local version never resolves to PyPI's multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0+cpu
DEPS := numpy tqdm pytest pytest-benchmark hypothesis scikit-learn triton torchao matplotlib \
        ninja setuptools wheel expecttest

.PHONY: setup build test demo bench bench-kernels gpu-check clean

$(VPY):
	$(PY) -m venv --system-site-packages $(VENV)

setup: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_CPU)" || \
	  { echo "setup: no torch installed and $(TORCH_CPU) is not available here; install a CPU torch 2.11-2.14 first" >&2; exit 1; }
	$(VPY) -m pip install -q $(DEPS)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

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

# On a GPU machine (PyTorch, Triton, CUDA, pytest; no network, nothing to install):
# build in place with the system Python and run the GPU tests + benchmark grid.
gpu-check:
	$(PY) setup.py -q build_ext --inplace
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info pysparse/_C*.so
