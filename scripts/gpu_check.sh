#!/usr/bin/env bash
# Build meldkit on a bare GPU machine and run everything that needs the GPU, in one call:
#   scripts/gpu_check.sh OUTDIR [STEP...]      (steps: build info tests memcheck bench; default all)
# Uses what the machine already has (torch, pybind11, cmake, ninja, pytest; nothing is downloaded):
# builds with `pip install --no-build-isolation -e .`, runs the whole test suite with CUDA present
# (MELDKIT_BACKEND=native, so a silent fallback to the reference fails), then the CUDA tests under
# compute-sanitizer memcheck, then the GPU benchmarks. Logs, JUnit XML and benchmark JSON go to
# OUTDIR (one log per step, JUnit XML, one JSON per benchmarked op); a summary table is printed
# last. Budget: under 8 minutes on an H100 box.
# Narrow a short device session with (defaults in brackets):
#   GPU_TESTS   pytest arguments of the tests step [tests]
#   GPU_MEMCHECK  pytest arguments run under memcheck [tests/ops -m cuda -k "not compile and not graph"]
#   BENCH_OPS   ops benchmarked, one step (and JSON file) each [call_overhead weighted_sum
#               routed_lora logit_fusion merge routed_lora_layer twin exde]
#   BENCH_ARGS  extra `meldkit bench` arguments, e.g. --quick []
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [STEP...]}
shift
STEPS=" ${*:-build info tests memcheck bench} "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY=()

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, log to OUTDIR/NAME.log, record the result.
step() {
  local name=$1 limit=$2
  shift 2
  local key=$name
  [[ $name == bench-* ]] && key=bench
  if [[ "$STEPS" != *" $key "* ]]; then
    SUMMARY+=("$(printf '%-10s %-6s' "$name" skipped)")
    return 0
  fi
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t))
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
  SUMMARY+=("$(printf '%-10s %-6s %5ss' "$name" "$([ $rc -eq 0 ] && echo ok || echo "rc=$rc")" "$took")")
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

# -v keeps ptxas's register/spill warnings in the log.
if step build 240 env CMAKE_ARGS="-DMELDKIT_CUDA_RESOURCE_USAGE=ON" \
  $PY -m pip install -v --no-build-isolation --no-deps -e .; then
  step info 60 $PY -m meldkit info --json
  read -r -a TEST_ARGS <<<"${GPU_TESTS:-tests}"
  step tests 300 env MELDKIT_BACKEND=native $PY -m pytest "${TEST_ARGS[@]}" -q -rs \
    -p no:cacheprovider --junitxml="$OUT/junit.xml"
  if command -v compute-sanitizer >/dev/null; then
    MEMCHECK=${GPU_MEMCHECK:-tests/ops -m cuda -k "not compile and not graph"}
    step memcheck 120 bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 \
      $PY -m pytest $MEMCHECK -q -p no:cacheprovider"
  else
    SUMMARY+=("memcheck   skipped (no compute-sanitizer)")
  fi
  read -r -a EXTRA <<<"${BENCH_ARGS:-}"
  for op in ${BENCH_OPS:-call_overhead weighted_sum routed_lora logit_fusion merge routed_lora_layer twin exde}; do
    if [ "$op" = call_overhead ]; then  # each op's fixed per-call cost: C exchange vs
      # __dlpack__, then direct eager calls vs torch.library's dispatch
      step "bench-$op" 90 env MELDKIT_BACKEND=native $PY bench/bench_call_overhead.py \
        --device cuda --json "$OUT/bench-$op.json"
      step "bench-${op}_dispatch" 90 env MELDKIT_BACKEND=native $PY bench/bench_call_overhead.py \
        --device cuda --compare dispatch --json "$OUT/bench-${op}_dispatch.json"
      continue
    fi
    if [ "$op" = exde ]; then  # ExDe's per-step blend vs a per-tensor loop (issue 7)
      step "bench-$op" 120 env MELDKIT_BACKEND=native $PY bench/bench_exde.py --device cuda \
        --json "$OUT/bench-$op.json"
      continue
    fi
    if [ "$op" = twin ]; then  # TwinModel vs the per-sample rebuild and the shared model (issue 6)
      step "bench-$op" 120 env MELDKIT_BACKEND=native $PY bench/bench_twin.py --device cuda \
        --rebuild-samples 32 --json "$OUT/bench-$op.json"
      continue
    fi
    if [ "$op" = routed_lora_layer ]; then  # the GOAT layer against the base linear (issue 4)
      step "bench-$op" 120 env MELDKIT_BACKEND=native $PY bench/bench_routed_lora.py \
        --device cuda --dtype bf16 --tokens 8192 --dim 4096 --json "$OUT/bench-$op.json"
      # and at GOAT's training dropout (0.05), which takes the GEMM path with dropout on CUDA
      step "bench-$op-dropout" 120 env MELDKIT_BACKEND=native $PY bench/bench_routed_lora.py \
        --device cuda --dtype bf16 --tokens 8192 --dim 4096 --dropout 0.05 \
        --json "$OUT/bench-$op-dropout.json"
      continue
    fi
    step "bench-$op" 150 env MELDKIT_BACKEND=native $PY -m meldkit bench --op "$op" --device cuda \
      "${EXTRA[@]}" --json "$OUT/bench-$op.json"
  done
fi

echo
echo "== summary ($(($(date +%s) - T0))s total; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
for log in "$OUT"/bench-*.log; do [ -f "$log" ] && tail -n 12 "$log"; done
! grep -q "rc=" "$OUT/summary.txt"
