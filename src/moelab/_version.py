"""The package version (its own module, so `moelab --version` imports nothing else)."""

__version__ = "0.1.0"
