"""Tensors that say they are on cuda:0 but hold host memory, for the CUDA entry points' argument checks
on a machine without a GPU.

The CUDA ops validate every argument before their device guard, so a bad call raises its named error
without touching the device; with these tensors the nvcc-compiled entry points run that far here
(a call that got past its checks would fail at the guard with a CUDA driver error instead). Only the
dispatch key and the device are fake: the data is a live host tensor the fake one keeps alive.
"""
from __future__ import annotations

import os

import torch

_SOURCE = r"""
#include <torch/extension.h>

at::Tensor fake_cuda(const at::Tensor& host) {
  TORCH_CHECK(host.device().is_cpu(), "fake_cuda: expected a CPU tensor");
  auto* keep = new at::Tensor(host);  // owned by the storage below
  at::DataPtr data(host.data_ptr(), keep, [](void* t) { delete static_cast<at::Tensor*>(t); },
                   at::Device(at::kCUDA, 0));
  c10::Storage storage(c10::Storage::use_byte_size_t(), host.storage().nbytes(), std::move(data), nullptr, false);
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CUDA),
                                                    host.dtype());
  t.unsafeGetTensorImpl()->set_sizes_and_strides(host.sizes(), host.strides(), host.storage_offset());
  return t;
}
"""

_MODULE = None


def build_dir() -> str:
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "fake_cuda")
    os.makedirs(d, exist_ok=True)
    return d


def fake_cuda(t: torch.Tensor) -> torch.Tensor:
    """t's data as a tensor whose device is cuda:0 (compiles a small extension the first time, ~20 s)."""
    global _MODULE
    if _MODULE is None:
        from torch.utils.cpp_extension import load_inline
        _MODULE = load_inline("refiner_fake_cuda", cpp_sources=_SOURCE, functions=["fake_cuda"],
                              build_directory=build_dir(), verbose=False)
    return _MODULE.fake_cuda(t)
