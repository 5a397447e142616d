#!/usr/bin/env bash
# One round on a lent GPU machine (H100/H200: Python 3.12, torch 2.11 + CUDA 13.0, Triton 3.6,
# timm, nvcc 13.0, NO network). Run from the repository root, one stage per device call:
#
#   bash benchmarks/gpu_round.sh quick         # everything that fits ONE call of a 15-minute lease:
#                                              # build (sm_90) while the Triton GPU tests run, then the
#                                              # CUDA/cross-backend tests, a training step (S, Triton
#                                              # settings and refine_train on CUDA), inference (S on
#                                              # Triton, CUDA and per-op mixes, ViT-S; 224 px, no
#                                              # compile), bench_ops of the refine and softmax ops
#                                              # (Triton, CUDA, reference; N 197/577, bf16) with the
#                                              # other settings as extra rows (--env-variants), the
#                                              # values faster than the defaults that passed their GPU
#                                              # tests (decide_settings: results/tuned_settings.json,
#                                              # to commit), refine_train by pass (bench_train_passes),
#                                              # then in the time left a profile (Refiner-ViT-S
#                                              # fused[triton] vs reference); next call on the warm
#                                              # machine: STAGE_BUDGET=260 bash benchmarks/gpu_round.sh
#                                              # compiled (the torch.compile rows, never measured on a
#                                              # GPU) or, where the CUDA tests failed, sanitize
#   bash benchmarks/gpu_round.sh compiled      # torch.compile (inductor): the ops against the reference
#                                              # ops compiled, then Refiner-ViT-S fused on Triton and the
#                                              # reference compiled, beside their eager rows and ViT-S:
#                                              # the "reference compiled" target and the fused model
#                                              # compiled (inference, then a training step, also with
#                                              # refine_train left to the compiler; ~5-8 min, no build)
#   bash benchmarks/gpu_round.sh ncu           # Nsight Compute on the refine and softmax ops' kernels (one
#                                              # process per op/mode/backend, benchmarks/ncu_kernels.py):
#                                              # occupancy, registers, throughput against the peaks, warp
#                                              # stalls; the logs tarball holds one report per target
#                                              # (~4 min, no build unless the CUDA targets need one)
#   bash benchmarks/gpu_round.sh verify        # the tests: build (sm_90) beside the Triton GPU tests,
#                                              # memcheck and racecheck of the CUDA tests (shards)
#                                              # beside the compiled training-step tests, then the
#                                              # CUDA and cross-backend files (see stage_verify): one
#                                              # call (~8 min), then `compiled` on the warm machine
#   bash benchmarks/gpu_round.sh tests         # build, describe backends, pytest, compute-sanitizer
#   bash benchmarks/gpu_round.sh bench         # build (if needed), bench_ops, profile_models, bench_models
#   bash benchmarks/gpu_round.sh bench-ops     # only bench_ops (whole budget)
#   bash benchmarks/gpu_round.sh bench-models  # only bench_models (whole budget)
#   bash benchmarks/gpu_round.sh sanitize      # only compute-sanitizer memcheck + racecheck
#   bash benchmarks/gpu_round.sh props         # the long hypothesis profile (200 examples per property)
#
# The device copy of the tree may have no .git: pass the commit for the JSON metadata, e.g.
#   REFINER_GIT_COMMIT=<sha> bash benchmarks/gpu_round.sh bench
#
# Each stage stays under STAGE_BUDGET seconds (default 510, under the 9-minute mark): every step
# runs under `timeout`, the benchmarks get SIGINT first (they then write the rows measured so
# far) and are killed 20 s later. Results go to $OUT (default /tmp/gpu_round_out) as at most 3 files per
# stage: <stage>_logs.tar.gz, <stage>_results.tar.gz and <stage>_summary.txt (the device tool
# brings back at most 8 files of < 16 MiB).
set -uo pipefail
STAGE=${1:-tests}
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${STAGE_BUDGET:-510}
PY=${PY:-$(command -v python3 || command -v python)}
OUT=${OUT:-/tmp/gpu_round_out}
WORK=$(mktemp -d /tmp/gpu_round.XXXXXX)
LOGS=$WORK/logs; RES=$WORK/results
mkdir -p "$OUT" "$LOGS" "$RES"
SUMMARY=$LOGS/summary.txt
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-16}
export REFINER_CUDA=${REFINER_CUDA:-1}
unset TRITON_INTERPRET                      # real Triton on the GPU
# Autotuning results on disk (Triton's own knob, TRITON_CACHE_AUTOTUNING=1) would spare the benchmark
# steps, separate processes, timing every config again. Off by default: round 4 (H200, Triton 3.6)
# lost every Triton row to it ("Object of type dtype is not JSON serializable": a tl.dtype in the
# tuning keys, since left out, refiner_kernels/_common.py FROM_DTYPES). Try it with =1 once.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-0}
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# pytest-xdist workers where installed (the lent machines have it): GPU test files are bound by
# Triton's and torch's compiling on the CPU
XDIST=() XDIST_WIDE=()  # (the build runs beside the first; the second has the 16 cores to itself)
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 4) XDIST_WIDE=(-n 8)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
# run_step NAME SECONDS CMD...: run under a time limit, log to $LOGS/NAME.log, note the outcome.
run_step() {
  local name=$1 limit=$2; shift 2
  local avail; avail=$(( $(left) - 15 ))
  (( limit > avail )) && limit=$avail
  if (( limit < 20 )); then say "$name: SKIPPED (stage budget spent)"; return 0; fi
  say "$name: start (limit ${limit}s): $*"
  timeout -s INT -k 20 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc$( ((rc == 124 || rc == 130)) && echo ' (time limit: partial)')"
  tail -n 25 "$LOGS/$name.log" | sed "s/^/    $name| /" >>"$SUMMARY"
  return 0
}

pack() {
  cp "$SUMMARY" "$OUT/${STAGE}_summary.txt"
  tar -czf "$OUT/${STAGE}_logs.tar.gz" -C "$WORK" logs
  if compgen -G "$RES/*" >/dev/null; then tar -czf "$OUT/${STAGE}_results.tar.gz" -C "$WORK" results; fi
  ls -la "$OUT"
}
trap pack EXIT

env_info() {
  say "stage $STAGE on $(hostname); budget ${BUDGET}s; python $PY"
  { nvidia-smi || true; nvcc --version || true; command -v compute-sanitizer || echo "no compute-sanitizer";
    "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available()
      and torch.cuda.get_device_name())
for m in ("triton", "timm", "pytest", "hypothesis", "tqdm", "matplotlib", "numpy", "yaml", "safetensors"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
EOF
  } >"$LOGS/env.log" 2>&1
  grep -E "^(torch|triton|timm|pytest|tqdm|matplotlib) " "$LOGS/env.log" | sed 's/^/    env| /' >>"$SUMMARY"
}

describe_backends() {
  "$PY" -c "import refiner.ops as o; print(o.describe_backends())" >"$LOGS/backends.log" 2>&1
  sed 's/^/    /' "$LOGS/backends.log" | tee -a "$SUMMARY"
}

build() {
  # Skip when refiner._C already imports (a warm machine from the previous stage).
  if "$PY" -c "import refiner._C" >/dev/null 2>&1; then say "build: refiner._C already importable, skipped"; else
    if [ -f setup.py ]; then
      run_step build 330 "$PY" setup.py build_ext --inplace
      "$PY" -c "import refiner._C" >/dev/null 2>&1 || \
        run_step build_pip 300 "$PY" -m pip install --no-build-isolation --no-deps -e .
    else
      say "build: no setup.py in this tree: compiled backends unavailable"
    fi
  fi
}

stage_tests() {
  run_step pytest 300 "$PY" -m pytest -q -ra "${XDIST[@]}" tests
  stage_sanitize
}

# collect_ids ARGS...: the test ids pytest collects for ARGS; shard K I: every K-th line of stdin from
# the I-th (0-based)
collect_ids() { "$PY" -m pytest -q --collect-only "$@" 2>/dev/null | grep "::"; }
shard() { awk -v k="$1" -v i="$2" '(NR - 1) % k == i'; }

# memcheck and racecheck, side by side in shards: the tool's own CPU work bounds them (round 6:
# memcheck got through 80 of 94 CUDA tests in 100 s, racecheck 27 of 79 in 150 s, one process each)
stage_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then say "compute-sanitizer absent: sanitizer runs skipped"; return 0; fi
  local i ids all san=(compute-sanitizer --error-exitcode 9 --target-processes all)
  # The Triton split forward's stencil pass in every form its autotuning may pick: its shifted
  # loads of the stored E, masked at the map's border, at N = 197; a read past the allocation need
  # not fault on the GPU, memcheck sees it. Likewise the gather forward's halo tiles, whose last
  # rows and columns lie partly off the map. (Round 6: ~10 s a test, Triton's compiling under the tool)
  all=$(collect_ids -k "split_forms or gather_forms" tests/test_triton_gpu.py)
  for i in 0 1; do
    ids=$(shard 2 $i <<<"$all")
    # shellcheck disable=SC2086
    [ -n "$ids" ] && REFINER_TRITON_AUTOTUNE=0 spawn run_step "memcheck_triton_$i" 150 "${san[@]}" --tool memcheck \
      "$PY" -m pytest -q $ids
  done
  # The CUDA tests but those that start a child Python (under the tool, round 4's died of SIGSEGV);
  # racecheck instruments every shared-memory access, so the big maps and grids (marker "large")
  # stay out of it
  all=$(collect_ids -k "not subprocess" tests/test_compiled_cuda.py)
  for i in 0 1; do
    ids=$(shard 2 $i <<<"$all")
    # shellcheck disable=SC2086
    [ -n "$ids" ] && spawn run_step "memcheck_$i" 150 "${san[@]}" --tool memcheck "$PY" -m pytest -q $ids
  done
  all=$(collect_ids -m "not large" -k "not subprocess" tests/test_compiled_cuda.py)
  for i in 0 1 2 3; do
    ids=$(shard 4 $i <<<"$all")
    # shellcheck disable=SC2086
    [ -n "$ids" ] && spawn run_step "racecheck_$i" 150 "${san[@]}" --tool racecheck "$PY" -m pytest -q $ids
  done
  wait
}
spawn() { "$@" & }

bench_ops() {  # $1: seconds
  run_step bench_ops "$1" "$PY" benchmarks/bench_ops.py --out "$RES" --rep-ms 50
}
bench_models() {  # the checkpointed training rows are candidates: the time limit cuts them first
  run_step bench_models "$1" "$PY" benchmarks/bench_models.py --out "$RES" --grad-checkpointing
}

# One call of a 15-minute lease (~1.5 min of it goes to starting the machine): STAGE_BUDGET 480.
# The tests run with REFINER_TRITON_AUTOTUNE=0 (one fixed config per kernel): autotuned, the
# first round's test_triton_gpu.py compiled every config of every test shape and finished 9 tests
# in its 150 s. The benchmarks keep autotuning (their rows record max|err| against the reference,
# and bench_ops prints the configs that won). Round 4 (H200) timed the CUDA backend's tensor-core
# kernels (bench_ops_nvidia-h200_20261128T061823Z/T061928Z); its Triton rows were lost (the disk
# cache) and its time ran out before the training rows: those come first now.
stage_quick() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  MAX_JOBS=12 build & local build_pid=$!
  # the build (~130 s) runs beside the Triton GPU tests (bf16 numerics; test_triton_ops.py runs on
  # the CPU in CI), in parallel workers: the tests are bound by Triton compiling on the CPU
  REFINER_TRITON_AUTOTUNE=0 run_step pytest_triton_gpu 150 "$PY" -m pytest -q -ra "${XDIST[@]}" \
    --junitxml "$RES/pytest_triton_gpu.xml" tests/test_triton_gpu.py
  wait "$build_pid"
  describe_backends
  # (torch.export and dynamic-shape compiling trace the same fake impls as on the CPU, where CI runs
  # them: left to the "tests" stage, they would cost this step ~30 s of the GPU's time. Round 4 ran
  # these files and test_extremes.py in 59 s with 8 workers.)
  REFINER_TRITON_AUTOTUNE=0 run_step pytest_gpu 120 "$PY" -m pytest -q -ra "${XDIST_WIDE[@]}" \
    -k "not torch_export and not dynamic_shapes" \
    tests/test_compiled_cuda.py tests/test_extremes.py tests/test_bad_inputs.py tests/test_fused.py \
    tests/test_properties.py tests/test_cuda_entry_checks.py \
    tests/test_compiled_ops.py::test_extension_shares_the_shared_libstdcxx \
    tests/test_compiled_ops.py::test_integer_in_an_error_message_in_a_subprocess
  # A training step (the training targets: speed and peak memory against the reference): Triton with its
  # defaults (TF32 dots for bf16, the forward's Y3 kept), refine_train on the CUDA backend's tensor-core
  # passes, and the memory-lean setting. (Round 4, H200, before the fix of the defaults' backward: Y3
  # recomputed 1.24x the reference, the CUDA passes 1.36x.)
  run_step bench_models_train 100 "$PY" benchmarks/bench_models.py --out "$RES" --models refiner_vit_s \
    --img 224 --batch 256 --modes train --compile-backend skip --repeats 5 --fused-backends triton \
    --env-variants "triton:REFINER_TRITON_TRAIN_SAVE_Y3=0" --mixed-backends "triton,refine_train=cuda"
  # Inference in one run: Refiner-ViT-S on Triton, on CUDA (tensor cores) and the two per-op mixes, the
  # reference and timm ViT-S (the inference targets' rows)
  run_step bench_models_infer 90 "$PY" benchmarks/bench_models.py --out "$RES" \
    --models refiner_vit_s vit_small_patch16_224 --img 224 --batch 256 --modes infer --compile-backend skip \
    --repeats 5 --fused-backends triton cuda \
    --env-variants "triton:REFINER_TRITON_REFINE_DOT=bf16" "triton:REFINER_TRITON_REFINE_FWD=gather" \
    --mixed-backends "triton,refine_eval=cuda" "cuda,refine_eval=triton"
  # the refine ops on Triton, CUDA and the reference (N = 197 rows first, the time limit may cut N = 577)
  # with the other settings beside the defaults in the same runs (rows labelled triton[NAME=VALUE]):
  # refine_train with Y3 recomputed, with 3xTF32 dots; refine_eval's "tile" forward, its forward on bf16
  # dots; the softmax block's backward on bf16 dots. (Round 3 measured IEEE dots and the halo X2 passes:
  # slower.)
  run_step bench_ops 100 "$PY" benchmarks/bench_ops.py --out "$RES" --rep-ms 25 --n 197 577 --heads 12 \
    --head-dim 32 --dtypes bf16 --ops refine_eval refine_train softmax_block --backends triton cuda reference \
    --env-variants "triton:REFINER_TRITON_TRAIN_SAVE_Y3=0@refine_train" \
    "triton:REFINER_TRITON_TRAIN_DOT=tf32x3@refine_train" "triton:REFINER_TRITON_TRAIN_X2=gather@refine_train" \
    "triton:REFINER_TRITON_REFINE_FWD=tile@refine_eval" "triton:REFINER_TRITON_REFINE_FWD=gather@refine_eval" \
    "triton:REFINER_TRITON_REFINE_DOT=bf16@refine_eval" \
    "triton:REFINER_TRITON_SOFTMAX_BWD_DOT=bf16@softmax_block"
  # the switch values that were faster than the defaults and passed their GPU tests, recorded for this
  # GPU model in results/tuned_settings.json: copy it over refiner_kernels/tuned_settings.json and commit
  cp refiner_kernels/tuned_settings.json "$RES/tuned_settings.json"
  run_step decide_settings 20 "$PY" benchmarks/decide_settings.py "$RES" --junit "$RES/pytest_triton_gpu.xml" \
    --write "$RES/tuned_settings.json"
  # refine_train's time by pass (CUDA events around each pass's launches)
  run_step bench_train_passes 30 "$PY" benchmarks/bench_train_passes.py --out "$RES"
  # then, in what time is left: where a Refiner-ViT-S step's time goes. memcheck and racecheck are
  # the next call on the warm machine: STAGE_BUDGET=260 bash benchmarks/gpu_round.sh compiled (or sanitize)
  run_step profile_models $(( $(left) - 20 )) "$PY" benchmarks/profile_models.py --out "$RES" --batch 64 \
    --fused-backends triton
}

# The tests on a GPU in one call (~8 min) for a session with little device time; `compiled` is the
# second call on the warm machine. Beside the build: the Triton GPU tests (since round 5's 64/66, the
# two failing candidates and the padded/split kernels are gone; 180 s: the gather candidates added
# 22 tests). Then memcheck and racecheck of the
# CUDA tests, in shards, beside the compiled training-step tests (rounds 5 and 6 failed them on their
# tolerances, since derived from round 6's measurements); last the CUDA and cross-backend files.
stage_verify() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  MAX_JOBS=12 build & local build_pid=$!
  REFINER_TRITON_AUTOTUNE=0 run_step pytest_triton_gpu 180 "$PY" -m pytest -q -ra "${XDIST[@]}" \
    --junitxml "$RES/pytest_triton_gpu.xml" tests/test_triton_gpu.py
  wait "$build_pid"
  describe_backends
  stage_sanitize & local san_pid=$!
  REFINER_TRITON_AUTOTUNE=0 run_step verify_compiled_steps 150 "$PY" -m pytest -q -ra "${XDIST[@]}" \
    tests/test_fused.py -k "torch_compile_training_steps or reduce_overhead"
  wait "$san_pid"
  REFINER_TRITON_AUTOTUNE=0 run_step pytest_gpu $(( $(left) - 20 )) "$PY" -m pytest -q -ra "${XDIST_WIDE[@]}" \
    -k "not torch_export and not dynamic_shapes and not torch_compile_training_steps" \
    tests/test_compiled_cuda.py tests/test_extremes.py tests/test_bad_inputs.py tests/test_fused.py \
    tests/test_properties.py tests/test_cuda_entry_checks.py
}

# torch.compile (inductor) against the fused kernels, Triton only (no build). First the ops: the
# refine and softmax ops beside the reference ops compiled (round 6: the compiled reference trained
# 3.7x faster than the fused model; which ops does inductor do better?). Then Refiner-ViT-S: the
# fused model compiled (the compiler fuses the blocks' element-wise work around the fused ops), the
# reference compiled (a target's denominator) and, in training, the fused model with refine_train
# left to the compiler (a candidate: the time limit cuts it first), beside the eager rows; inference
# first.
stage_compiled() {
  run_step bench_ops_inductor 100 "$PY" benchmarks/bench_ops.py --out "$RES" --rep-ms 25 --n 197 --heads 12 \
    --head-dim 32 --dtypes bf16 --ops refine_eval refine_train softmax_block --backends triton reference \
    --no-memory --compile-backend inductor --env-variants "triton:REFINER_TRITON_REFINE_FWD=gather@refine_eval" \
    "triton:REFINER_TRITON_TRAIN_X2=gather@refine_train"
  local common=(--out "$RES" --img 224 --batch 256 --compile-backend inductor --repeats 5 --fused-backends triton)
  run_step bench_models_compiled_infer $(( $(left) * 2 / 5 )) "$PY" benchmarks/bench_models.py "${common[@]}" \
    --models vit_small_patch16_224 refiner_vit_s --modes infer --env-variants "triton:REFINER_TRITON_REFINE_FWD=gather"
  run_step bench_models_compiled_train $(( $(left) - 20 )) "$PY" benchmarks/bench_models.py "${common[@]}" \
    --models refiner_vit_s --modes train --mixed-backends "triton,refine_train=reference" \
    --env-variants "triton:REFINER_TRITON_TRAIN_X2=gather"
}

# Why the refine kernels run 10-20x above what their arithmetic and traffic need (round 4: refine_eval's
# forward 0.51 ms at B=32 N=197 bf16 for ~3 GFLOP): one ncu report per target, Triton first. The
# sections name the limiter (SpeedOfLight), the launch's registers and shared memory (LaunchStats,
# Occupancy) and where warps wait (WarpStateStats). torch's own kernels are filtered out by name.
stage_ncu() {
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
  if [ -z "$ncu" ]; then say "ncu not found: skipped"; return 0; fi
  local t sections=(--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats
                    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats)
  for t in refine_eval:fwd:triton refine_train:fwd+bwd:triton refine_eval:fwd:cuda refine_eval:fwd+bwd:triton \
           softmax_block:fwd:triton refine_train:fwd+bwd:cuda; do
    [[ $t == *:cuda ]] && build
    run_step "ncu_${t//[:+]/_}" 70 "$ncu" --clock-control none --profile-from-start off --kernel-name-base function \
      -k "regex:^(_|refine|softmax|train|tc_|row_softmax|dwconv)" --launch-count 60 "${sections[@]}" \
      "$PY" benchmarks/ncu_kernels.py --target "$t"
  done
}

env_info
if [ "$STAGE" = quick ] || [ "$STAGE" = verify ] || [ "$STAGE" = compiled ] || [ "$STAGE" = ncu ]; then BUDGET=${STAGE_BUDGET:-480}; else build; describe_backends; fi
case "$STAGE" in
  quick) stage_quick ;;
  verify) stage_verify ;;
  compiled) stage_compiled ;;
  ncu) stage_ncu ;;
  tests) stage_tests ;;
  sanitize) stage_sanitize ;;
  props) REFINER_HYPOTHESIS_PROFILE=long run_step properties_long $(( $(left) - 20 )) "$PY" -m pytest -q -ra \
           tests/test_properties.py ;;
  bench) bench_ops 200; run_step profile_models 90 "$PY" benchmarks/profile_models.py --out "$RES"
         bench_models $(( $(left) - 20 )) ;;
  bench-ops) bench_ops $(( $(left) - 20 )) ;;
  bench-models) bench_models $(( $(left) - 20 )) ;;
  *) say "unknown stage '$STAGE' (quick | compiled | ncu | verify | tests | sanitize | props | bench | bench-ops | bench-models)"; exit 2 ;;
esac
# Tables and targets into the summary (the JSON/PNGs are in the results tarball).
for f in "$LOGS"/bench_*.log "$LOGS"/profile_*.log; do
  [ -f "$f" ] && { echo "==== $(basename "$f")"; grep -v -E "it/s|s/it|case/s|row/s|s/case|s/row" "$f" | tail -n 120; } >>"$SUMMARY"
done
say "stage $STAGE done"
