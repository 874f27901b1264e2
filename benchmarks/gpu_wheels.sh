#!/usr/bin/env bash
# Downloads, on this machine (which reaches PyPI), the wheels of the Python packages that
# the tests and benchmarks need and the GPU machine's image lacks, into .whl/ (kept out of
# git through .git/info/exclude). Carry .whl with the call that runs benchmarks/run_gpu.sh:
# run_gpu.sh installs whatever .whl/ holds before it builds.
#
# The GPU image (Python 3.12, torch 2.11, Triton 3.6) already has einops, safetensors,
# tensorboard, torchvision, numpy, scipy, tqdm, pytest and pytest-benchmark; it lacks
#   lpips   LPIPS's linear heads, for the reconstructor's training tests and bench case
#           (a pure-Python wheel that carries its weights).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl lpips==0.1.4
ls -la .whl
