# pysparse: `make demo` and `make test` work on a fresh clone of a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch 2.13.0 CPU build: on the development machines its wheel lies on disk. Asking for
# the +cpu local version never resolves to PyPI's multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0+cpu
DEPS := numpy tqdm pytest pytest-benchmark hypothesis scikit-learn triton torchao matplotlib \
        ninja setuptools wheel expecttest safetensors onnx onnxruntime onnxscript
# Torch-Pruning is a benchmark peer; --no-deps so its torch requirement can never pull another torch.
NODEPS := torch-pruning

.PHONY: setup build test demo bench bench-kernels benchmarks gpu-check clean

$(VPY):
	$(PY) -m venv --system-site-packages $(VENV)

setup: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_CPU)" || \
	  { echo "setup: no torch installed and $(TORCH_CPU) is not available here; install a CPU torch 2.11-2.14 first" >&2; exit 1; }
	$(VPY) -m pip install -q $(DEPS)
	$(VPY) -m pip install -q --no-deps $(NODEPS)
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

# Regenerate BENCHMARKS.md: the full kernel grid and a model run (about 5 minutes on 2
# cores; run it on a quiet machine), then the report with docs/bench/NOTES.md first.
BENCH_DIR := docs/bench
benchmarks: setup
	$(VPY) -m pysparse bench kernels --json $(BENCH_DIR)/kernels.json --csv $(BENCH_DIR)/kernels.csv \
	  --plot $(BENCH_DIR)/kernels.png
	$(VPY) -m pysparse bench model --builtin transformer --json $(BENCH_DIR)/model_transformer.json
	$(VPY) -m pysparse bench report --json $(BENCH_DIR)/kernels.json --json $(BENCH_DIR)/model_transformer.json \
	  --notes $(BENCH_DIR)/NOTES.md --out BENCHMARKS.md

# On a GPU machine (PyTorch, Triton, CUDA, pytest; no network, nothing to install):
# build in place with the system Python and run the GPU tests + benchmark grid.
gpu-check:
	$(PY) setup.py -q build_ext --inplace
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info pysparse/_C*.so
