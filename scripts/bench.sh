#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: `head4d bench` on whatever
# device is present. Extra arguments go to `head4d bench` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/head4d bench "$@"
