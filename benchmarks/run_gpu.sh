#!/usr/bin/env bash
# The one script for a lent GPU machine (no network there; its python3 has torch with
# CUDA, Triton, ninja, pybind11, pytest and pytest-benchmark):
#
#   1. build head4d._C with the CUDA kernels (pip install -e ., else build_ext --inplace);
#   2. run the whole test suite, GPU tests included (HEAD4D_REQUIRE_GPU=1: a `gpu` test
#      fails, not skips, when torch sees no CUDA device);
#   3. head4d bench  -> $OUT/bench.json;
#   4. the gate      -> $OUT/gate.json (fails while no baseline for this GPU is committed:
#      its log then holds one built from this run);
# then print a short table. Logs go to $OUT (set on the device machine; default here:
# benchmarks/results/<date>). At most 8 files come back from the device machine; this
# writes 7 (8 with HEAD4D_PYTEST_BENCH=1, which adds the pytest-benchmark suite).
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default: cores), HEAD4D_GIT_COMMIT (the commit to record when the copy
# being run has no .git, as on the device machine), HEAD4D_SKIP_BUILD=1 (use the
# head4d._C already there, e.g. carried along).
# Exit code: non-zero if any step failed (later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HEAD4D_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${HEAD4D_GIT_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export HEAD4D_GIT_COMMIT=$(git rev-parse HEAD)
fi
t0=$(date +%s)
declare -A RC

step() {  # step NAME LOG COMMAND...: run, log, remember the exit code
  local name=$1 log=$2; shift 2
  local s=$(date +%s)
  echo "== $name: $*"
  "$@" > "$log" 2>&1
  RC[$name]=$?
  echo "   rc=${RC[$name]} in $(( $(date +%s) - s )) s (log: $log)"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${HEAD4D_GIT_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$OUT/env.txt"
cat "$OUT/env.txt"

build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . && return 0
  echo "pip install -e . failed; building in place instead"
  "$PY" setup.py build_ext --inplace
}
if [ "${HEAD4D_SKIP_BUILD:-0}" = 1 ]; then
  echo "== build: skipped (HEAD4D_SKIP_BUILD=1)"; RC[build]=0
else
  step build "$OUT/build.log" build
fi
"$PY" -c "import head4d._C as c; print('head4d._C CUDA kernels:', c.with_cuda())" 2>&1 | tee -a "$OUT/build.log"

step tests "$OUT/tests.log" env HEAD4D_TEST_STRICT=1 HEAD4D_REQUIRE_GPU=1 "$PY" -m pytest -q -ra tests
tail -n 5 "$OUT/tests.log"
step bench "$OUT/bench.log" "$PY" -m head4d.cli bench --json "$OUT/bench.json"
step gate "$OUT/gate.log" "$PY" benchmarks/gate.py --report "$OUT/gate.json"
if [ "${HEAD4D_PYTEST_BENCH:-0}" = 1 ]; then
  step pytest_bench "$OUT/pytest-bench.log" "$PY" -m pytest -q benchmarks/bench_triplanes.py \
    --benchmark-only --benchmark-json "$OUT/pytest-bench.json"
  rm -f "$OUT/pytest-bench.log"  # keep to 8 files; the JSON holds the numbers
fi

echo
echo "================ summary ($(( $(date +%s) - t0 )) s) ================"
grep -E "^(device|versions|floor) " "$OUT/bench.log"
sed -n '/^op  /,/^$/p' "$OUT/bench.log"
grep -E "^[^ ]+/(fwd|fwd\+bwd)/|GATE|gate |No baseline" "$OUT/gate.log"
status=0
for name in build tests bench gate; do
  echo "step $name: rc=${RC[$name]:-not run}"
  [ "${RC[$name]:-1}" = 0 ] || status=1
done
echo "results in $OUT"
exit $status
