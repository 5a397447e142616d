"""Run test files again in a child process with AddressSanitizer's runtime preloaded: the CPU
stand-in for compute-sanitizer's memcheck. The code under test is built with -fsanitize=address by
the child itself (`prelude`), since a sanitized library loads only where the runtime came first.
Used by `tests/cuda_emu.py --asan` (the CUDA kernels on the emulator) and `tests/cpu_asan.py`
(the CPU backend)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton's native module aborts under ASan at import: the child hides it (its tests then skip).
HIDE_TRITON = "import sys; sys.modules['triton'] = None\n"


def run_pytest(files: List[str], env: Dict[str, str], prelude: str = "", pytest_args: Sequence[str] = ()) -> int:
    """pytest on `files` (names under tests/) in a child with libasan preloaded; its exit status."""
    libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        print(f"asan: gcc has no {' or '.join(libs)}", file=sys.stderr)
        return 2
    paths = [os.path.join(ROOT, "tests", f) for f in files]
    code = (HIDE_TRITON + f"sys.path.insert(0, {ROOT!r})\n" + prelude + "\nimport pytest\n"  # (as python -m pytest)
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{list(pytest_args)!r}, *{paths!r}]))")
    # libstdc++ preloaded after the runtime: ASan looks up the real __cxa_throw when it starts, and
    # python does not load libstdc++ itself; without it the first C++ exception (a TORCH_CHECK) aborts.
    env = dict(os.environ, LD_PRELOAD=" ".join(os.path.realpath(lib) for lib in libs),
               ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), env=env).returncode
