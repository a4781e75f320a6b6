#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, moelab, pytest, distributed" >/dev/null 2>&1; then
  python -m pip install --quiet --disable-pip-version-check torch==2.13.0
  python -m pip install --quiet --disable-pip-version-check -e ".[test,dask]"
fi
python -m pytest -q -p no:cacheprovider "$@"
