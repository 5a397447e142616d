// REFINER_CPU_PORTABLE=1: the CPU runs the code of the CUDA backend (its tile-math stages, and
// the ATen expressions of refine_train and the head mixes) instead of its own fast kernels, so
// the CPU tests cover that code too. Read at every call (tests switch it per test).
#pragma once

#include <ATen/ATen.h>

namespace refiner {
namespace cpu {
bool portable_path();  // ops_cpu.cpp
}  // namespace cpu

// Whether x gets the CPU's own kernels; otherwise (CUDA, or the portable CPU path) the ATen
// expressions the CUDA backend runs.
inline bool cpu_kernels(const at::Tensor& x) { return x.is_cpu() && !cpu::portable_path(); }

}  // namespace refiner
