#!/usr/bin/env bash
# Sets up a development environment from nothing, idempotently:
#   .venv/ with torch, Triton and the test tools, head4d installed editable,
#   and the compiled extensions built in place: head4d._C (CPU kernels always, CUDA
#   kernels when torch has CUDA and nvcc is found) and head4d._C_emulated (the CUDA
#   kernels compiled as host C++ for the emulated tests; needs no nvcc).
#
# Environment:
#   HEAD4D_PYTHON      the interpreter to make the venv with (default: python3)
#   HEAD4D_TORCH_SPEC  which torch to install (default: torch==2.14.1, a CUDA 13.0
#                      build: it runs on CPU-only machines too, and lets nvcc compile
#                      the CUDA kernels here)
#   HEAD4D_CUDA        0|1 force the CUDA kernels off or on (default: auto)
#   HEAD4D_EMULATION   0|1 build head4d._C_emulated too (default: 1)
#   TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA kernels (default "8.0;9.0"; CI
#                      builds "9.0" alone)
#   MAX_JOBS           parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${HEAD4D_PYTHON:-python3}
TORCH_SPEC=${HEAD4D_TORCH_SPEC:-torch==2.14.1}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

deps_stamp="$VENV/.head4d-deps"
deps_wanted="$TORCH_SPEC torchvision numpy safetensors einops lpips tensorboard triton pytest pytest-benchmark nvtx ninja pybind11 setuptools wheel"
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$deps_wanted" ]; then
  echo "[setup] installing $deps_wanted"
  "$VPY" -m pip install -q --upgrade pip
  # triton comes with torch's CUDA builds (the version torch pins); ask for it only if absent
  "$VPY" -m pip install -q $TORCH_SPEC torchvision numpy safetensors einops lpips tensorboard pytest pytest-benchmark nvtx ninja pybind11 setuptools wheel
  "$VPY" -c "import triton" 2>/dev/null || "$VPY" -m pip install -q triton
  echo "$deps_wanted" > "$deps_stamp"
fi

if ! "$VPY" -c "import importlib.metadata as m; m.version('head4d')" >/dev/null 2>&1; then
  echo "[setup] installing head4d (editable)"
  HEAD4D_SKIP_EXTENSION=1 "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
fi

echo "[setup] building head4d._C (incremental)"
start=$(date +%s)
# The whole compiler output goes to a log; its noise (progress lines, setuptools chatter)
# is filtered from what is shown. A failed compile stops here with the log's tail, so a
# stale head4d._C from an earlier build is never the one tested.
build_log="$VENV/head4d-build.log"
build_rc=0
HEAD4D_EMULATION=${HEAD4D_EMULATION:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VPY" setup.py -q build_ext --inplace > "$build_log" 2>&1 || build_rc=$?
if [ "$build_rc" -ne 0 ]; then
  echo "[setup] ERROR: building head4d._C failed (exit code $build_rc); last 60 lines of $build_log:" >&2
  tail -n 60 "$build_log" >&2
  exit "$build_rc"
fi
grep -vE "^\[[0-9]+/[0-9]+\] |^(copying|running|creating)|Wc\+\+20|SetuptoolsDeprecationWarning|^\s*!!|^\s*\*+$" \
  "$build_log" || true  # exit code 1: nothing left to show
"$VPY" -c "import head4d._C as c; print('[setup] head4d._C ready, CUDA kernels:', c.with_cuda())"
echo "[setup] build step took $(( $(date +%s) - start )) s"
