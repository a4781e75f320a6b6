# Sourced by the README's scripts: sets PY to a Python that has torch, moelab (and pytest when
# MOELAB_NEED_TEST=1), installing them once if needed. Order: an active virtual environment; else
# ./.venv if it exists; else `python` / `python3` if it already has moelab installed; else a new
# ./.venv made with `python3 -m venv` (a stock machine's system Python may refuse pip installs).
# Torch is installed as torch==2.13.0 first (a CPU build from this machine's disk; any other spec
# downloads a multi-GB CUDA build).

_moelab_has() {  # _moelab_has PYTHON: the packages import (isolated mode: not the clone's folder)
  local mods="torch, moelab"
  [ "${MOELAB_NEED_TEST:-0}" = 1 ] && mods="$mods, pytest"
  (cd / && "$(command -v "$1")" -I -c "import $mods" >/dev/null 2>&1)
}

_moelab_base_python() {
  local c
  for c in python python3; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  echo "moelab: neither 'python' nor 'python3' is on PATH; install Python 3.10+ (Debian: apt-get install python3 python3-venv)" >&2
  return 1
}

if [ -n "${VIRTUAL_ENV:-}" ] && command -v python >/dev/null 2>&1; then
  PY=python
elif [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
else
  PY=$(_moelab_base_python) || exit 127
  if ! _moelab_has "$PY"; then
    echo "moelab: creating a virtual environment in .venv (python3 -m venv .venv)" >&2
    if ! "$PY" -m venv .venv; then
      echo "moelab: '$PY -m venv .venv' failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv) or activate an environment first" >&2
      exit 1
    fi
    PY="$PWD/.venv/bin/python"
  fi
fi

if ! _moelab_has "$PY"; then
  extra=""
  [ "${MOELAB_NEED_TEST:-0}" = 1 ] && extra="[test,dask]"
  echo "moelab: installing torch==2.13.0 and moelab$extra into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  if [ "${MOELAB_NEED_TEST:-0}" = 1 ]; then  # the Dask tests need moelab[dask] (PyPI); they skip without it
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,dask]" \
      || "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
  else
    "$PY" -m pip install --quiet --disable-pip-version-check -e "."
  fi
fi
