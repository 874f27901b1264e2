#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite in two processes:
#   1. every test but the emulated ones: the reference, the CPU kernels, the Triton
#      kernels (in the interpreter without a GPU), and the `gpu`-marked tests when a GPU
#      is present (skipped otherwise);
#   2. the `emulated` tests: the CUDA kernels, host launchers included, run on the CPU
#      through head4d's emulation of CUDA (backend `cuda_emulated`, head4d._C_emulated,
#      built with AddressSanitizer, whose runtime must be preloaded).
# The emulated run captures output at the Python level only (--capture=sys), so that an
# AddressSanitizer report, written by the C runtime just before it aborts the run, reaches
# the terminal.
# HEAD4D_TEST_STRICT=1: a missing extension, Triton or emulated module fails a test
# instead of skipping it. Extra arguments go to both pytest runs
# (e.g. scripts/test.sh -k triplanes -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HEAD4D_TEST_STRICT=1

# pytest's exit code 5 (nothing collected) is an error unless the caller filtered tests
run_pytest() {
  local rc=0
  "$@" || rc=$?
  if [ "$rc" = 5 ] && [ "$FILTERED" = 1 ]; then rc=0; fi
  return "$rc"
}
FILTERED=0  # a selection (-k, -m, a file or test id) may leave one of the two runs empty
for arg in "$@"; do
  case "$arg" in -k|-m|--deselect|-k*|*.py|*::*|tests/*) FILTERED=1 ;; esac
done

echo "== tests (CPU kernels, Triton, GPU tests when a GPU is present)"
run_pytest .venv/bin/python -m pytest tests -m "not emulated" "$@"

echo "== emulated CUDA kernels (HEAD4D_CUDA_EMULATION=1, AddressSanitizer)"
# the ASan runtime first, and the C++ runtime beside it so that ASan's exception
# interceptors find it (the interpreter itself does not link it)
preload="$(${CC:-gcc} -print-file-name=libasan.so) $(${CC:-gcc} -print-file-name=libstdc++.so)"
HEAD4D_CUDA_EMULATION=1 LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  run_pytest .venv/bin/python -m pytest tests -m emulated --capture=sys "$@"
