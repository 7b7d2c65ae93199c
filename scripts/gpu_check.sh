#!/usr/bin/env bash
# Build meldkit on a bare GPU machine and run what needs the GPU, in one call of the device tool:
#   scripts/gpu_check.sh OUTDIR [STEP...]  (steps: build info tests memcheck profile bench; default all)
#
# Sized for a 15-minute device session (machine start included): the steps share one time budget,
# GPU_BUDGET seconds [540], so the whole call ends inside a 600 s command limit with a summary,
# however far it got; a step that would start with too little time left is skipped (and says so).
# Rerun only what is missing with the STEP arguments, on the same warm machine (the build is kept).
#
# Uses what the machine has (torch, pybind11, cmake, ninja, pytest, transformers, peft; nothing is
# downloaded, diffusers is absent): `pip install --no-build-isolation -e .`, then the CUDA tests
# (MELDKIT_BACKEND=native, so a silent fallback to the reference fails), a short memcheck, and the
# GPU benchmarks at the sizes of the issues' targets, most wanted first, for as long as the budget
# lasts (a second call `scripts/gpu_check.sh OUTDIR bench` runs them alone).
#
# Everything does not fit one call: on an H200 (2026-11-29) the build took 84 s, the CUDA tests
# 212 s in 4 workers, memcheck more than its 120 s, the benchmarks about 300 s. Within 15 minutes
# of device time (the machine's start, a minute or more, included), call it twice back to back,
# the second within the machine's 30 s of warmth:
#   GPU_BUDGET=470 scripts/gpu_check.sh OUTDIR build info tests profile   [memcheck when CUDA
#   GPU_BUDGET=330 scripts/gpu_check.sh OUTDIR bench                        code changed]
#
# OUTDIR gets at most 8 files (what the device tool returns): summary.txt (machine, versions,
# `meldkit info`, step results), build.log (with ptxas's register/spill report), tests.log,
# junit.xml, memcheck.log, ncu.log (Nsight Compute's per-kernel metrics of bench/gpu_profile.py,
# CSV lines among ncu's own), bench.log (every benchmark's output) and bench.json (their JSON rows).
#
# Narrow or widen with (defaults in brackets):
#   GPU_BUDGET    seconds for all steps together [540]
#   GPU_TESTS     pytest arguments of the tests step [tests -m cuda]
#   GPU_MEMCHECK  pytest arguments run under compute-sanitizer memcheck
#                 [tests/ops/test_blend.py tests/ops/test_merge.py tests/ops/test_routed_lora.py
#                  -m cuda -k "not compile and not graph"]
#   GPU_XDIST     pytest-xdist workers of the tests step, where xdist is installed (0: none) [4]
#   GPU_PROFILE   bench/gpu_profile.py arguments of the profile step, e.g. --case ties_n8 []
#   BENCH_OPS     benchmarks, in order [exde twin routed_lora_layer logit_fusion merge dlf
#                 call_overhead routed_lora weighted_sum goat_compile]
#   BENCH_ARGS    extra `meldkit bench` arguments, e.g. --quick (tiny cases: a smoke test) []
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [STEP...]}
shift
STEPS=" ${*:-build info tests memcheck profile bench} "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BUDGET=${GPU_BUDGET:-540}
T0=$(date +%s)
SUMMARY=()

remaining() { echo $((BUDGET - ($(date +%s) - T0))); }

finish() {
  echo
  echo "== summary ($(($(date +%s) - T0))s of ${BUDGET}s; files in $OUT)"
  printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
  [ -f "$OUT/bench.log" ] && grep -E "^\| |x the |GB/s" "$OUT/bench.log" | tail -n 40
}
trap 'SUMMARY+=("interrupted at $(($(date +%s) - T0))s"); finish; exit 130' INT TERM

# step NAME KEY LIMIT LOG CMD...: run CMD under min(LIMIT, the budget left), its output appended
# to LOG; pytest gets SIGINT first, so it still prints its summary and writes its JUnit file.
step() {
  local name=$1 key=$2 limit=$3 log=$4
  shift 4
  if [[ "$STEPS" != *" $key "* ]]; then
    SUMMARY+=("$(printf '%-28s %s' "$name" skipped)")
    return 0
  fi
  local left
  left=$(remaining)
  ((limit > left - 5)) && limit=$((left - 5))
  if ((limit < 20)); then
    SUMMARY+=("$(printf '%-28s %s' "$name" "not run (budget spent)")")
    return 1
  fi
  local t
  t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t))
  tail -n 3 "$log" | sed 's/^/   /'
  local result=ok
  ((rc == 124 || rc == 130 || rc == 137)) && result="timed out"
  ((rc != 0)) && [ "$result" = ok ] && result="rc=$rc"
  SUMMARY+=("$(printf '%-28s %-10s %5ss' "$name" "$result" "$took")")
  return $rc
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  # A device machine gets the working tree without .git: the caller can pass MELDKIT_COMMIT.
  echo "commit: ${MELDKIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  nvcc --version 2>&1 | tail -n 1
} | tee "$OUT/summary.txt"

# -v keeps ptxas's register/spill report in the log.
if ! step build build 240 "$OUT/build.log" env CMAKE_ARGS="-DMELDKIT_CUDA_RESOURCE_USAGE=ON" \
  $PY -m pip install -v --no-build-isolation --no-deps -e . && [[ "$STEPS" == *" build "* ]]; then
  finish
  exit 1
fi
if [[ "$STEPS" == *" info "* ]]; then
  $PY -m meldkit info >>"$OUT/summary.txt" 2>&1 || SUMMARY+=("info                         failed")
fi

PYTEST=(-q -rfEs -p no:cacheprovider)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
# The suite is mostly launch- and host-bound: several worker processes share the one GPU (a file's
# tests stay in one worker, so a module's fixtures are built once).
XDIST=(-n "${GPU_XDIST:-4}" --dist loadfile)
$PY -c "import xdist" 2>/dev/null && [ "${GPU_XDIST:-4}" != 0 ] || XDIST=()
read -r -a TEST_ARGS <<<"${GPU_TESTS:-tests -m cuda}"
step tests tests 300 "$OUT/tests.log" env MELDKIT_BACKEND=native $PY -m pytest "${TEST_ARGS[@]}" \
  "${PYTEST[@]}" "${XDIST[@]}" --junitxml="$OUT/junit.xml"

# memcheck: torch's caching allocator off, so that a write past a tensor lands outside any
# allocation; compute-sanitizer does not run on every machine kind (gVisor H200s refuse it).
if [[ "$STEPS" == *" memcheck "* ]] && command -v compute-sanitizer >/dev/null \
  && compute-sanitizer --version >/dev/null 2>&1; then
  MEMCHECK=${GPU_MEMCHECK:-tests/ops/test_blend.py tests/ops/test_merge.py tests/ops/test_routed_lora.py -m cuda -k "not compile and not graph"}
  step memcheck memcheck 120 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    MELDKIT_BACKEND=native bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest $MEMCHECK -q -x -p no:cacheprovider"
elif [[ "$STEPS" == *" memcheck "* ]]; then
  SUMMARY+=("memcheck                     not run (no usable compute-sanitizer)")
fi

# profile: Nsight Compute over one call of each kernel furthest from its target, clocks left
# alone; the sections say whether DRAM or an SM pipe bounds it, and at what occupancy.
if [[ "$STEPS" == *" profile "* ]] && command -v ncu >/dev/null; then
  read -r -a PROFILE_ARGS <<<"${GPU_PROFILE:-}"
  step profile profile 120 "$OUT/ncu.log" env MELDKIT_BACKEND=native ncu --profile-from-start off \
    --clock-control none --launch-count 60 --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --csv --page details $PY bench/gpu_profile.py "${PROFILE_ARGS[@]}"
elif [[ "$STEPS" == *" profile "* ]]; then
  SUMMARY+=("profile                      not run (no ncu)")
fi

read -r -a EXTRA <<<"${BENCH_ARGS:-}"
BJ="$OUT/bench.json"
BL="$OUT/bench.log"
for op in ${BENCH_OPS:-exde twin routed_lora_layer logit_fusion merge dlf call_overhead routed_lora weighted_sum goat_compile}; do
  run=(env MELDKIT_BACKEND=native)
  case $op in
    call_overhead) # each op's fixed per-call cost; direct eager calls vs torch.library's dispatch
      step "bench-$op" bench 60 "$BL" "${run[@]}" $PY bench/bench_call_overhead.py --device cuda \
        --json "$BJ"
      step "bench-${op}_dispatch" bench 60 "$BL" "${run[@]}" $PY bench/bench_call_overhead.py \
        --device cuda --compare dispatch --json "$BJ" ;;
    exde) # ExDe's per-step blend vs a per-tensor loop (issue 7)
      step "bench-$op" bench 90 "$BL" "${run[@]}" $PY bench/bench_exde.py --device cuda --json "$BJ" ;;
    twin) # TwinModel vs the per-sample rebuild and the shared model (issue 6), with op tables
      step "bench-$op" bench 90 "$BL" "${run[@]}" $PY bench/bench_twin.py --device cuda \
        --rebuild-samples 8 --profile --json "$BJ" ;;
    routed_lora_layer) # the GOAT layer against the base linear (issue 4), without and with dropout
      step "bench-$op" bench 90 "$BL" "${run[@]}" $PY bench/bench_routed_lora.py --device cuda \
        --dtype bf16 --tokens 8192 --dim 4096 --json "$BJ"
      step "bench-$op-dropout" bench 90 "$BL" "${run[@]}" $PY bench/bench_routed_lora.py \
        --device cuda --dtype bf16 --tokens 8192 --dim 4096 --dropout 0.05 --json "$BJ" ;;
    dlf) # the DLF solver against its floors, and its share of a decoding step (issue 5); random
      # Llamas big enough that the step is not all launch cost (SmolLM2 is not on the machine)
      step "bench-$op" bench 150 "$BL" "${run[@]}" $PY bench/bench_logit_fusion.py --device cuda \
        --tiny --large 16x2048 --small 8x1024 --json "$BJ" ;;
    goat_compile) # a GOAT stack's training step with dropout, eager vs torch.compile (issue 4)
      step "bench-$op" bench 90 "$BL" "${run[@]}" $PY bench/bench_goat_compile.py --device cuda \
        --dtype bf16 --layers 8 --dim 2048 --tokens 4096 --experts 8 --rank 32 --json "$BJ" ;;
    *)
      step "bench-$op" bench 120 "$BL" "${run[@]}" $PY -m meldkit bench --op "$op" --device cuda \
        "${EXTRA[@]}" --json "$BJ" ;;
  esac
done

finish
! grep -qE "rc=|timed out|interrupted" "$OUT/summary.txt"
