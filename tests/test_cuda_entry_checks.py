"""The CUDA ops' C++ argument checks, run without a GPU: each CUDA entry point (the nvcc-compiled code,
called straight through torch.ops, no Python check first) raises a RuntimeError naming the bad
argument before it touches the device, the checks only CUDA makes (head size <= 128) included.
The inputs are tests/fake_cuda.py tensors: host memory on a cuda:0 dispatch key, so a call that got
past its checks would fail at its device guard with a CUDA error, not with the expected message.
The cases run in a child process: a crash is reported as one, not as a dead pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from refiner import _compiled as C

pytestmark = pytest.mark.skipif(not (C.AVAILABLE and C.HAS_CUDA),
                                reason="refiner._C has no CUDA part (built with REFINER_CUDA=0 or without nvcc)")


def cases():
    """(name, call, fragment the RuntimeError must contain) for every CUDA op."""
    from fake_cuda import fake_cuda as F
    from test_compiled_ops import _bad_refine_cases, refine_inputs, softmax_inputs, train_inputs

    ops = torch.ops.refiner

    def fake(args):
        return [F(a) if isinstance(a, torch.Tensor) else a for a in args]

    # (bad shapes are made on the CPU: a view of a fake tensor would need the device)
    q, k, v, p = fake(softmax_inputs(1, 2, 5, 3, True, torch.float32, device="cpu"))
    q129 = F(torch.randn(1, 2, 5, 129))
    x = F(torch.randn(1, 2, 5, 5))
    x2, x12 = F(torch.randn(1, 2, 5, 2)), F(torch.randn(1, 1, 5, 5))
    out = [
        ("softmax_block: head size", lambda: ops.softmax_block(q129, q129, q129, None, 0.5),
         "q head size must be <= 128 on CUDA, got 129"),
        ("softmax_block: k", lambda: ops.softmax_block(q, F(torch.randn(1, 2, 4, 3)), v, p, 0.5), "k must have shape"),
        ("softmax_block: device mix", lambda: ops.softmax_block(q, k, v, torch.rand(1, 2, 5, 5), 0.5),
         "prev_attn is on cpu"),
        ("softmax_block: float64", lambda: ops.softmax_block(*fake([torch.randn(1, 2, 5, 3).double()] * 3), None, 0.5),
         "q must be float32, float16 or bfloat16 (float64 on CPU only)"),
        ("softmax_block: scale", lambda: ops.softmax_block(q, k, v, p, -1.0), "scale must be a positive"),
        ("softmax_block_backward: grad_out", lambda: ops.softmax_block_backward(x2, p, q, k, v, p, 0.5),
         "grad_out must have shape"),
        ("attn_dwconv: w", lambda: ops.attn_dwconv(x, F(torch.randn(3, 3, 3))), "attn_dwconv: w must have shape"),
        ("attn_dwconv: even kernel", lambda: ops.attn_dwconv(x, F(torch.randn(2, 4, 4))), "kernel size must be odd"),
        ("attn_dwconv_backward: grad", lambda: ops.attn_dwconv_backward(x12, x, F(torch.randn(2, 3, 3))),
         "attn_dwconv_backward: grad must have shape"),
        ("row_softmax: dtype", lambda: ops.row_softmax(F(torch.ones(3, dtype=torch.int32))), "x must be float32"),
        ("row_softmax_backward: grad", lambda: ops.row_softmax_backward(x2, x),
         "row_softmax_backward: grad must have shape"),
        ("head_mix: w", lambda: ops.head_mix(x, F(torch.randn(3, 3))), "head_mix: w must have shape"),
        ("head_mix_backward: grad", lambda: ops.head_mix_backward(x12, x, F(torch.randn(4, 2))),
         "head_mix_backward: grad must have shape"),
        ("attn_value: v", lambda: ops.attn_value(x, F(torch.randn(1, 2, 4, 3))), "attn_value: v must have shape"),
        ("attn_value: head size", lambda: ops.attn_value(x, F(torch.randn(1, 2, 5, 129))),
         "v head size must be <= 128 on CUDA"),
        ("attn_value_backward: grad", lambda: ops.attn_value_backward(x, x, F(torch.randn(1, 2, 5, 3))),
         "attn_value_backward: grad must have shape"),
    ]
    # refine_eval: the CPU tests' bad inputs (float64 is refused on CUDA before the dtype mix is), head size
    for i, (args, msg) in enumerate(_bad_refine_cases()):
        want = "v must be float32, float16 or bfloat16 (float64 on CPU only)" if msg == "v has dtype" else msg
        out.append((f"refine_eval: case {i}", lambda a=fake(args): ops.refine_eval(*a), want))
    (attn, v4, *w), expand = refine_inputs(1, 2, 5, 4, 3, 3, torch.float32, device="cpu")
    v4_2 = F(v4[..., :2])
    attn, v4, w = F(attn), F(v4), fake(w)
    out += [
        ("refine_eval: head size", lambda: ops.refine_eval(attn, q129, *w, expand), "v head size must be <= 128"),
        ("refine_eval_backward: grad_out", lambda: ops.refine_eval_backward(v4_2, attn, v4, *w, expand),
         "refine_eval_backward: grad_out must have shape"),
        ("refine_eval_backward: w_dw", lambda: ops.refine_eval_backward(v4, attn, v4, *w[:2], F(torch.randn(6, 2, 2)),
                                                                        *w[3:], expand), "kernel size must be odd"),
    ]
    targs, texpand = train_inputs(1, 4, 6, 3, 2, 3, torch.float32, device="cpu")
    v_2 = F(targs[1][..., :2])
    targs = fake(targs)
    stats = fake([torch.zeros(8)] * 4 + [torch.zeros(4)] * 4)  # rH = 8, H = 4
    no_y3, y3_bad = F(torch.zeros(0)), F(torch.zeros(1, 4, 6, 5))  # (attn is (1, 4, 6, 6))
    bad_g3 = targs[:9] + [F(torch.ones(2))] + targs[10:]
    out += [
        ("refine_train: g3", lambda: ops.refine_train(*bad_g3, 1e-5, 0.5, texpand), "g3 must have shape"),
        ("refine_train: eps", lambda: ops.refine_train(*targs, float("nan"), 0.5, texpand), "eps must be"),
        ("refine_train_backward: grad_out", lambda: ops.refine_train_backward(v_2, *targs, *stats, no_y3, 1e-5,
                                                                              0.5, texpand), "grad_out must have shape"),
        ("refine_train_backward: m3",  # (m3 of rH = 8 values instead of H = 4)
         lambda: ops.refine_train_backward(targs[1], *targs, *stats[:4], stats[0], *stats[5:], no_y3, 1e-5, 0.5,
                                           texpand),
         "refine_train_backward: m3 must have shape"),
        ("refine_train_backward: y3", lambda: ops.refine_train_backward(targs[1], *targs, *stats, y3_bad, 1e-5,
                                                                        0.5, texpand),
         "refine_train_backward: y3 must be empty or have attn's shape"),
    ]
    return out


def run_cases():
    """The child: one JSON line per case, [name, outcome, message]."""
    import refiner._compiled  # noqa: F401  (registers the ops)
    for name, call, want in cases():
        try:
            call()
            outcome, msg = "no exception", ""
        except RuntimeError as e:
            outcome, msg = type(e).__name__, str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - reported, and failed, by the parent
            outcome, msg = type(e).__name__, str(e).splitlines()[0] if str(e) else ""
        print(json.dumps([name, outcome, msg, want]), flush=True)


def test_cuda_entry_points_check_arguments_before_the_device():
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_cuda_entry_checks as t; t.run_cases()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(rows) >= 35, r.stdout
    bad = [row for row in rows if row[1] != "RuntimeError" or row[3] not in row[2]]
    assert not bad, "\n".join(f"{name}: {outcome}: {msg!r} (wanted {want!r})" for name, outcome, msg, want in bad)
