"""The benchmark scripts run end to end (quick presets, on CPU) and write what they promise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_models, bench_ops, bench_train_passes, common, ncu_kernels, plot, profile_models  # noqa: E402

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (plots)")

META_KEYS = {"script", "device", "device_label", "device_name", "torch", "timm", "triton", "git_commit",
             "timestamp", "backends", "args", "timing", "memory"}


def _check_outputs(doc, out: Path, script: str, pngs):
    meta = doc["meta"]
    assert META_KEYS <= set(meta)
    assert meta["script"] == script and meta["device"] == "cpu" and meta["device_label"] == "CPU"
    assert meta["peaks"] is None
    files = sorted(out.glob(f"{script}_cpu_*.json"))
    assert len(files) == 1
    on_disk = json.loads(files[0].read_text())
    assert on_disk["rows"] and on_disk["meta"]["timestamp"] == meta["timestamp"]
    assert all(r["device"] == "CPU" for r in on_disk["rows"])
    latest = json.loads((out / "latest_cpu.json").read_text())
    assert latest[script]["file"] == files[0].name
    for suffix in pngs:
        png = files[0].with_name(files[0].stem + suffix)
        assert png.exists() and png.stat().st_size > 1000, png
    return on_disk


def _ok_or_recorded(r):
    # The reference rows must succeed; a compiled backend that fails a case is recorded, not fatal.
    if r["backend"] in ("reference", "torch") or r.get("variant", "").startswith(("reference", "timm")):
        assert r["status"] == "ok", r
    else:
        assert r["status"] == "ok" or r["status"].startswith(("error", "OOM")), r
    return r["status"] == "ok"


@needs_mpl
def test_bench_ops_quick(tmp_path):
    doc = bench_ops.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--out", str(tmp_path)])
    rows = _check_outputs(doc, tmp_path, "bench_ops", ["_time_vs_N.png", "_memory_vs_N.png"])["rows"]
    assert doc["targets"] == []  # CPU: no targets
    seen = {(r["op"], r["mode"], r["backend"]) for r in rows}
    for op in bench_ops.OPS:
        for mode in bench_ops.MODES:
            assert (op, mode, "reference") in seen
    assert ("sdpa", "fwd", "torch") in seen and ("sdpa", "fwd+bwd", "torch") in seen
    assert not any(r["backend"] == "triton" for r in rows), "Triton must not be timed on CPU"
    usable, _ = common.usable_backends(torch.device("cpu"))
    assert {r["backend"] for r in rows} == set(usable) | {"torch"}
    for r in rows:
        if not _ok_or_recorded(r):
            continue
        assert r["time_ms"] > 0 and r["tflops"] > 0 and r["gbs"] > 0
        assert r["pct_peak_flops"] is None and r["pct_peak_bw"] is None  # no peaks on CPU
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] > 0
        assert (r["B"], r["H"], r["N"], r["d"], r["dtype"]) == (2, 12, 197, 32, "fp32")
        if r["op"] != "sdpa":
            assert r["vs_sdpa"] > 0
        if r["backend"] == "reference":
            assert r["vs_reference"] == pytest.approx(1.0)
        if r["op"] != "sdpa" and r["mode"] == "fwd+bwd" and r["backend"] != "reference":
            # the gradients against the reference's, fp32: refine_train's through batch statistics
            # (and any ReLU6 gate rounding flips) ~1e-3 at worst; a broken backward is O(1)
            assert r["grad_rel_err"] < 1e-2 and r["max_abs_err"] is None, r
    # Plots regenerate from the merged JSON alone.
    regen = plot.main([str(tmp_path / "latest_cpu.json"), "--out-dir", str(tmp_path / "regen")])
    assert len(regen) == 2 and all(p.exists() for p in regen)


def test_low_precision_gradients_measured_against_fp32(tmp_path):
    """bf16 fwd+bwd rows: every backend's gradients, the reference's too, against the reference's in
    fp32 on the same rounded inputs, one error per gradient. (Against the bf16 reference instead,
    refine_train's db3, 0 in exact arithmetic, read 100% off on an H200.) The fused CPU backend
    accumulates in fp32: its worst gradient must beat the bf16 reference's own."""
    doc = bench_ops.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--modes", "fwd+bwd",
                          "--ops", "refine_train", "--dtypes", "bf16", "--backends", "cpu", "--no-plots",
                          "--no-memory", "--out", str(tmp_path)])
    rows = {r["backend"]: r for r in doc["rows"] if r["op"] == "refine_train"}
    ref, cpu = rows["reference"], rows["cpu"]
    assert len(ref["grad_rel_errs"]) == len(cpu["grad_rel_errs"]) == 13  # map, v and 11 parameters
    assert ref["grad_rel_err"] == max(ref["grad_rel_errs"]) > 0
    assert cpu["grad_rel_err"] < min(0.1, ref["grad_rel_err"]), (cpu["grad_rel_errs"], ref["grad_rel_errs"])


def test_compiled_reference_rows(tmp_path):
    """--compile-backend: the reference ops under torch.compile in their own rows beside the eager
    reference (same inputs, checked against it), never counted for a target. (CPU: the
    aot_eager_decomp_partition backend traces what inductor would, without its C++ compiling.)"""
    doc = bench_ops.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--modes", "fwd", "fwd+bwd",
                          "--ops", "refine_train", "refine_eval", "--backends", "reference", "--no-plots",
                          "--no-memory", "--compile-backend", "aot_eager_decomp_partition", "--out", str(tmp_path)])
    label = "reference compiled[aot_eager_decomp_partition]"
    rows = {(r["op"], r["mode"]): r for r in doc["rows"] if r["backend"] == label}
    assert set(rows) == {(op, mode) for op in ("refine_train", "refine_eval") for mode in ("fwd", "fwd+bwd")}
    for (op, mode), r in rows.items():
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["vs_reference"] > 0, r
        err = r["max_abs_err"] if mode == "fwd" else r["grad_rel_err"]
        assert err is not None and err < 1e-4, r  # fp32: the same arithmetic, reassociated at most
    assert not bench_ops.targets([dict(r, op="refine_eval", mode="fwd", dtype="bf16", H=12, d=32, N=197,
                                       vs_sdpa=0.5) for r in rows.values()])
    with pytest.raises(SystemExit):
        bench_ops.parse_args(["--compile-backend", "inductr"])


def test_env_variants_rows_beside_the_default(tmp_path, monkeypatch):
    """--env-variants: a candidate (the backend with runtime switches set) timed in the same run, in
    its own labelled rows, only for the ops named after '@'; the switches are unset again after it;
    it never counts for a target; a malformed spec is a usage error."""
    monkeypatch.delenv("REFINER_CPU_PORTABLE", raising=False)
    doc = bench_ops.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--modes", "fwd",
                          "--ops", "softmax_block", "refine_eval", "--backends", "cpu", "--no-plots", "--no-memory",
                          "--env-variants", "cpu:REFINER_CPU_PORTABLE=1@refine_eval", "--out", str(tmp_path)])
    label = "cpu[REFINER_CPU_PORTABLE=1]"
    rows = {(r["op"], r["backend"]): r for r in doc["rows"]}
    assert rows[("refine_eval", label)]["status"] == "ok" and rows[("refine_eval", label)]["vs_reference"] > 0
    assert ("softmax_block", label) not in rows
    assert "REFINER_CPU_PORTABLE" not in os.environ
    gpu_like = [dict(r, backend=b, dtype="bf16", H=12, d=32, N=197, mode="fwd", op="refine_eval", status="ok",
                     time_ms=t, vs_sdpa=t) for r, b, t in [(doc["rows"][0], "triton", 2.0),
                                                           (doc["rows"][0], "triton[X=1]", 1.0)]]
    assert "triton," in bench_ops.targets(gpu_like)[0]["detail"]
    for bad in ("cpu:NOVALUE", "cpu:A=1@refine_evl"):
        with pytest.raises(SystemExit):
            bench_ops.main(["--env-variants", bad])
    with pytest.raises(SystemExit):
        bench_models.main(["--env-variants", "cpu:A=1@refine_eval"])
    with pytest.raises(SystemExit):
        bench_models.main(["--mixed-backends", "triton,refine=cuda"])


@needs_mpl
def test_bench_models_quick(tmp_path):
    # The --quick preset (Refiner-ViT-S, batch 2, no compile) at 64 px (N=17) to keep CI fast, with an
    # env variant (the fused model on the CPU's portable code) beside the default.
    # Also a per-op backend choice (--mixed-backends), and one naming a backend not usable here (left out).
    doc = bench_models.main(["--quick", "--device", "cpu", "--threads", "1", "--img", "64", "--out", str(tmp_path),
                             "--env-variants", "cpu:REFINER_CPU_PORTABLE=1",
                             "--mixed-backends", "reference,refine_eval=cpu", "cpu,softmax_block=cuda"])
    rows = _check_outputs(doc, tmp_path, "bench_models", ["_throughput.png", "_memory.png"])["rows"]
    assert doc["targets"] == []
    variants = {(r["variant"], r["mode"]) for r in rows}
    assert ("reference eager", "infer") in variants and ("reference eager", "train") in variants
    assert any(v.startswith("fused[") for v, _ in variants)
    assert ("fused[cpu[REFINER_CPU_PORTABLE=1]]", "infer") in variants
    assert ("fused[reference,refine_eval=cpu]", "train") in variants
    assert not any("softmax_block=cuda" in v for v, _ in variants)
    assert bench_models._find(rows, "refiner_vit_s", "fused", 64, "infer")["variant"] == "fused[cpu]"
    for r in rows:
        r.setdefault("backend", None)
        assert r["model"] == "refiner_vit_s" and r["batch"] == 2 and r["img"] == 64 and r["amp"] == "none"
        if not _ok_or_recorded(r):
            continue
        assert r["images_per_s"] > 0 and r["peak_mem_mib"] > 0


def test_bench_models_measures_target_rows_before_candidates():
    """plan(): the fused defaults, the reference, the compiled rows and timm's model come before the
    candidates (--env-variants, --mixed-backends), so a time limit cuts candidates first."""
    if "cpu" not in common.usable_backends(torch.device("cpu"))[0]:
        pytest.skip("needs the compiled CPU backend (refiner._C) for its candidate rows")
    args = bench_models.parse_args(["--device", "cpu", "--models", "refiner_vit_s", "vit_small_patch16_224",
                                    "--modes", "infer", "--img", "64", "--compile-backend", "eager",
                                    "--fused-backends", "cpu", "--env-variants", "cpu:REFINER_CPU_PORTABLE=1",
                                    "--mixed-backends", "cpu,refine_eval=reference"])
    labels = [job[1] for job in bench_models.plan(args, args._device)]
    cand = [i for i, label in enumerate(labels) if "[" in label and ("=" in label)]
    rest = [i for i in range(len(labels)) if i not in cand]
    assert cand and rest and max(rest) < min(cand), labels
    assert {"reference eager", "timm (SDPA)"} <= {labels[i] for i in rest}
    assert any(label.startswith("reference compiled") for label in labels[:len(rest)])
    # the mix compiled too (refine_eval left to the compiler), a candidate
    assert labels.index("fused compiled[cpu,refine_eval=reference]") in cand


def test_bench_models_grad_checkpointing_rows():
    """--grad-checkpointing adds training rows (fused defaults, reference eager) of checkpointed models,
    after the target rows, never taken for a target."""
    args = bench_models.parse_args(["--device", "cpu", "--models", "refiner_vit_s", "vit_small_patch16_224",
                                    "--img", "64", "--grad-checkpointing"])
    jobs = bench_models.plan(args, args._device)
    ckpt = [(label, mode) for _, label, how, _, _, mode in jobs if bench_models._checkpointed(how)]
    fused = [label for _, label, how, _, _, _ in jobs if label.startswith("fused[") and not bench_models._candidate(how)]
    assert fused and {label for label, _ in ckpt} == {f"{f} {bench_models.CKPT}" for f in fused} | \
        {f"reference eager {bench_models.CKPT}"}
    assert {mode for _, mode in ckpt} == {"train"}
    first = min(i for i, job in enumerate(jobs) if bench_models._checkpointed(job[2]))
    assert not any(bench_models._checkpointed(job[2]) or bench_models._candidate(job[2]) for job in jobs[:first])
    assert bench_models.build("refiner_vit_s", ("ckpt", "reference"), 64, args._device).grad_checkpointing
    rows = [dict(model="refiner_vit_s", variant=f"fused[cpu] {bench_models.CKPT}", img=64, mode="train",
                 status="ok", images_per_s=9.0),
            dict(model="refiner_vit_s", variant="fused[cpu]", img=64, mode="train", status="ok", images_per_s=1.0)]
    assert bench_models._find(rows, "refiner_vit_s", "fused", 64, "train")["variant"] == "fused[cpu]"


def test_bench_models_fused_compiled_rows(tmp_path):
    # torch.compile of the fused model (fullgraph, a training step through AOTAutograd: the fused ops'
    # fake implementations and registered backward) times like any other row, memory n/a on the CPU.
    from refiner import ops
    if ops.available_backends("cpu")["cpu"] != "ok":
        pytest.skip(f"cpu backend: {ops.available_backends('cpu')['cpu']}")
    doc = bench_models.main(["--quick", "--device", "cpu", "--threads", "1", "--img", "64", "--out", str(tmp_path),
                             "--fused-backends", "cpu", "--modes", "train", "--compile-backend", "aot_eager",
                             "--compile-variants", "fused", "--no-plots"])
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"fused[cpu]", "reference eager", "fused compiled[cpu]"}
    r = rows["fused compiled[cpu]"]
    assert r["status"] == "ok" and r["images_per_s"] > 0 and r["peak_mem_mib"] is None and "n/a" in r["mem_note"]
    assert bench_models._find(doc["rows"], "refiner_vit_s", "fused[", 64, "train")["variant"] == "fused[cpu]"


def test_profile_models_names_the_autograd_function_range_as_forward():
    """torch names a custom op's autograd.Function range in the forward like its backward node."""
    assert profile_models.op_label("GeneratedBackwardFor_refiner_triton_refine_train_default") == \
        "fwd of refiner_triton_refine_train_default (Function)"
    for key in ("GeneratedBackwardFor_refiner_triton_refine_train_defaultBackward", "aten::mm"):
        assert profile_models.op_label(key) == key


def test_profile_models_cpu(tmp_path):
    """Shares of the profiled step: the fused model's refiner ops are found and take part of it."""
    doc = profile_models.main(["--device", "cpu", "--threads", "1", "--img", "32", "--batch", "1", "--warmup", "1",
                               "--steps", "1", "--top", "5", "--out", str(tmp_path)])
    rows = {(r["variant"], r["mode"]): r for r in doc["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    fused = [r for (v, _), r in rows.items() if v.startswith("fused")]
    assert {r["mode"] for r in fused} == {"infer", "train"}
    for r in fused:
        want = {"refiner::softmax_block"} | ({"refiner::refine_eval"} if r["mode"] == "infer" else
                                            {"refiner::refine_train", "refiner::refine_train_backward"})
        assert want <= set(r["refiner_ops_ms"]) and all(v > 0 for v in r["refiner_ops_ms"].values())
        assert 0 < r["refiner_share"] < 1 and len(r["top"]) == 5
        assert abs(sum(t["share"] for t in r["top"]) - sum(t["self_ms"] for t in r["top"]) / r["total_ms"]) < 1e-9
    assert rows[("reference eager", "infer")]["refiner_ops_ms"] == {}
    assert list(tmp_path.glob("profile_models_cpu_*.json")) and (tmp_path / "latest_cpu.json").exists()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU smoke run needs the Triton interpreter")
def test_bench_train_passes_cpu(tmp_path, monkeypatch):
    """Every pass of Triton's refine_train gets a row; passes and host time add up to the step."""
    from refiner_kernels import kernels_refine_train as T
    monkeypatch.setenv("REFINER_TRITON_TRAIN_SAVE_Y3", "0")  # the F3 rerun in the backward: two F3 calls
    doc = bench_train_passes.main(["--device", "cpu", "--n", "9", "--heads", "3", "--head-dim", "4",
                                   "--out", str(tmp_path)])
    ms = {r["part"]: r["ms"] for r in doc["rows"]}
    names = set(T._PASS_NAMES.values())
    assert set(ms) == names | {bench_train_passes.TOTAL, bench_train_passes.HOST}, set(ms) ^ names
    assert all(v > 0 for k, v in ms.items() if k != bench_train_passes.HOST)
    total = ms.pop(bench_train_passes.TOTAL)
    assert sum(ms.values()) == pytest.approx(total, rel=1e-6)
    assert T.PASS_TIMER is None  # restored
    assert list(tmp_path.glob("bench_train_passes_cpu_*.json")) and (tmp_path / "latest_cpu.json").exists()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU smoke run needs the Triton interpreter")
def test_ncu_kernels_runs_its_target_warmup_plus_one_times(monkeypatch):
    """The ncu driver calls the named op on the named backend: its warm-up calls, then the profiled one."""
    calls = []
    real = bench_ops.ops.refine_eval

    def counted(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)
    monkeypatch.setattr(bench_ops.ops, "refine_eval", counted)
    label = ncu_kernels.main(["--device", "cpu", "--target", "refine_eval:fwd+bwd:triton", "--n", "9", "--heads", "3",
                              "--head-dim", "4", "--warmup", "2"])
    assert calls == ["triton"] * 3 and label.startswith("refine_eval fwd+bwd triton (B=1, H=3, N=9, d=4")
    for bad in ("refine_eval:fwd", "refine:fwd:triton", "refine_eval:bwd:triton", "refine_eval:fwd:tpu"):
        with pytest.raises(SystemExit):
            ncu_kernels.parse_args(["--target", bad])


def test_flop_and_byte_formulas():
    # Refiner-ViT-S DLA at N=197 (DESIGN.md: 0.74 GFLOP for eight refine blocks per image).
    dla = bench_ops.flops("refine_eval", "fwd", 1, 12, 197, 32) - 2 * 12 * 197 ** 2 * 32
    assert 8 * dla == pytest.approx(0.74e9, rel=0.01)
    assert bench_ops.flops("sdpa", "fwd+bwd", 2, 12, 197, 32) == 3 * bench_ops.flops("sdpa", "fwd", 2, 12, 197, 32)
    assert bench_ops.min_bytes("refine_eval", "fwd", 1, 12, 197, 32, 2) == 2 * (12 * 197 ** 2 + 2 * 12 * 197 * 32)


def test_device_peaks_table():
    assert common.device_peaks("NVIDIA H100 80GB HBM3")["tb_s"] == 3.35
    assert common.device_peaks("NVIDIA H100 PCIe")["tb_s"] == 2.0
    assert common.device_peaks("NVIDIA H200")["tb_s"] == 4.8
    assert common.device_peaks("NVIDIA A100-SXM4-80GB") is None


def test_cpu_memory_estimate_counts_intermediates():
    x = torch.randn(256, 1024)  # 1 MiB
    nbytes, out = common.peak_memory(lambda: (x * 2 + 1).sum(), torch.device("cpu"))
    assert 2 * x.nbytes <= nbytes <= 3 * x.nbytes + 4096  # two temporaries of x's size, not x itself
    assert out.item() == pytest.approx((x * 2 + 1).sum().item(), rel=1e-4)
    nbytes, _ = common.peak_memory(lambda: x.mul_(1.0).view(-1), torch.device("cpu"))
    assert nbytes <= 64  # in-place ops and views allocate nothing (at most a wrapped scalar)


@pytest.mark.skipif(not __import__("refiner._compiled", fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="refiner._C not built")
def test_cpu_memory_counts_temporaries_inside_compiled_ops():
    """refine_train allocates its A-sized Z buffer inside C++: the CPU figure must include it."""
    from refiner import _compiled as C
    from refiner.testing import random_dla, train_args
    dla, bn = random_dla(12, 3, 3)
    ps = [p.detach() for p in train_args(dla, bn)]
    attn = torch.rand(2, 12, 17, 17)
    v = torch.randn(2, 12, 17, 8)
    nbytes, _ = common.peak_memory(lambda: C.refine_train(attn, v, *ps, 1e-5, 0.3, True), torch.device("cpu"))
    assert nbytes >= attn.nbytes + v.nbytes  # Z buffer + the output, at least


def test_targets_from_gpu_like_rows():
    # The target logic only runs on a GPU: check it on synthetic rows.
    base = dict(op="refine_eval", mode="fwd", dtype="bf16", H=12, d=32, B=32, status="ok")
    rows = [dict(base, N=197, backend="reference", time_ms=9.0, vs_sdpa=9.0),
            dict(base, N=197, backend="triton", time_ms=3.0, vs_sdpa=3.0),
            dict(base, N=197, backend="cuda", time_ms=1.5, vs_sdpa=1.5),
            dict(base, N=577, backend="cuda", time_ms=5.0, vs_sdpa=2.5)]
    t = {x["target"]: x for x in bench_ops.targets(rows)}
    assert [x["verdict"] for x in t.values()] == ["PASS", "MISS"]
    assert t["refine_eval fwd N=197 time / SDPA time"]["measured"] == 1.5

    def row(model, variant, mode, ips, mem=1000.0, status="ok"):
        return dict(model=model, variant=variant, img=224, batch=256, mode=mode, amp="bf16", images_per_s=ips,
                    peak_mem_mib=mem, status=status)
    s = "refiner_vit_s"
    rows = [row(s, "fused[cuda]", "infer", 3000), row(s, "fused[triton]", "infer", 2500),
            row(s, "reference eager", "infer", 1000), row(s, "reference compiled[inductor]", "infer", 2500),
            row("vit_small_patch16_224", "timm (SDPA)", "infer", 5000),
            row(s, "fused[cuda]", "train", 900, mem=20000), row(s, "reference eager", "train", None, status="OOM")]
    got = {x["target"]: x for x in bench_models.targets(rows)}
    assert not any("fused eager" in t for t in got)  # no compiled fused row: the eager one is "fused"
    assert got["S infer: fused / reference eager img/s"]["measured"] == 3.0
    assert got["S infer: fused / reference eager img/s"]["verdict"] == "PASS"
    assert got["S infer: fused / reference compiled img/s"]["verdict"] == "MISS"  # 1.2 < 1.5
    assert got["S infer: fused / timm ViT-S img/s"]["measured"] == pytest.approx(0.6)
    train = got["S train: fused / reference eager img/s"]
    assert train["verdict"] == "n/a" and "OOM" in train["detail"]
    # a faster compiled fused row counts for "fused" (its label in the detail); the eager one is kept
    # on record as "fused eager" for inference (training has no compiled row: not repeated)
    got = {x["target"]: x for x in bench_models.targets(rows + [row(s, "fused compiled[cuda]", "infer", 4000)])}
    assert got["S infer: fused / reference eager img/s"]["measured"] == 4.0
    assert "fused compiled[cuda]" in got["S infer: fused / reference eager img/s"]["detail"]
    assert got["S infer: fused eager / reference eager img/s"]["measured"] == 3.0
    assert got["S infer: fused eager / reference compiled img/s"]["verdict"] == "MISS"
    assert "S train: fused eager / reference eager img/s" not in got


@needs_mpl
def test_plots_of_a_gpu_like_run(tmp_path):
    meta = dict(script="bench_ops", device="cuda", device_name="NVIDIA H100 80GB HBM3", torch="2.11",
                timestamp="2026-11-25T00:00:00Z", git_commit="abc")
    rows = []
    for dt in ("bf16", "fp32"):
        for N in (197, 577, 785):
            for op, be in (("sdpa", "torch"), ("refine_eval", "reference"), ("refine_eval", "cuda"),
                           ("softmax_block", "triton")):
                for mode in ("fwd", "fwd+bwd"):
                    ok = not (N == 785 and be == "reference")
                    rows.append(dict(op=op, mode=mode, backend=be, dtype=dt, B=32, H=12, d=32, N=N,
                                     time_ms=N / 100 if ok else None, peak_mem_mib=N if ok else None,
                                     status="ok" if ok else "OOM"))
    pngs = plot.plot_run({"meta": meta, "rows": rows}, tmp_path / "ops")
    assert [p.name for p in pngs] == ["ops_time_vs_N.png", "ops_memory_vs_N.png"]
    mrows = [dict(model=m, variant=v, img=img, batch=256, mode=mode, images_per_s=100.0, peak_mem_mib=1e4,
                  status="ok") for m in ("refiner_vit_s", "vit_small_patch16_224")
             for v in ("fused[cuda]", "reference eager") for img in (224, 384) for mode in ("infer", "train")]
    mrows.append(dict(mrows[0], status="OOM", images_per_s=None, peak_mem_mib=None))
    pngs = plot.plot_run({"meta": dict(meta, script="bench_models"), "rows": mrows}, tmp_path / "models")
    assert [p.name for p in pngs] == ["models_throughput.png", "models_memory.png"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are a Linux matter")
@pytest.mark.parametrize("opt_out,want", [(None, "steady"), ("default", "default")])
def test_benchmark_processes_reexec_with_steady_malloc(opt_out, want):
    """A benchmark's __main__ re-executes itself once with the steady allocator (unless opted out)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "REFINER_BENCH_MALLOC")}
    if opt_out:
        env["REFINER_BENCH_MALLOC"] = opt_out
    code = "from refiner import cli; cli.reexec_with_steady_malloc(); print(cli.malloc_mode())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == want


# ----------------------------------------------------------------------------- decide_settings

def _round_files(tmp_path, rows, tuned=None, device="cuda", name="Fake GPU"):
    """A bench_ops JSON of a GPU round: rows (backend, op, mode, N, time_ms); plain rows are "triton"."""
    meta = {"device": device, "device_name": name, "git_commit": "abc1234", "timestamp": "2026-11-28T10:00:00Z",
            "triton_settings": {"tuned": tuned or {}, "env": {}}}
    full = [dict(op=op, mode=mode, backend=backend, dtype="bf16", B=32, H=12, N=N, d=32, time_ms=t, status="ok")
            for backend, op, mode, N, t in rows]
    path = tmp_path / "bench_ops_fake_20261128T100000Z.json"
    path.write_text(json.dumps({"meta": meta, "rows": full}))
    return path


def _junit(tmp_path, cases):
    """junit XML with {test name: "pass" | "fail" | "skip"}."""
    body = {"pass": "", "fail": "<failure message='x'/>", "skip": "<skipped message='x'/>"}
    xml = "<testsuites><testsuite>" + "".join(
        f'<testcase classname="tests.test_triton_gpu" name="{n}">{body[s]}</testcase>' for n, s in cases.items()
    ) + "</testsuite></testsuites>"
    path = tmp_path / "junit.xml"
    path.write_text(xml)
    return path


def test_decide_settings_chooses_faster_tested_values(tmp_path, capsys):
    from benchmarks import decide_settings as D
    from refiner_kernels import settings
    X2, DOT = "REFINER_TRITON_TRAIN_X2", "REFINER_TRITON_TRAIN_DOT"
    rows = []
    for N, base in ((197, 10.0), (577, 80.0)):
        rows += [("triton", "refine_train", "fwd+bwd", N, base), ("triton", "refine_train", "fwd", N, base / 3),
                 (f"triton[{X2}=halo]", "refine_train", "fwd+bwd", N, base * 0.6),
                 (f"triton[{X2}=halo]", "refine_train", "fwd", N, base),  # fwd rows don't count for X2
                 (f"triton[{DOT}=tf32x3]", "refine_train", "fwd+bwd", N, base * 0.5),  # faster, its test failed
                 (f"triton[{DOT}=ieee]", "refine_train", "fwd+bwd", N, base * 0.98),  # within min_gain
                 ("triton", "refine_eval", "fwd", N, base / 5),
                 ("triton[REFINER_TRITON_REFINE_FWD=tile]", "refine_eval", "fwd", N, base / 5 * 0.9),  # test skipped
                 (f"triton[{DOT}=ieee,{X2}=halo]", "refine_train", "fwd+bwd", N, base * 0.3)]  # a combination
    files = [_round_files(tmp_path, rows)]
    tests = D.junit_results([_junit(tmp_path, {
        f"test_refine_train_gpu_candidates[{X2}=halo-197-3]": "pass",
        f"test_refine_train_gpu_candidates[{DOT}=ieee,{X2}=halo-197-3]": "pass",
        f"test_refine_train_gpu_candidates[{DOT}=tf32x3-197-3]": "fail",
        f"test_refine_train_gpu_candidates[{DOT}=tf32-197-3]": "pass",  # must not count for tf32x3
        f"test_refine_train_gpu_candidates[{DOT}=ieee-197-3]": "pass",
        "test_refine_eval_gpu_tile_forward[197-32-3-3-bf16]": "skip"})])
    assert set(D.covering_tests(DOT, "tf32x3", tests)) == {f"test_refine_train_gpu_candidates[{DOT}=tf32x3-197-3]"}
    assert len(D.covering_tests(X2, "halo", tests)) == 2
    found, combos = D.ratios(files)
    assert combos == [f"triton[{DOT}=ieee,{X2}=halo]"]
    chosen, table = D.decide(found, tests, min_gain=0.05)
    assert list(chosen) == ["Fake GPU"] and list(chosen["Fake GPU"]) == [X2]
    entry = chosen["Fake GPU"][X2]
    assert entry["value"] == "halo" and entry["replaces"] == "offsets" and entry["cases"] == 2
    assert entry["speedup"] == pytest.approx(1 / 0.6, rel=1e-3) and entry["commit"] == "abc1234"
    verdicts = {(r[1], r[2]): r[-1] for r in table}
    assert verdicts[(DOT, "tf32x3")] == "faster, tests not all passed"
    assert verdicts[(DOT, "ieee")] == "not faster"
    assert verdicts[("REFINER_TRITON_REFINE_FWD", "tile")] == "faster, tests not all passed"  # its only case skipped
    # without any covering test case: "missing"
    chosen2, table2 = D.decide(found, {}, min_gain=0.05)
    assert chosen2 == {} and {r[-1] for r in table2} >= {"faster, tests missing"}
    # written next to another GPU model's entries, which stay; what was written reads back
    out = tmp_path / "tuned.json"
    out.write_text(json.dumps({"Other GPU": {DOT: {"value": "ieee"}}}))
    assert D.main([str(tmp_path), "--junit", str(tmp_path / "junit.xml"), "--write", str(out)]) == 0
    table = settings.tuned_table(out)
    assert table["Other GPU"] == {DOT: {"value": "ieee"}}
    assert table["Fake GPU"][X2]["value"] == "halo"
    printed = capsys.readouterr().out
    assert f"choose {X2}=halo on Fake GPU" in printed and "not decided (a combination)" in printed


def test_decide_settings_compares_with_what_the_plain_rows_ran(tmp_path):
    """Where the plain rows already ran a tuned value, a variant of that same value is no change,
    and CPU runs are not decided from."""
    from benchmarks import decide_settings as D
    X2 = "REFINER_TRITON_TRAIN_X2"
    rows = [("triton", "refine_train", "fwd+bwd", 197, 6.0), (f"triton[{X2}=halo]", "refine_train", "fwd+bwd", 197, 5.0),
            (f"triton[{X2}=offsets]", "refine_train", "fwd+bwd", 197, 10.0)]
    found, _ = D.ratios([_round_files(tmp_path, rows, tuned={X2: "halo"})])
    assert {k[2]: v["current"] for k, v in found.items()} == {"halo": "halo", "offsets": "halo"}
    assert D.decide(found, None, 0.05)[0] == {}
    assert D.ratios([_round_files(tmp_path, rows, device="cpu")])[0] == {}
    with pytest.raises(SystemExit):  # timings alone need --no-test-check
        D.main([str(tmp_path)])


def test_demo_runs_and_its_checks_hold(capsys):
    # `make demo`'s program at a small size: the fused model matches the reference in eval, its
    # training-step gradients are about as close to float64 as the reference's own fp32 ones, and
    # every compiled op usable here agrees with the reference op.
    import re
    from refiner import demo
    demo.main(["--img", "32", "--batch", "2", "--repeats", "1"])
    text = capsys.readouterr().out
    eval_err = float(re.search(r"refiner_vit_s eval\s+(\S+)", text).group(1))
    fused, ref = map(float, re.search(r"train step\s+grads (\S+) \(ref: (\S+)\)", text).groups())
    assert eval_err < 1e-5
    assert fused <= 5 * ref + 1e-6, text
    op_errs = [float(e) for e in re.findall(r"^(?:softmax_block|refine eval)\s+\w+\s+(\S+)", text, re.M)]
    assert op_errs and max(op_errs) < 1e-5, text


# ----------------------------------------------------------------------------- gpu_round.sh

def _gpu_round_commands(tmp: Path):
    """(script or "pytest", argv) of each `"$PY" benchmarks/<script>.py ...` and `"$PY" -m pytest ...`
    command in gpu_round.sh, its shell variables replaced by what they stand for there."""
    import re
    import shlex
    text = re.sub(r"\\\n\s*", " ", (ROOT / "benchmarks" / "gpu_round.sh").read_text())  # continued lines
    arrays = dict(re.findall(r"local (\w+)=\(([^)]*)\)", text))
    subs = {**{f'"${{{k}[@]}}"': v for k, v in arrays.items()},  # (arrays first: they hold "$RES")
            '"$RES"': str(tmp), '"$RES/': f'"{tmp}/', '"$t"': "refine_eval:fwd:triton", '"${XDIST[@]}"': "",
            '"${XDIST_WIDE[@]}"': ""}
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        # the sanitizers' shards: `all=$(collect_ids PYTEST ARGS)`, then `pytest $ids`
        shard = re.search(r'=\$\(collect_ids (.*)\)$', line)
        if shard:
            found.append(("pytest", shlex.split(shard.group(1))))
            continue
        m = re.search(r'"\$PY" (benchmarks/(\w+)\.py|-m pytest)(.*)$', line.split(" # ")[0])
        if not m or (m.group(2) is None and ("$ids" in line or '"$@"' in line)):
            continue
        rest = m.group(3)
        for k, v in subs.items():
            rest = rest.replace(k, v)
        argv = shlex.split(rest)
        assert not any("$" in a for a in argv), f"gpu_round.sh: unknown shell value in {line.strip()!r}"
        found.append((m.group(2) or "pytest", argv))
    return found


def test_gpu_round_commands_parse(tmp_path):
    """gpu_round.sh is valid bash, and every benchmark command in it parses with its script's own
    argument parser, every test file and test it names exists and every -k word selects something
    there: a renamed option or test would otherwise cost a step of a GPU round (15 minutes a
    session, when one is lent)."""
    import importlib
    import re
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_round.sh")], check=True)
    commands = _gpu_round_commands(tmp_path)
    scripts = {name for name, _ in commands if name != "pytest"}
    assert {"bench_ops", "bench_models", "decide_settings", "bench_train_passes", "profile_models",
            "ncu_kernels"} <= scripts, scripts
    for name, argv in commands:
        if name != "pytest":
            importlib.import_module(f"benchmarks.{name}").parse_args(argv)  # SystemExit(2) on a bad option
            continue
        paths = [a for a in argv if a.startswith("tests")]
        assert paths, argv
        names = set()
        for path in paths:
            file, _, test = path.partition("::")
            files = sorted((ROOT / file).glob("test_*.py")) if (ROOT / file).is_dir() else [ROOT / file]
            source = "".join(f.read_text() for f in files)
            assert not test or f"def {test}(" in source, path
            names |= set(re.findall(r"^def (test_\w+)", source, re.M))
        if "-k" in argv:
            words = set(re.findall(r"\w+", argv[argv.index("-k") + 1])) - {"and", "or", "not"}
            for word in words:
                assert any(word in n for n in names), f"-k {word!r} selects nothing in {paths}"
