"""``python -m moelab``: the moelab command line (see :mod:`moelab.cli`)."""

from .cli import main

raise SystemExit(main())
