"""Shared pieces of the benchmark scripts: timing, memory, device peaks, metadata, output.

Every piece of logic lives here once; `bench_ops.py`, `bench_models.py` and `plot.py`
import it. Importing this module puts the repository root on `sys.path`, so the
scripts run from a checkout without an installed package.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from refiner import cli, ops  # noqa: E402
from refiner_kernels import settings  # noqa: E402
from refiner.demo import format_table  # noqa: E402,F401  (one table printer for demo and benchmarks)

RESULTS_DIR = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ----------------------------------------------------------------------------
# Device and its peaks
# ----------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks and HBM bandwidth from NVIDIA's datasheets.
# "fp32" is the TF32 tensor-core rate: the fused kernels and cuBLAS (when TF32 is on)
# run fp32 matrix work there; plain fp32 CUDA-core peaks are ~67 (SXM) / ~51 (PCIe).
# Matched in order against torch.cuda.get_device_name() (first pattern that matches).
PEAKS: List[Tuple[str, Dict[str, float]]] = [
    # pattern (regex, case-insensitive)   TFLOP/s per dtype                   TB/s
    (r"H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5, "tb_s": 4.8}),
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "tb_s": 4.8}),
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0, "tb_s": 2.0}),
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5, "tb_s": 3.9}),
    (r"H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7, "tb_s": 3.35}),  # SXM5 ("H100 80GB HBM3")
]


def device_peaks(device_name: str) -> Optional[Dict[str, float]]:
    """Datasheet peaks for a GPU name, or None (CPU, unknown GPU): then % columns say n/a."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return dict(peaks, matched=pattern)
    return None


def pick_device(arg: str = "auto") -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(arg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def device_label(device: torch.device) -> str:
    """Short label put on every row, table title and plot: 'CPU' or the GPU's name."""
    return "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)


def device_slug(device: torch.device) -> str:
    """File-name-safe device tag: 'cpu', 'nvidia-h100-80gb-hbm3', ..."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def usable_backends(device: torch.device, wanted: Optional[Iterable[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """(backends to benchmark, {backend: reason skipped}) from `ops.available_backends`.

    On CPU the Triton backend (interpreter only) is never benchmarked.
    """
    status = ops.available_backends(device)
    run, skipped = [], {}
    for name in ops.BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        if status[name] != "ok":
            skipped[name] = status[name]
        elif name == "triton" and device.type == "cpu":
            skipped[name] = "Triton on CPU runs in the interpreter: timings would be meaningless"
        else:
            run.append(name)
    return run, skipped


class EnvVariant:
    """A backend run with extra environment variables (the refiner's runtime switches are read at
    each call), e.g. ``triton:REFINER_TRITON_REFINE_FWD=tile@refine_eval``: the candidate beside the
    default in one run. ``@op+op`` limits it to those ops (bench_ops)."""

    def __init__(self, spec: str):
        head, _, only = spec.partition("@")
        backend, _, assigns = head.partition(":")
        pairs = [a.split("=", 1) for a in assigns.split(",") if a]
        if backend not in ops.BACKENDS or not pairs or any(len(kv) != 2 or not kv[0] for kv in pairs):
            raise ValueError(f"env variant: expected BACKEND:NAME=VALUE[,NAME=VALUE][@op+op] with BACKEND one of "
                             f"{ops.BACKENDS}, got {spec!r}")
        self.backend, self.env = backend, dict(pairs)
        self.ops = tuple(o for o in only.split("+") if o) or None
        self.label = f"{backend}[{','.join(f'{k}={v}' for k, v in self.env.items())}]"
        self.spec = spec

    def __str__(self) -> str:  # the JSON metadata's args
        return self.spec

    def applies(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def active(self):
        """A context with the variant's environment set (restored after)."""
        return mock.patch.dict(os.environ, self.env)


def env_variant(spec: str) -> EnvVariant:
    """argparse type of --env-variants."""
    import argparse
    try:
        return EnvVariant(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def backend_spec(spec: str) -> str:
    """argparse type of a backend with per-op choices ("triton,refine_eval=cuda"; refiner.ops.parse_backend)."""
    import argparse
    try:
        ops.parse_backend(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def backends_named(spec: str) -> List[str]:
    """The backends a spec names (its default and per-op choices)."""
    default, per_op = ops.parse_backend(spec)
    return [default] + [name for _, name in per_op]


def auto_backend(device: torch.device) -> str:
    """The backend name `backend="auto"` resolves to on `device`."""
    mod = ops.resolve_backend("auto", device)
    name = getattr(mod, "__name__", "")
    if name.endswith("reference"):
        return "reference"
    if "refiner_kernels" in name:
        return "triton"
    return "cuda" if device.type == "cuda" else "cpu"


def run_label(device: torch.device, meta: dict) -> str:
    """Headline device label: the GPU's name, or 'CPU (...)' saying which backends ran."""
    if device.type == "cuda":
        return meta["device_name"]
    usable, _ = usable_backends(device)
    only_ref = usable == ["reference"]
    return f"{meta['device_name']}, {'reference backend only' if only_ref else 'backends: ' + ', '.join(usable)}"


def _git_commit() -> str:
    """HEAD (+ "-dirty"), or $REFINER_GIT_COMMIT where the tree has no .git (a copied tree)."""
    if os.environ.get("REFINER_GIT_COMMIT"):
        return os.environ["REFINER_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def run_metadata(device: torch.device, script: str, args: dict) -> dict:
    name = device_name(device)
    return {
        "script": script,
        "device": device.type,
        "device_label": device_label(device),
        "device_name": name,
        "peaks": device_peaks(name) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backends": ops.available_backends(device),
        "args": args,
        "timing": ("GPU: median of triton.testing.do_bench (L2 flushed) or CUDA events" if device.type == "cuda"
                   else "CPU: median wall-clock of repeated calls after a warm-up"),
        "memory": MEMORY_METHOD[device.type],
        "malloc": cli.malloc_mode(),  # see refiner.cli.STEADY_MALLOC
        "triton_settings": triton_settings(device),
    }


def triton_settings(device: torch.device) -> dict:
    """What the plain "triton" rows ran with: the switches' values tuned for this GPU model
    (refiner_kernels/tuned_settings.json) and those set in the environment (which win)."""
    return {"tuned": settings.tuned_for(device),
            "env": {k: os.environ[k] for k in settings.SWITCHES if k in os.environ}}


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic GC off while timing (as timeit does): a collection of the interpreter's many
    objects otherwise lands inside random calls (perf: ~6% of a CPU op timing loop)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
                rep_ms: float = 100.0, use_do_bench: bool = True) -> float:
    """Median seconds per call of `fn`.

    GPU: `triton.testing.do_bench` (median over ~`rep_ms` of calls, L2 flushed between
    them) when Triton is installed and `use_do_bench`, else CUDA events around each of
    `repeats` calls after `warmup` untimed ones. CPU: wall-clock around each of
    `repeats` calls after `warmup` untimed ones.
    """
    if device.type == "cuda":
        do_bench = None
        if use_do_bench:
            try:
                from triton.testing import do_bench
            except Exception:
                do_bench = None
        if do_bench is not None:
            fn()  # compile / autotune outside the measurement
            return do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e-3
        for _ in range(max(warmup, 1)):
            fn()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    with gc_paused():
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call",
    "cpu": ("CPU: peak bytes held through torch's CPU allocator during the first call, above what was "
            "held before it (profiler memory events: tensors and the ATen temporaries inside fused ops "
            "are counted, a kernel's own malloc'd tile scratch is not; a training step counts its "
            "gradients and AdamW state, not the weights)"),
}


@contextlib.contextmanager
def _silent_stderr_fd():
    """Kineto logs profiler start/stop lines straight to fd 2, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocator_peak(fn: Callable[[], object]) -> Tuple[int, object]:
    """(peak of the running sum of CPU allocations minus frees while `fn` runs, its result)."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silent_stderr_fd():  # only around start and stop: fn's own errors stay visible
        prof.start()
    try:
        result = fn()
    finally:
        with _silent_stderr_fd():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak, result


def peak_memory(fn: Callable[[], object], device: torch.device, absolute: bool = False) -> Tuple[Optional[int], object]:
    """(peak bytes during one call of `fn`, its result); method: `MEMORY_METHOD[device.type]`.

    GPU: `max_memory_allocated` over the call, minus what was allocated before it
    unless `absolute` (models report the absolute peak: weights, optimizer state and all).
    CPU: the allocator peak above (always relative to the start of the call). The scripts
    make this the first call on CPU (it doubles as the warm-up), so a training step's
    figure includes the gradients and the AdamW state that step creates.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak if absolute else peak - before), result
    return _cpu_allocator_peak(fn)


# ----------------------------------------------------------------------------
# Progress bars (tqdm when installed)
# ----------------------------------------------------------------------------

def progress(iterable, **kw):
    try:
        from tqdm.auto import tqdm
    except Exception:
        return iterable
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    if not getattr(kw["file"], "isatty", lambda: False)():
        kw.setdefault("mininterval", 30.0)  # logs (gpu_round.sh): a line every 30 s, not a stream
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)


def progress_write(msg: str):
    try:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)
    except Exception:
        print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    """Format a number; "g" gives 3 significant digits below 100 and no decimals above."""
    if x is None:
        return none
    if spec == "g":
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return format(x, spec)


def mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2 ** 20


def write_results(doc: dict, out_dir: Optional[Path], device: torch.device) -> Tuple[Path, Path]:
    """Write one run as `<script>_<device>_<UTC date-time>.json` and merge it into
    `latest_<device>.json` (one entry per script). Returns both paths."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    stamp = doc["meta"]["timestamp"].replace(":", "").replace("-", "")
    path = out_dir / f"{doc['meta']['script']}_{slug}_{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    latest = out_dir / f"latest_{slug}.json"
    merged = {}
    if latest.exists():
        try:
            merged = json.loads(latest.read_text())
        except ValueError:
            merged = {}
    merged[doc["meta"]["script"]] = dict(doc, file=path.name)
    latest.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    return path, latest


def load_runs(path: Path) -> List[dict]:
    """The runs in a results JSON: a single-run file or a merged `latest_*.json`."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(doc).__name__}")
    if "rows" in doc:
        return [doc]
    return [v for v in doc.values() if isinstance(v, dict) and "rows" in v]


def target_line(name: str, ratio: Optional[float], target: float, higher_is_better: bool, detail: str = "") -> dict:
    if ratio is None:
        verdict = "n/a"
    else:
        verdict = "PASS" if (ratio >= target if higher_is_better else ratio <= target) else "MISS"
    return {"target": name, "measured": ratio, "goal": f"{'>=' if higher_is_better else '<='} {target}",
            "verdict": verdict, "detail": detail}


def print_targets(targets: List[dict], device: torch.device):
    print()
    if device.type != "cuda":
        print("targets: skipped (CPU run; the targets are set for an H100, bf16 autocast)")
        return
    if not targets:
        print("targets: no rows needed for them in this run")
        return
    print("targets:")
    print(format_table([[t["target"], fmt(t["measured"], ".2f"), t["goal"], t["verdict"], t["detail"]]
                        for t in targets], ["target", "measured", "goal", "verdict", "rows used"]))


def env_threads(threads: Optional[int] = None) -> int:
    """CPU threads: `threads`, else OMP_NUM_THREADS, else all cores. On a shared machine
    fewer threads than cores give steadier numbers (a descheduled OpenMP thread stalls
    every parallel region). Returns the previous count (main() restores it)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    return before


def report(args, device, meta, rows, title: str, headers, table_rows, tg) -> dict:
    """Print the table and targets, write JSON and plots; re-raise an interrupt once saved."""
    meta["interrupted"] = args._interrupted
    print()
    print(f"[{device_label(device)}] {title}")
    print(format_table(table_rows(rows), headers))
    print_targets(tg, device)
    doc = {"meta": meta, "rows": rows, "targets": tg}
    path, latest = write_results(doc, args.out, device)
    print(f"\nresults: {path}\n         {latest}")
    if not args.no_plots:
        from benchmarks import plot
        for png in plot.plot_run(doc, path.with_suffix("")):
            print(f"plot:    {png}")
    if args._interrupted:  # results are saved; now stop like any interrupted program (pytest too)
        raise KeyboardInterrupt
    return doc
