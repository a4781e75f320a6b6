#!/usr/bin/env bash
# The README's main job: set up (idempotent), then fit a 3-expert softmax-gated
# Gaussian MoE to the bundled motorcycle data and write the summary, params.json and fit.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, moelab" >/dev/null 2>&1; then
  python -m pip install --quiet --disable-pip-version-check torch==2.13.0
  python -m pip install --quiet --disable-pip-version-check -e .
fi
moelab fit mcycle --x times --y accel --experts 3 --seed 0 --out out/mcycle "$@"
