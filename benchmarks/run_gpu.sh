#!/usr/bin/env bash
# The one script for a lent GPU machine (no network there; its python3 has torch with
# CUDA, Triton, ninja, pybind11, pytest and pytest-benchmark; the CUDA toolkit brings
# compute-sanitizer). What its image lacks comes as wheels: run benchmarks/gpu_wheels.sh
# here first and carry .whl (installed below into .whl/site, on the Python path):
#
#   1. build      head4d._C with the CUDA kernels (pip install -e ., else build_ext --inplace);
#   2. sanitizer  compute-sanitizer --tool memcheck, then --tool racecheck, each over a
#                 small, fast subset of the cuda-backend tests: those SANITIZER_K selects,
#                 one parametrization per test function (benchmarks/sanitizer_subset.py;
#                 HEAD4D_SANITIZER_PER_TEST=N keeps N), each tool capped at
#                 SANITIZER_TIMEOUT seconds (a cap reached counts as a failed step);
#   3. tests      the whole test suite with HEAD4D_REQUIRE_GPU=1 (gpu tests fail instead
#                 of skipping) and HEAD4D_TEST_STRICT=1;
#   4. bench      head4d bench -> bench.json, and each op's CUDA backend order derived
#                 from it -> backend_order.json (the committed head4d/backend_order.json
#                 with the cuda entries replaced: copy it back over that file to adopt it);
#   5. gate       benchmarks/gate.py -> gate.json (fails while no baseline for this GPU is
#                 committed: its log then holds one built from this run).
# The emulated tests (the CUDA kernels on the CPU) are CI's; a GPU runs the real ones.
# Steps 2 and 3 run with HEAD4D_SYNC_LAUNCHES=1 (every kernel launch synchronizes and
# checks, so an asynchronous fault is reported by the op that caused it); 4 and 5 without.
#
# Files in $OUT (set on the device machine; default here: benchmarks/results/<date>). At
# most 8 come back from a device machine; this writes 7 (8 with HEAD4D_PYTEST_BENCH=1):
#   build.log           environment (nvidia-smi, versions) and the build
#   sanitizer.log       memcheck, then racecheck
#   tests.log           the test suite
#   bench.log           the bench table, then the gate's table and verdicts
#   bench.json, gate.json, backend_order.json
#   (pytest-bench.json  with HEAD4D_PYTEST_BENCH=1; its log goes into bench.log)
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default: cores), HEAD4D_GIT_COMMIT (the commit to record when the copy being
# run has no .git, as on the device machine), HEAD4D_STEPS (which steps, default
# "build sanitizer tests bench gate"; e.g. "build sanitizer tests" in one call and
# "bench gate" with HEAD4D_STEPS and a carried build in the next), HEAD4D_SKIP_BUILD=1
# (the same as leaving build out: use the head4d._C already there, e.g. carried along),
# SANITIZER_K (pytest -k expression of the sanitizer subset), SANITIZER_TIMEOUT (seconds
# per sanitizer tool, default 120), BENCH_ARGS (extra `head4d bench` arguments, e.g.
# --full), GATE_ARGS (extra gate arguments, e.g. --quick).
# Exit code: non-zero if any step failed (later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Wheels carried along in .whl/ (benchmarks/gpu_wheels.sh downloads them where PyPI is
# reachable): packages the GPU image lacks, installed offline beside it.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$ROOT/.whl/site"
fi
export HEAD4D_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${HEAD4D_GIT_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export HEAD4D_GIT_COMMIT=$(git rev-parse HEAD)
fi
STEPS=" ${HEAD4D_STEPS:-build sanitizer tests bench gate} "
[ "${HEAD4D_SKIP_BUILD:-0}" = 1 ] && STEPS=${STEPS// build / }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
# The sanitizer subset: the cuda-backend tests less the slow ones (gradcheck, stress and
# full-size shapes), one parametrization each (about 60 tests); under memcheck each launch
# runs tens of times slower.
SANITIZER_K=${SANITIZER_K:-"cuda and not triton and not gradcheck and not stress and not very_long and not many_points and not portrait4d_shapes and not companion_mesh_grid"}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-120}
t0=$(date +%s)
declare -A RC

step() {  # step NAME LOG COMMAND...: run, append to LOG, remember the exit code
  local name=$1 log=$2; shift 2
  local s=$(date +%s)
  echo "== $name: $*" | tee -a "$log"
  "$@" >> "$log" 2>&1
  RC[$name]=$?
  echo "   rc=${RC[$name]} in $(( $(date +%s) - s )) s (log: $log)" | tee -a "$log"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${HEAD4D_GIT_COMMIT:-unknown}"
  echo "steps:${STEPS%% }"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$OUT/build.log"
cat "$OUT/build.log"

build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . && return 0
  echo "pip install -e . failed; building in place instead"
  "$PY" setup.py build_ext --inplace
}
if wanted build; then
  step build "$OUT/build.log" build
else
  echo "== build: skipped (using the head4d._C already there)" | tee -a "$OUT/build.log"
fi
"$PY" -c "import head4d._C as c; print('head4d._C CUDA kernels:', c.with_cuda())" 2>&1 | tee -a "$OUT/build.log"

sanitize() {  # sanitize TOOL: one compute-sanitizer tool over the subset, capped in time
  local tool=$1 sanitizer
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"; return 127
  fi
  # No caching allocator under memcheck: each tensor is its own allocation, so an access
  # past a tensor's end lands outside any allocation and is reported.
  env HEAD4D_SYNC_LAUNCHES=1 HEAD4D_TEST_STRICT=1 HEAD4D_REQUIRE_GPU=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    PYTHONPATH="$ROOT/benchmarks:$PYTHONPATH" \
    timeout --signal=INT --kill-after=15 "$SANITIZER_TIMEOUT" \
    "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 50 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider -p sanitizer_subset -m "not emulated" -k "$SANITIZER_K" tests
  local rc=$?
  [ $rc = 124 ] && echo "TIMED OUT after ${SANITIZER_TIMEOUT} s: narrow SANITIZER_K"
  [ $rc = 86 ] && echo "compute-sanitizer $tool REPORTED ERRORS (see above)"
  return $rc
}
if wanted sanitizer; then
  : > "$OUT/sanitizer.log"
  step memcheck "$OUT/sanitizer.log" sanitize memcheck
  step racecheck "$OUT/sanitizer.log" sanitize racecheck
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|TIMED OUT|REPORTED|passed|failed" "$OUT/sanitizer.log" | tail -n 8
fi

if wanted tests; then
  : > "$OUT/tests.log"
  step tests "$OUT/tests.log" env HEAD4D_REQUIRE_GPU=1 HEAD4D_TEST_STRICT=1 HEAD4D_SYNC_LAUNCHES=1 \
    "$PY" -m pytest -q -ra -m "not emulated" tests
  tail -n 5 "$OUT/tests.log"
fi

unset HEAD4D_SYNC_LAUNCHES  # timings without the per-launch synchronization
if wanted bench; then
  : > "$OUT/bench.log"
  cp head4d/backend_order.json "$OUT/backend_order.json"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  step bench "$OUT/bench.log" "$PY" -m head4d.cli bench ${BENCH_ARGS:-} --json "$OUT/bench.json" \
    --write-order "$OUT/backend_order.json"
fi
if wanted gate; then
  # shellcheck disable=SC2086
  step gate "$OUT/bench.log" "$PY" benchmarks/gate.py ${GATE_ARGS:-} --report "$OUT/gate.json"
fi
if [ "${HEAD4D_PYTEST_BENCH:-0}" = 1 ]; then
  step pytest_bench "$OUT/bench.log" "$PY" -m pytest -q benchmarks/bench_triplanes.py \
    --benchmark-only --benchmark-json "$OUT/pytest-bench.json"
fi

echo
echo "================ summary ($(( $(date +%s) - t0 )) s) ================"
if [ -f "$OUT/bench.log" ]; then
  grep -E "^(device|versions|floor) " "$OUT/bench.log"
  sed -n '/^op  /,/^$/{p;/^$/q}' "$OUT/bench.log"  # the bench's table (the gate's repeats it)
  sed -n '/^backend order/,/^$/p' "$OUT/bench.log"
  grep -E "^[^ ]+/(fwd|fwd\+bwd)/|GATE|gate |No baseline" "$OUT/bench.log"
fi
ran=()
wanted build && ran+=(build)
wanted sanitizer && ran+=(memcheck racecheck)
for name in tests bench gate; do wanted "$name" && ran+=("$name"); done
status=0
for name in "${ran[@]}"; do
  echo "step $name: rc=${RC[$name]:-not run}"
  [ "${RC[$name]:-1}" = 0 ] || status=1
done
count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
echo "results in $OUT ($count files)"
[ "$count" -le 8 ] || echo "WARNING: $count files in $OUT; a device machine returns at most 8"
exit $status
