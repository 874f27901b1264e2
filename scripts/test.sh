#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Without a GPU, Triton kernels
# run in the interpreter and `gpu`-marked tests are skipped; HEAD4D_TEST_STRICT=1
# makes a missing extension or Triton a failure rather than a skip.
# Extra arguments go to pytest (e.g. scripts/test.sh -k triplanes -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HEAD4D_TEST_STRICT=1 exec .venv/bin/python -m pytest tests "$@"
