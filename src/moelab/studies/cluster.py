"""Running a study's batches on a Dask cluster (``moelab run --scheduler``).

The study runner (:func:`moelab.studies.run_study`) builds the same batches
with or without a cluster; with a ``distributed.Client`` every batch is one
task, the tasks run on the cluster's workers and the **driver alone** appends
each finished batch's rows to the results file, in the order they finish.
Which cells a task fits and every seed it uses come from the study and the
cell, never from the worker or the order, so the table equals the serial
run's (row order aside).

Dask does the bookkeeping of lost work: a task whose worker dies (killed,
out of memory, a lost node) is resubmitted to another worker; one that
killed ``distributed.scheduler.allowed-failures`` workers (3 by default)
ends as :class:`distributed.KilledWorker` and its cells are recorded as
``failed`` rows, like a fit that raised.

:func:`dask_client` turns the command line's ``--scheduler`` into a client:
``local:N`` (a LocalCluster of N single-threaded worker processes on
127.0.0.1, shut down at the end, on an error or on Ctrl-C),
``tcp://HOST:PORT`` (a running ``dask scheduler``) or ``PATH.json`` (a
scheduler file written by ``dask scheduler --scheduler-file PATH.json``).
dask.distributed is the optional extra ``moelab[dask]``. The command line's
default, ``auto`` (:func:`resolve_scheduler`), is ``local:C`` on a machine
with C ≥ 2 cores for a run predicted to take more than a minute, where
dask.distributed is installed, and serial otherwise; ``serial`` always runs in
the calling process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

from .config import StudyError

__all__ = ["dask_client", "parse_scheduler", "resolve_scheduler", "run_tasks", "MISSING_EXTRA", "AUTO_MIN_S"]

#: the error text when dask.distributed is not installed
MISSING_EXTRA = ('--scheduler needs dask.distributed, which is not installed; install the extra: '
                 'pip install "moelab[dask]"')

_FORMS = "auto, serial, local:N (N worker processes on this machine), tcp://HOST:PORT (a running `dask scheduler`) or PATH.json (its --scheduler-file)"


#: ``--scheduler auto`` starts worker processes only for work predicted to take longer than this (serial seconds)
AUTO_MIN_S = 60.0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_scheduler(spec: Optional[str], work_s: float) -> Optional[str]:
    """The ``--scheduler`` to run with: None (serial, in this process) or a :func:`parse_scheduler` value.

    Parameters
    ----------
    spec : str or None
        ``serial`` → None. ``auto`` (also None, the command line's default) →
        ``local:C`` with C the usable cores where C ≥ 2, the work is predicted
        to take more than :data:`AUTO_MIN_S` serial seconds and dask.distributed
        is installed; None otherwise. Anything else is returned as given (and
        checked by :func:`dask_client`).
    work_s : float
        The run's predicted serial seconds (:func:`moelab.studies.runner.plan_work`).

    Returns
    -------
    str or None
    """
    spec = "auto" if spec is None else str(spec).strip()
    if spec == "serial":
        return None
    if spec != "auto":
        return spec
    cores = usable_cores()
    if cores < 2 or work_s <= AUTO_MIN_S:
        return None
    try:
        import distributed  # noqa: F401
    except ImportError:
        return None
    return f"local:{cores}"


def parse_scheduler(spec: str) -> Tuple[str, object]:
    """Split a ``--scheduler`` value into its kind and value.

    Parameters
    ----------
    spec : str
        ``local:N`` with N ≥ 1, ``tcp://HOST:PORT`` (or ``tls://HOST:PORT``),
        or the path of a scheduler file ending in ``.json``.

    Returns
    -------
    (str, object)
        ``("local", N)``, ``("address", "tcp://HOST:PORT")`` or ``("file", Path)``.

    Raises
    ------
    StudyError
        Any other form, N < 1, an address without a port, or a scheduler file
        that does not exist.
    """
    spec = str(spec).strip()
    if spec.startswith("local:"):
        try:
            n = int(spec[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise StudyError(f"--scheduler {spec!r}: expected local:N with N >= 1 worker processes, e.g. local:4")
        return "local", n
    if spec.startswith(("tcp://", "tls://")):
        host, _, port = spec.split("://", 1)[1].rpartition(":")
        if not host or not port.isdigit():
            raise StudyError(f"--scheduler {spec!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786 "
                             "(the address `dask scheduler` prints)")
        return "address", spec
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise StudyError(f"--scheduler {spec}: no such scheduler file; start the scheduler with "
                             f"`dask scheduler --scheduler-file {spec}` first")
        return "file", path
    raise StudyError(f"--scheduler {spec!r}: expected {_FORMS}")


@contextlib.contextmanager
def _quiet(name: str, level: int = logging.ERROR):
    """Raise logger ``name`` to ``level`` inside the block (restored after)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _ignore_sigint_plugin(distributed):
    """A worker plugin that makes the worker processes of a local cluster ignore SIGINT.

    Ctrl-C in a terminal signals the whole process group, the local workers
    included; the driver alone handles it (writes what finished, cancels the
    rest, shuts the cluster down), so the workers are not torn down under it
    with a traceback each. Registered on the client, it reaches restarted
    workers too.
    """

    class IgnoreSigint(distributed.WorkerPlugin):
        name = "moelab-ignore-sigint"
        idempotent = True

        def setup(self, worker):
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return IgnoreSigint()


# Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers; None drops it (distributed.nanny._get_env_variables)
TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise StudyError(MISSING_EXTRA) from None
    return distributed


@contextlib.contextmanager
def dask_client(scheduler: str) -> Iterator:
    """A ``distributed.Client`` for a ``--scheduler`` value, closed on leaving the block.

    Parameters
    ----------
    scheduler : str
        See :func:`parse_scheduler`. ``local:N`` starts a LocalCluster of N
        worker processes with one thread each, on 127.0.0.1 only (no
        dashboard); it is shut down when the block ends, normally or by an
        exception (KeyboardInterrupt included). Its workers start without
        Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` (it turns off glibc's
        dynamic mmap threshold, so every large temporary of an EM pass is
        mapped and page-faulted afresh: 2.4× the system CPU time on a study
        cell, measured); a value the user exported is kept. For an address or
        a scheduler file only the client is closed; the cluster stays up.

    Yields
    ------
    distributed.Client

    Raises
    ------
    StudyError
        A malformed value (:func:`parse_scheduler`), dask.distributed not
        installed (names the extra ``moelab[dask]``), or no scheduler
        answering at the address.
    """
    kind, value = parse_scheduler(scheduler)
    distributed = _distributed()
    if kind == "local":
        # no dashboard; the scheduler's HTTP endpoints (health, metrics) on a free loopback port, not 8787
        import dask

        with dask.config.set({TRIM_KEY: None}):  # the nannies read it when created, below
            cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                               host="127.0.0.1", dashboard_address=None,
                                               scheduler_kwargs={"dashboard": False,
                                                                 "dashboard_address": "127.0.0.1:0"})
        try:
            with distributed.Client(cluster) as client:
                client.register_plugin(_ignore_sigint_plugin(distributed))
                yield client
        finally:
            # every result is in the driver by now; a worker process that imported torch may take seconds to
            # exit, and the nanny's "still alive after 4 s, killing" is no news to the user
            with _quiet("distributed.nanny"):
                cluster.close()
        return
    try:
        client = (distributed.Client(value) if kind == "address" else distributed.Client(scheduler_file=str(value)))
    except (OSError, TimeoutError) as exc:
        raise StudyError(f"--scheduler {scheduler}: no Dask scheduler answered ({exc}); start one with "
                         "`dask scheduler` and use the address it prints") from None
    with client:
        yield client


def run_tasks(client, tasks: Sequence[Tuple[str, Callable, tuple, object]], handle: Callable) -> None:
    """Submit every task, and hand each result to ``handle`` in the driver as it finishes.

    Parameters
    ----------
    client : distributed.Client
    tasks : sequence of (key, function, args, info)
        ``function(*args)`` runs on a worker under the task key ``key``
        (unique within the run); ``info`` stays in the driver.
    handle : callable
        ``handle(info, result)`` is called once per task, in completion order;
        ``result`` is the function's return value, or the
        ``distributed.KilledWorker`` exception of a task that killed too many
        workers.

    Raises
    ------
    Exception
        Whatever a task raised (other than KilledWorker), after handling every
        task already finished and cancelling the rest. KeyboardInterrupt
        likewise: finished tasks are handled first, so nothing computed is lost.
    """
    distributed = _distributed()
    pending = {}
    for key, fn, args, info in tasks:
        pending[client.submit(fn, *args, key=key, pure=False)] = info

    def take(fut, timeout=None) -> None:
        info = pending.pop(fut, None)
        if info is None:  # already handled
            return
        try:
            result = fut.result(timeout=timeout)
        except distributed.KilledWorker as exc:
            result = exc
        handle(info, result)

    try:
        with _sigint_deferred() as interrupted:
            done = distributed.as_completed(list(pending))
            while not done.is_empty():
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if not done.has_ready():
                    interrupted.wait(_POLL_S)
                    continue
                for fut in done.next_batch(block=False):
                    take(fut)
            if interrupted.is_set():
                raise KeyboardInterrupt
    except BaseException:
        for fut in [f for f in pending if f.status == "finished"]:
            with contextlib.suppress(Exception):
                take(fut, timeout=10)
        with contextlib.suppress(Exception):
            client.cancel(list(pending))
        raise


#: how often the driver looks for finished tasks and for a Ctrl-C while none has finished (seconds)
_POLL_S = 0.05


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[threading.Event]:
    """Within the block, SIGINT sets the yielded event instead of raising KeyboardInterrupt.

    The default handler raises KeyboardInterrupt wherever the main thread
    happens to be, and inside distributed's own client code (a future's
    bookkeeping, a lock) it can be lost, so the run carried on to the end. The
    driver loop checks the event between tasks and raises there. The
    previous handler is restored on leaving; off the main thread (where
    Python delivers no signals) the event is never set.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, old)
