"""Backends to parametrize op tests over: every one usable on this machine, others skipped visibly."""
import pytest
import torch

from refiner import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(include_reference: bool = True):
    status = ops.available_backends(DEVICE)
    names = [b for b in ops.BACKENDS if include_reference or b != "reference"]
    return [pytest.param(b, marks=pytest.mark.skipif(status[b] != "ok", reason=f"{b} backend: {status[b]}"))
            for b in names]
