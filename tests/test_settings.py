"""The Triton switches' resolution (refiner_kernels/settings.py): the environment, then the values
tuned per GPU model (tuned_settings.json), then the built-in defaults; and the kernels' switch
functions following it. No GPU needed: the device name and the table are stand-ins."""
import json
from types import SimpleNamespace

import pytest
import torch

from refiner_kernels import settings
from refiner_kernels import kernels_refine_eval as KE
from refiner_kernels import kernels_refine_train as KT

GPU = torch.device("cuda", 0)  # a device object only: nothing runs on it
TABLE = {"Fake GPU": {"REFINER_TRITON_TRAIN_X2": {"value": "halo", "speedup": 1.4},
                      "REFINER_TRITON_TRAIN_DOT": {"value": "tf32", "speedup": 1.2},
                      "REFINER_TRITON_REFINE_DOT": {"value": "bf16", "speedup": 1.1}}}


@pytest.fixture
def fake_gpu(monkeypatch):
    """The tuned table above, and device 0 named "Fake GPU"; the switches' variables unset."""
    monkeypatch.setattr(settings, "_cached_table", lambda: TABLE)
    monkeypatch.setattr(settings, "_device_name", lambda index: "Fake GPU")
    for name in list(settings.SWITCHES) + ["REFINER_TUNED_SETTINGS"]:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_first_values(fake_gpu):
    """Off the GPU (and with no device) every switch is its built-in default, whatever is tuned."""
    for name, values in settings.SWITCHES.items():
        assert settings.switch(name) == values[0]
        assert settings.switch(name, torch.device("cpu")) == values[0]
    assert KE.forward_variant() == "split"
    cpu_half = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16)
    assert KE.forward_precision(cpu_half) == "tf32"
    assert KT._x2_mode(torch.device("cpu")) == "offsets"


def test_tuned_values_apply_on_their_gpu_model(fake_gpu, monkeypatch):
    assert settings.tuned_for(GPU) == {"REFINER_TRITON_TRAIN_X2": "halo", "REFINER_TRITON_TRAIN_DOT": "tf32",
                                       "REFINER_TRITON_REFINE_DOT": "bf16"}
    assert KT._x2_mode(GPU) == "halo"
    assert KE.forward_variant(GPU) == "split"  # not tuned: the default
    bf16_map = SimpleNamespace(device=GPU, dtype=torch.bfloat16)
    fp32_map = SimpleNamespace(device=GPU, dtype=torch.float32)
    fp16_map = SimpleNamespace(device=GPU, dtype=torch.float16)
    assert KT._dot_precision(fp16_map) == "tf32"  # the default ("auto") gives fp16 maps IEEE dots
    assert KT._dot_precision(fp32_map) == "ieee"  # a tuned "tf32" never reaches fp32 maps
    assert KE.forward_precision(bf16_map) == "bf16" and KE.forward_precision(fp32_map) == "ieee"
    # a GPU model that no round measured
    monkeypatch.setattr(settings, "_device_name", lambda index: "Other GPU")
    assert settings.tuned_for(GPU) == {} and KT._x2_mode(GPU) == "offsets"


def test_environment_wins_and_tuning_can_be_switched_off(fake_gpu, monkeypatch):
    monkeypatch.setenv("REFINER_TRITON_TRAIN_X2", "offsets")  # the tuned value is "halo"
    assert KT._x2_mode(GPU) == "offsets"
    monkeypatch.delenv("REFINER_TRITON_TRAIN_X2")
    assert KT._x2_mode(GPU) == "halo"
    monkeypatch.setenv("REFINER_TUNED_SETTINGS", "0")
    assert KT._x2_mode(GPU) == "offsets" and settings.tuned_for(GPU) == {}
    monkeypatch.setenv("REFINER_TRITON_TRAIN_X2", "fast")
    with pytest.raises(ValueError, match="REFINER_TRITON_TRAIN_X2: expected one of"):
        KT._x2_mode(GPU)


def test_tuned_table_file_checks(tmp_path):
    assert settings.tuned_table(tmp_path / "missing.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        settings.tuned_table(bad)
    # (the last two: a switch and a value that were removed)
    for entries in ({"REFINER_TRITON_TRAIN_X2": {"value": "fast"}}, {"REFINER_NOPE": {"value": "split"}},
                    {"REFINER_TRITON_TRAIN_X2": "halo"}, {"REFINER_TRITON_REFINE_BWD": {"value": "offsets"}},
                    {"REFINER_TRITON_REFINE_FWD": {"value": "padded"}}):
        bad.write_text(json.dumps({"GPU": entries}))
        with pytest.raises(ValueError, match="bad.json: 'GPU' sets"):
            settings.tuned_table(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="expected an object of device names"):
        settings.tuned_table(bad)


def test_the_shipped_table_is_valid_and_packaged():
    """The committed tuned_settings.json reads (every switch and value known) and is package data."""
    assert settings.TUNED_FILE.is_file()
    table = settings.tuned_table()
    assert isinstance(table, dict)
    pyproject = (settings.TUNED_FILE.parents[1] / "pyproject.toml").read_text()
    assert 'refiner_kernels = ["tuned_settings.json"]' in pyproject
