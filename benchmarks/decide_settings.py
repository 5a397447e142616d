"""Which Triton switch values a GPU round measured faster than the defaults; records them.

    python benchmarks/decide_settings.py RESULTS [RESULTS ...] --junit FILE [--min-gain 0.05]
                                         [--write [PATH]]

RESULTS: bench_ops JSON files, or folders (their bench_ops_*.json). For each switch of
refiner_kernels.settings.SWITCHES and each value a run measured beside the defaults (rows labelled
triton[NAME=VALUE], one assignment; combinations are listed, not decided), the time ratio to the
plain "triton" rows of the same run and case (op, mode, dtype, B, H, N, d), as a geometric mean over
the cases of the mode the switch acts in: fwd for refine_eval's forward switches
(REFINER_TRITON_REFINE_FWD, REFINER_TRITON_REFINE_DOT), fwd+bwd for the others.

A value is chosen for the GPU model (the device name in the runs' metadata) when it is the fastest
measured, at least --min-gain faster than what the plain rows ran, and its GPU tests passed: in the
junit XML of `pytest tests/test_triton_gpu.py --junitxml FILE`, every test case that runs it (at
least one; see covering_tests). --write records the choices, with their evidence, in
refiner_kernels/tuned_settings.json (or PATH), which refiner_kernels.settings reads: commit it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refiner.demo import format_table  # noqa: E402
from refiner_kernels import settings  # noqa: E402

MODE_OF = {"REFINER_TRITON_REFINE_FWD": "fwd", "REFINER_TRITON_REFINE_DOT": "fwd"}  # the rest: fwd+bwd rows
# tests that run a value without naming NAME=VALUE in their id
TESTS_OF = {("REFINER_TRITON_REFINE_FWD", "tile"): "test_refine_eval_gpu_tile_forward",
            ("REFINER_TRITON_REFINE_FWD", "gather"): "test_refine_eval_gpu_gather_forward",
            ("REFINER_TRITON_SOFTMAX_BWD_DOT", "bf16"): "test_softmax_block_gpu_bf16_backward_dots"}
_VARIANT = re.compile(r"^triton\[(.+)\]$")


def bench_files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("bench_ops_*.json")) if p.is_dir() else [p]
    return out


def junit_results(paths) -> dict[str, bool]:
    """{test case name: passed} from junit XML files (a skipped case is not a pass)."""
    out = {}
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            out[case.get("name", "")] = not any(c.tag in ("failure", "error", "skipped") for c in case)
    return out


def covering_tests(name: str, value: str, results: dict[str, bool]) -> dict[str, bool]:
    """The test cases that run NAME=VALUE: those whose id holds it as a parameter, or TESTS_OF's."""
    pattern = re.compile(rf"[\[,]{re.escape(name)}={re.escape(value)}[,\-\]]")
    prefix = TESTS_OF.get((name, value))
    return {t: ok for t, ok in results.items()
            if pattern.search(t) or (prefix is not None and (t == prefix or t.startswith(prefix + "[")))}


def _case(row: dict) -> tuple:
    return row["op"], row["mode"], row["dtype"], row["B"], row["H"], row["N"], row["d"]


def _ran_with(meta: dict, name: str) -> str:
    """The value the plain "triton" rows of a run had for a switch."""
    used = meta.get("triton_settings") or {}
    return (used.get("env") or {}).get(name) or (used.get("tuned") or {}).get(name) or settings.SWITCHES[name][0]


def ratios(files) -> tuple[dict, list]:
    """{(device name, switch, value): {"ratios": [...], "current": value, "files", "meta"}} and the
    combinations seen (label list)."""
    found, combos = {}, []
    for f in files:
        data = json.loads(Path(f).read_text())
        meta = data["meta"]
        if meta.get("device") != "cuda":
            continue
        plain = {_case(r): r["time_ms"] for r in data["rows"]
                 if r["backend"] == "triton" and r["status"] == "ok" and r["time_ms"]}
        for r in data["rows"]:
            m = _VARIANT.match(r["backend"])
            if not m or r["status"] != "ok" or not r["time_ms"]:
                continue
            assigns = m.group(1).split(",")
            if len(assigns) != 1:
                combos.append(r["backend"])
                continue
            name, _, value = assigns[0].partition("=")
            if name not in settings.SWITCHES or r["mode"] != MODE_OF.get(name, "fwd+bwd") or _case(r) not in plain:
                continue
            entry = found.setdefault((meta["device_name"], name, value),
                                     {"ratios": [], "current": _ran_with(meta, name), "files": set(), "meta": meta})
            entry["ratios"].append(r["time_ms"] / plain[_case(r)])
            entry["files"].add(Path(f).name)
    return found, sorted(set(combos))


def decide(found: dict, tests: dict[str, bool] | None, min_gain: float) -> tuple[dict, list]:
    """({device: {switch: entry}} chosen, table rows)."""
    best, rows = {}, []  # (device, switch) -> (geomean ratio, value, evidence)
    for (device, name, value), e in sorted(found.items()):
        g = math.exp(sum(map(math.log, e["ratios"])) / len(e["ratios"]))
        cover = None if tests is None else covering_tests(name, value, tests)
        fast = g <= 1 - min_gain and value != e["current"]
        verdict = "faster" if fast else "not faster"
        if fast and tests is not None and not (cover and all(cover.values())):
            verdict = "faster, tests " + ("missing" if not cover else "not all passed")
        elif fast and g < best.get((device, name), (1.0,))[0]:
            best[(device, name)] = (g, value, e)
        tests_col = "-" if tests is None else f"{sum(cover.values())}/{len(cover)}"
        rows.append([device, name, value, e["current"], str(len(e["ratios"])), f"{g:.3f}", tests_col, verdict])
    chosen = defaultdict(dict)
    for (device, name), (g, value, e) in best.items():
        chosen[device][name] = {"value": value, "speedup": round(1 / g, 3), "cases": len(e["ratios"]),
                                "mode": MODE_OF.get(name, "fwd+bwd"), "replaces": e["current"],
                                "from": sorted(e["files"]), "commit": e["meta"].get("git_commit"),
                                "measured": e["meta"].get("timestamp")}
    return dict(chosen), rows


def write(chosen: dict, path: Path) -> dict:
    table = settings.tuned_table(path)
    for device, entries in chosen.items():
        table.setdefault(device, {}).update(entries)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    settings.tuned_table(path)  # what was written reads back
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench_ops JSON files or folders holding them")
    p.add_argument("--junit", nargs="+", default=None, help="junit XML of pytest tests/test_triton_gpu.py")
    p.add_argument("--no-test-check", action="store_true", help="decide on timings alone (no --junit)")
    p.add_argument("--min-gain", type=float, default=0.05, help="least fraction of time saved (default 0.05)")
    p.add_argument("--write", nargs="?", const=settings.TUNED_FILE, type=Path, default=None,
                   help=f"record the choices (default path: {settings.TUNED_FILE})")
    args = p.parse_args(argv)
    if args.junit is None and not args.no_test_check:
        p.error("--junit FILE (the GPU tests' results) or --no-test-check is required")
    args._error = p.error
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files = bench_files(args.results)
    if not files:
        args._error(f"no bench_ops JSON in {args.results}")
    found, combos = ratios(files)
    chosen, rows = decide(found, None if args.junit is None else junit_results(args.junit), args.min_gain)
    print(format_table(rows, ["device", "switch", "value", "plain rows ran", "cases", "time ratio", "tests", "verdict"]))
    for label in combos:
        print(f"not decided (a combination): {label}")
    for device, entries in chosen.items():
        for name, e in entries.items():
            print(f"choose {name}={e['value']} on {device}: {e['speedup']:.2f}x over {e['replaces']}")
    if not chosen:
        print("no change")
    if args.write is not None and chosen:
        write(chosen, args.write)
        print(f"written: {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
