#!/usr/bin/env bash
# The README's main job: set up (idempotent, see scripts/_setup.sh), then fit a 3-expert softmax-gated
# Gaussian MoE to the bundled motorcycle data and write the summary, params.json and fit.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
"$PY" -m moelab fit mcycle --x times --y accel --experts 3 --seed 0 --out out/mcycle "$@"
