"""Intra-op threads of a fit (moelab.threads): one for small work, never more than the idle cores."""

import builtins
import io
import sys

import pytest

from moelab import threads


def test_small_work_or_one_thread_runs_on_one():
    assert threads.fit_threads(threads.SMALL_WORK - 1, 2, cores=2, others=0) == 1
    assert threads.fit_threads(10**9, 1, cores=2, others=0) == 1


@pytest.mark.parametrize("cores, others, expected", [(2, 0, 2), (2, 1, 1), (2, 5, 1), (16, 3, 8), (16, 10, 6)])
def test_at_most_the_cores_without_another_runnable_task(cores, others, expected):
    assert threads.fit_threads(10**9, 8 if cores == 16 else 2, cores=cores, others=others) == expected


def _loadavg(monkeypatch, texts):
    it = iter(texts)
    real_open = builtins.open

    def fake(path, *a, **k):
        if path == "/proc/loadavg":
            t = next(it)
            if t is None:
                raise OSError("no such file")
            return io.StringIO(t)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake)


def test_runnable_count_is_the_median_of_reads_less_this_thread(monkeypatch):
    monkeypatch.setattr(threads, "own_runnable", lambda: 1)
    _loadavg(monkeypatch, ["1.0 1.0 1.0 3/200 1", "0.9 1 1 1/200 1", "1 1 1 2/201 1", "1 1 1 3/201 1", "1 1 1 2/201 1"])
    assert threads.other_runnable(pause_s=0) == 1  # median of 2, 0, 1, 2, 1
    _loadavg(monkeypatch, [None])
    assert threads.other_runnable(pause_s=0) is None
    _loadavg(monkeypatch, [None])
    assert threads.fit_threads(10**9, 2, cores=2) == 2  # unknown load: torch's setting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/loadavg")
def test_the_real_file_reads():
    n = threads.other_runnable(reads=2, pause_s=0)
    assert isinstance(n, int) and n >= 0


def test_this_process_own_spinning_threads_are_not_other_tasks(monkeypatch):
    # torch's OpenMP workers spin (state R) after a parallel region: before 2026-12-02 they were counted
    # as another task, so every fit after the first in a process ran on one thread of an idle machine
    # and neither are its child processes (torch.compile's compile workers while they start)
    procs = {"100": {"1": ("1 (python) R 0 1", "200"), "2": ("2 (pt worker (1)) R 1 1", ""), "3": ("3 (x) S 1 1", "")},
             "200": {"200": ("200 (compile worker) R 1 1", "")}}
    real_open = builtins.open
    monkeypatch.setattr(threads.os, "getpid", lambda: 100)
    monkeypatch.setattr(threads.os, "listdir", lambda path: list(procs[path.split("/")[2]]))

    def fake(path, *a, **k):
        if path == "/proc/loadavg":
            return io.StringIO("1 1 1 3/100 1")  # all three runnable tasks are ours
        if path.startswith("/proc/"):
            _, _, pid, _, tid, what = path.split("/")
            stat, children = procs[pid][tid]
            return io.StringIO(stat if what == "stat" else children)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake)
    assert threads.own_runnable() == 3  # the parenthesised name may hold spaces and ')'
    assert threads.other_runnable(reads=1, pause_s=0) == 0
    assert threads.fit_threads(10**9, 2, cores=2) == 2
    procs["200"]["200"] = ("200 (compile worker) S 1 1", "")  # then a runnable task is someone else's
    assert threads.own_runnable() == 2 and threads.fit_threads(10**9, 2, cores=2) == 1
