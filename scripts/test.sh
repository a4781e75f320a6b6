#!/usr/bin/env bash
# The README's test command: set up (idempotent, see scripts/_setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MOELAB_NEED_TEST=1
source scripts/_setup.sh
"$PY" -m pytest -q -p no:cacheprovider "$@"
