"""The Triton backend's algorithm switches, and the values measured fastest per GPU model.

Each switch has a built-in default (the choice its function documents). A GPU round measures the
other values beside it (`benchmarks/gpu_round.sh quick`, rows labelled triton[NAME=VALUE]), and
`benchmarks/decide_settings.py` records a value that was faster and passed its GPU tests in
`tuned_settings.json`, keyed by the device name torch reports. A switch then resolves, in order:
  1. the environment variable NAME, when set (explicit choice; bench_ops' --env-variants);
  2. the value tuned for this GPU model, unless REFINER_TUNED_SETTINGS=0;
  3. the built-in default.
No GPU call at import: the file is read and the device named on first use.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

TUNED_FILE = Path(__file__).with_name("tuned_settings.json")

# name -> the values it takes, the built-in default first
SWITCHES = {
    "REFINER_TRITON_REFINE_FWD": ("split", "tile", "gather"),
    "REFINER_TRITON_REFINE_DOT": ("auto", "bf16"),
    "REFINER_TRITON_TRAIN_X2": ("offsets", "halo", "gather"),
    "REFINER_TRITON_TRAIN_DOT": ("auto", "ieee", "tf32", "tf32x3"),
    "REFINER_TRITON_SOFTMAX_BWD_DOT": ("ieee", "bf16"),
}


def tuned_table(path: Path = TUNED_FILE) -> dict:
    """{device name: {switch: {"value": ..., and the evidence}}} from `path`; {} without the file.
    Refuses (ValueError naming the file) a switch or value that SWITCHES does not know."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected an object of device names, got {type(table).__name__}")
    for device, entries in table.items():
        for name, entry in entries.items():
            value = entry.get("value") if isinstance(entry, dict) else None
            if name not in SWITCHES or value not in SWITCHES[name]:
                raise ValueError(f"{path}: {device!r} sets {name}={value!r}; known switches and values: {SWITCHES}")
    return table


@functools.lru_cache(maxsize=None)
def _cached_table() -> dict:
    return tuned_table()


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuned_for(device) -> dict:
    """{switch: value} tuned for the GPU model of `device` (a CUDA torch.device); {} for other
    devices, for GPU models no round measured, and under REFINER_TUNED_SETTINGS=0."""
    device = None if device is None else torch.device(device)
    if device is None or device.type != "cuda" or os.environ.get("REFINER_TUNED_SETTINGS", "1") == "0":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    entries = _cached_table().get(_device_name(index), {})
    return {name: entry["value"] for name, entry in entries.items()}


def switch(name: str, device=None) -> str:
    """The value of switch `name` for tensors on `device` (see the module docstring for the order);
    an environment value it does not take raises ValueError naming the variable."""
    value = os.environ.get(name)
    if value is None:
        return tuned_for(device).get(name, SWITCHES[name][0])
    if value not in SWITCHES[name]:
        raise ValueError(f"{name}: expected one of {SWITCHES[name]}, got {value!r}")
    return value
