"""Registers and spills of every CUDA kernel, compiled for sm_90 by nvcc without a GPU.

    python tests/cuda_ptxas.py [--arch 90] [--no-spills PATTERN] [FILE.cu ...]

Compiles csrc/cuda/*.cu with `-Xptxas -v` (as setup.py's flags, one file at a time, ~1-2 min on
2 cores) and prints one row per kernel: registers, stack frame, spill stores and loads. With
--no-spills, exits 1 if a kernel whose name contains PATTERN spills (CI: the tensor-core kernels,
"_tc_kernel", whose fragment arrays must stay in registers).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_\d+'")
USAGE = re.compile(r"Used (\d+) registers")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def demangled(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    # keep the kernel's name and template arguments, drop the namespaces and the parameter list
    return [re.sub(r"\(.*$", "", re.sub(r"refiner::\(anonymous namespace\)::", "", n)) for n in out[:len(names)]]


def compile_report(src: str, arch: str):
    from torch.utils.cpp_extension import include_paths
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    inc = [f"-I{p}" for p in include_paths("cuda")] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++20", "-O3", "-DNDEBUG", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v", "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_C", *inc,
               "-c", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
    rows, cur = [], None
    for line in res.stderr.splitlines():
        if m := ENTRY.search(line):
            cur = {"kernel": m.group(1)}
            rows.append(cur)
        elif cur is not None and (m := FRAME.search(line)):
            cur.update(frame=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := USAGE.search(line)):
            cur["regs"] = int(m.group(1))
    for r, name in zip(rows, demangled([r["kernel"] for r in rows])):
        r["name"] = name
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90")
    p.add_argument("--no-spills", metavar="PATTERN", help="fail if a kernel whose name contains PATTERN spills")
    p.add_argument("files", nargs="*", help="sources (default: csrc/cuda/*.cu)")
    args = p.parse_args()
    bad = []
    for src in args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        print(f"{os.path.relpath(src, ROOT)} (sm_{args.arch})")
        print(f"  {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
        for r in compile_report(src, args.arch):
            print(f"  {r.get('regs', 0):>4} {r.get('frame', 0):>5} {r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<5}  "
                  f"{r['name']}")
            if args.no_spills and args.no_spills in r["kernel"] and (r.get("spill_st") or r.get("spill_ld")):
                bad.append(r["name"])
    if bad:
        print(f"spilling kernels matching {args.no_spills!r}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
