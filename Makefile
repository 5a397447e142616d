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

.PHONY: demo test build deps clean bench cmake-build emu-asan cpu-asan triton-aot cuda-ptxas old-torch

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

# The Triton, fused-layer, reference and model tests (torch.library registrations, autograd,
# torch.compile, torch.export) under torch 2.13, the oldest release pip offers here: the GPU
# machines run torch 2.11, and releases before 2.14 refuse what 2.14 forgives (a backward returning
# a gradient for an argument the dispatcher dropped as its default failed every Triton training
# step on the H200). The compiled extension, built for the pinned torch, is left out (its tests
# skip). timm's torchvision imports get stand-ins (tests/torchvision_standin: this torch's
# torchvision wheel does not load here); the test of timm's frozen BatchNorm, which needs the real
# one, is deselected (~6 min).
OLD_TORCH_VENV ?= .venv-torch2.13
old-torch:
	test -x $(OLD_TORCH_VENV)/bin/python || $(PYTHON) -m venv $(OLD_TORCH_VENV)
	$(OLD_TORCH_VENV)/bin/python -m pip install -q torch==2.13.0 triton==3.9.0 numpy==2.4.6 pyyaml==6.0.4 \
	  safetensors==0.8.0 tqdm==4.70.1 huggingface_hub==2.4.0 pillow==13.0.0 pytest==9.2.0 pytest-xdist==3.8.0 \
	  hypothesis==6.170.17
	$(OLD_TORCH_VENV)/bin/python -m pip install -q --no-deps timm==1.0.31
	PYTHONPATH=tests/torchvision_standin TRITON_INTERPRET=1 $(OLD_TORCH_VENV)/bin/python -m pytest -q \
	  -n $(TEST_WORKERS) -p no:cacheprovider -k "not test_refine_batchnorm_modes" tests/test_triton_ops.py \
	  tests/test_fused.py tests/test_bad_inputs.py tests/test_reference.py tests/test_models.py \
	  tests/test_extremes.py tests/test_properties.py

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
