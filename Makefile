# Two entry points (see README): `make demo` and `make test`. Both set up .venv,
# install the pinned dependencies, build the extension, then run. Idempotent:
# each step re-runs only when its inputs change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# CUDA build settings (override on the command line or in the environment).
# TORCH_CUDA_ARCH_LIST is left to setup.py, which picks the visible GPU or "8.0;9.0".
export CUDA_HOME ?= /usr/local/cuda

SOURCES := $(shell find csrc -type f 2>/dev/null) $(wildcard setup.py)

.PHONY: demo test build deps clean bench cmake-build emu-asan cpu-asan triton-aot cuda-ptxas

deps: $(VENV)/.deps
$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES) pyproject.toml
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import refiner.ops as o; print(o.describe_backends())" || true
	touch $@

demo: build
	$(PY) -m refiner.demo

# Test processes (pytest-xdist); tests/conftest.py splits the cores' threads between them.
TEST_WORKERS ?= 2
test: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# The CUDA kernels on the CPU emulator again, built under AddressSanitizer (out-of-bounds accesses).
emu-asan: build
	$(PY) tests/cuda_emu.py --asan

# The CPU backend's C++ kernels built under AddressSanitizer and UBSan, its tests run on that build (~6 min).
cpu-asan: build
	$(PY) tests/cpu_asan.py

# Every Triton kernel compiled for sm_90 without a GPU (Triton's bundled ptxas): the GPU-only
# compile errors the interpreter cannot see (~2 min).
triton-aot: deps
	env -u TRITON_INTERPRET $(PY) -m refiner_kernels._aot_check

# Every CUDA kernel compiled for sm_90 by nvcc (no GPU needed): registers and spills per kernel;
# fails if a tensor-core kernel spills (~2 min).
cuda-ptxas: deps
	$(PY) tests/cuda_ptxas.py --no-spills _tc_kernel

bench: build
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_models.py

# The same extension through CMake (for C++ developers and IDEs); pip's cmake 4.x is
# needed, the system cmake 3.25 cannot compile CUDA as C++20.
cmake-build: deps
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) -DREFINER_OUTPUT_DIR=$(abspath build/cmake/lib)
	$(VENV)/bin/cmake --build build/cmake
	$(PY) -c "import glob, torch; torch.ops.load_library(glob.glob('build/cmake/lib/_C*.so')[0]); \
	  print('CMake-built refiner._C loads; CUDA part:', torch.ops.refiner.has_cuda())"

clean:
	rm -rf build *.egg-info refiner/_C*.so $(VENV)/.built
