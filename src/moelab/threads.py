"""How many intra-op threads a fit uses: one for small work, and no more than the idle cores.

PyTorch's CPU thread pool waits actively for its threads at every parallel
region. A thread that the OS has descheduled for another process makes the
others spin, so on a busy machine multi-threaded EM burns CPU instead of
saving time. Measured on the 2-core development machine, `moelab fit` on the
first 6,000 diamonds rows (3 inputs, 3 experts, textbook loop) while one other
process ran a compiler at 100% of a core: 2 threads 173 s wall, 162 user CPU-s;
1 thread 44 s wall, 34 user CPU-s, the same fit; with the machine to itself, 2
threads took 24.8 s. So a fit uses at most as many threads as there are cores
without another runnable task when it starts (Linux: the runnable count of
``/proc/loadavg``, the median of 5 reads 1 ms apart, less this process's own
runnable threads and those of its child processes); elsewhere, or if that file
cannot be read, torch's setting.

This process's own threads are not "another task": after any parallel region
torch's OpenMP workers spin for a while and read as runnable, and so do
torch.compile's compile-worker processes while they start. Counting them
(as this module did until 2026-12-02) made every fit after the first in a
process — every cell of a study — run on one thread on an idle 2-core machine,
and the kernels compiled then were one-thread code.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Optional

import torch

__all__ = ["other_runnable", "own_runnable", "fit_threads", "using_threads", "SMALL_WORK"]

#: per-iteration work (problems · samples · experts · 100) below which one thread is used
SMALL_WORK = 1_000_000


def _runnable_tasks(pid: str, seen: set) -> int:
    """Runnable threads of process ``pid`` and of its descendants (``/proc/PID/task/TID/{stat,children}``)."""
    if pid in seen:
        return 0
    seen.add(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    count, children = 0, []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        # the state follows the parenthesised command name, which may hold spaces and ')'
        if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "R":
            count += 1
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += f.read().split()
        except OSError:
            pass
    return count + sum(_runnable_tasks(c, seen) for c in children)


def own_runnable() -> int:
    """Runnable threads of this process and its child processes (e.g. torch.compile's compile workers),
    at least 1: the caller."""
    return max(1, _runnable_tasks(str(os.getpid()), set()))


def other_runnable(reads: int = 5, pause_s: float = 0.001) -> Optional[int]:
    """Runnable tasks on the machine besides this process's own (median of ``reads`` reads),
    or None if unknown (:func:`own_runnable` is subtracted from each read of ``/proc/loadavg``)."""
    counts = []
    for i in range(reads):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - own_runnable())
        if i + 1 < reads:
            time.sleep(pause_s)
    return max(0, int(statistics.median(counts)))


def fit_threads(work: int, current: int, cores: Optional[int] = None, others: Optional[int] = None) -> int:
    """Intra-op threads for a fit whose per-iteration work is ``work`` (problems · n · K · 100).

    ``current`` is torch's setting; ``cores`` the usable cores (default ``os.sched_getaffinity``);
    ``others`` the other runnable tasks (default :func:`other_runnable`). One thread below
    :data:`SMALL_WORK`; else min(current, cores − others), at least 1.
    """
    if current <= 1 or work < SMALL_WORK:
        return 1
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or current
    if others is None:
        others = other_runnable()
        if others is None:
            return current
    return max(1, min(current, cores - others))


@contextlib.contextmanager
def using_threads(n: int):
    """Run the block on ``n`` torch intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)
