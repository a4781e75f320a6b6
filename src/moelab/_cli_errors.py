"""User errors of the command line, shared by :mod:`moelab.cli` and :mod:`moelab.studies.cli`.

A handler reports a user error (bad input, not a bug) by raising
:class:`CLIError`, or by wrapping library calls in :func:`user_errors`; the
``main`` of either command line prints it as one line on stderr and exits
with :data:`EXIT_USAGE`. A module of its own, so that neither command line
imports the other.
"""

from __future__ import annotations

import contextlib

__all__ = ["CLIError", "user_errors", "EXIT_USAGE"]

#: exit status of a usage or input error
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as ``moelab <command>: error: <message>``, exit status 2."""


@contextlib.contextmanager
def user_errors(what: str = ""):
    """Turn ValueError/TypeError raised by library calls in the block into :class:`CLIError`.

    Parameters
    ----------
    what : str
        Prefix for the message, e.g. ``"cannot fit: "``.
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{what}{exc}") from exc
