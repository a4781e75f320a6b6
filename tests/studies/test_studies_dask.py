"""Rate studies on dask.distributed (issue 13): the table equals the serial run's, a task lost with its
worker is resubmitted, an interrupted driver resumes with nothing lost. Loopback clusters only."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

from moelab.studies import load_study, run_studies, run_study  # noqa: E402
from moelab.studies import runner as runner_mod  # noqa: E402
from moelab.studies.cli import EXIT_INTERRUPTED, main  # noqa: E402
from moelab.studies.runner import RESULT_COLUMNS, read_results  # noqa: E402

KEY = ["setting", "n", "replicate"]
ROOT = Path(__file__).resolve().parents[2]


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same rows (each once) and every number to 1e-12; ``seconds`` (wall time) aside."""
    assert not got.duplicated(KEY).any(), "a cell was written twice"
    a = got.sort_values(KEY).reset_index(drop=True)
    b = want.sort_values(KEY).reset_index(drop=True)
    assert a[KEY].values.tolist() == b[KEY].values.tolist()
    for col in RESULT_COLUMNS:
        if col == "seconds":
            continue
        if pd.api.types.is_numeric_dtype(a[col]) and pd.api.types.is_numeric_dtype(b[col]):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-12, atol=1e-12,
                                       equal_nan=True, err_msg=col)
        else:  # strings and flags; an empty CSV field reads as NaN on both sides
            assert a[col].astype(object).fillna("").astype(str).tolist() == b[col].astype(object).fillna("").astype(str).tolist(), col


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    from conftest import TINY

    d = tmp_path_factory.mktemp("dask")
    p = d / "tiny.toml"
    p.write_text(TINY.replace("replicates = 3", "replicates = 3\nbatch_size = 1"))  # 12 tasks
    return p


@pytest.fixture(scope="module")
def serial(study_file):
    """The serial, in-process run: the reference every scheduled run must equal."""
    return run_study(load_study(study_file), study_file.parent / "serial", progress=False)


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, shared by the tests of this module."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):  # a task survives one worker death
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as lc, distributed.Client(lc) as client:
            yield lc, client


def test_local2_from_the_command_line_equals_serial(study_file, serial, tmp_path, capsys):
    out = tmp_path / "local2"
    assert main(["run", str(study_file), "--out", str(out), "--scheduler", "local:2", "--no-progress"]) == 0
    assert "loss_D1" in capsys.readouterr().out  # the verdict table
    got = read_results(out / "results.csv")
    assert len(got) == 12
    assert_same_table(got, serial)
    pd.testing.assert_frame_equal(pd.read_csv(out / "rates.csv"), pd.read_csv(study_file.parent / "serial" / "rates.csv"))


def test_tcp_address_runs_on_a_running_cluster_and_leaves_it_up(study_file, serial, cluster, tmp_path):
    lc, client = cluster
    out = tmp_path / "tcp"
    assert lc.scheduler_address.startswith("tcp://127.0.0.1:")
    assert main(["run", str(study_file), "--out", str(out), "--scheduler", lc.scheduler_address, "--no-progress",
                 "--torch-threads", "1"]) == 0
    assert_same_table(read_results(out / "results.csv"), serial)
    assert len(client.scheduler_info()["workers"]) == 2  # the user's cluster is still there
    assert client.submit(sum, [1, 2]).result() == 3


def test_several_studies_share_one_cluster_and_equal_their_serial_runs(study_file, serial, cluster, tmp_path):
    """run_studies (moelab reproduce on a cluster): every study's batches in one pool, largest first; each
    study's table equals its own serial run, each directory gets its report."""
    from conftest import TINY

    lc, client = cluster
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace('name = "tiny"', 'name = "tiny-b"').replace("seed = 1", "seed = 7"))
    want_b = run_study(load_study(other), tmp_path / "serial-b", progress=False)
    got_a, got_b = run_studies([(load_study(study_file), tmp_path / "a"), (load_study(other), tmp_path / "b")],
                               progress=False, client=client)
    assert_same_table(got_a, serial)
    assert_same_table(got_b, want_b)
    assert not got_a["loglik"].equals(got_b["loglik"])  # two different studies, not one twice
    for d in ("a", "b"):
        assert (tmp_path / d / "rates.csv").exists()


def test_batches_split_for_balance_fit_the_same_problems(cluster, tmp_path, monkeypatch):
    """With every batch above the split threshold, the 3-replicate batches run as 2 + 1 tasks (then 1 + 1):
    the same truth-perturbed problems, so the same fits up to rounding: log-likelihoods to 1e-9 relative, the
    losses and distances (of fits stopped at max_iter = 20, tol = 1e-6, where a rounding-level change in the
    iterates is not damped out) to 1e-6; measured 3e-8 at most (a Hellinger distance)."""
    from conftest import TINY

    lc, client = cluster
    f = tmp_path / "unbatched.toml"
    f.write_text(TINY)
    want = run_study(load_study(f), tmp_path / "serial", progress=False)
    monkeypatch.setattr(runner_mod, "SPLIT_MIN_S", 0.0)
    plan = runner_mod._Plan(load_study(f), tmp_path / "probe")
    pieces = runner_mod._balanced([(plan, b) for b in plan.todo], 2)
    assert len(plan.todo) == 4 and len(pieces) > 4
    assert sorted((n, fit.name, r) for _p, (n, _fi, fit, reps) in pieces for r in reps) == \
        sorted((n, fit.name, r) for n, _fi, fit, reps in plan.todo for r in reps)  # every cell once
    got = run_study(load_study(f), tmp_path / "split", progress=False, client=client)
    a, b = got.sort_values(KEY).reset_index(drop=True), want.sort_values(KEY).reset_index(drop=True)
    assert a[KEY].values.tolist() == b[KEY].values.tolist()
    np.testing.assert_allclose(a["loglik"].to_numpy(float), b["loglik"].to_numpy(float), rtol=1e-9)
    for col in ("loss_D1", "loss_D2", "hellinger", "err_gate_slope", "err_variance"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=1e-12, err_msg=col)
    assert a["n_iter"].tolist() == b["n_iter"].tolist()


def test_batches_not_split_below_the_threshold_or_with_random_starts(tmp_path):
    from conftest import TINY

    f = tmp_path / "t.toml"
    f.write_text(TINY)
    plan = runner_mod._Plan(load_study(f), tmp_path / "probe")
    todo = [(plan, b) for b in plan.todo]
    assert runner_mod._balanced(todo, 2) == todo  # tiny batches: under SPLIT_MIN_S
    g = tmp_path / "k.toml"
    g.write_text(TINY.replace("max_iter = 20", 'max_iter = 20\ninit = "kmeans"'))
    plan = runner_mod._Plan(load_study(g), tmp_path / "probe-k")
    todo = [(plan, b) for b in plan.todo]
    old = runner_mod.SPLIT_MIN_S
    try:
        runner_mod.SPLIT_MIN_S = 0.0
        assert runner_mod._balanced(todo, 2) == todo  # one seed per batch there: a split would change the fits
    finally:
        runner_mod.SPLIT_MIN_S = old


class KillOnce(distributed.WorkerPlugin):
    """Kill the worker process (SIGKILL, no clean-up) as task ``key_part`` starts executing, the first
    ``times`` times (counted in the marker file, which gets the killed pids)."""

    name = "kill-once"

    def __init__(self, marker: str, key_part: str, times: int = 1):
        self.marker, self.key_part, self.times = marker, key_part, times

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.key_part in str(key):
            pids = Path(self.marker).read_text().split() if os.path.exists(self.marker) else []
            if len(pids) < self.times:
                with open(self.marker, "a") as fh:
                    fh.write(f"{os.getpid()}\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)


def test_a_task_lost_with_its_killed_worker_is_resubmitted(study_file, serial, cluster, tmp_path):
    lc, client = cluster
    before = set(client.run(os.getpid).values())
    marker = tmp_path / "killed.pid"
    client.register_plugin(KillOnce(str(marker), "-over-n80-r1-"))  # mid-run: the 8th of 12 batches
    try:
        got = run_study(load_study(study_file), tmp_path / "out", progress=False, client=client)
    finally:
        client.unregister_worker_plugin("kill-once")
    (killed,) = map(int, marker.read_text().split())
    assert killed in before
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # that worker process is gone ...
    assert len(got) == 12 and set(got["status"]) <= {"ok", "not_converged", "degenerate"}
    assert_same_table(got, serial)  # ... and its batch was fitted again elsewhere, written once
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_a_task_that_kills_its_workers_is_a_failed_row(study_file, serial, cluster, tmp_path):
    """Past distributed.scheduler.allowed-failures (1 here) Dask gives up on a task (KilledWorker): its cells are
    recorded as failed rows, like a fit that raised, and the run goes on."""
    lc, client = cluster
    marker = tmp_path / "killed.pid"
    client.register_plugin(KillOnce(str(marker), "-exact-n160-r2-", times=2))
    try:
        got = run_study(load_study(study_file), tmp_path / "out", progress=False, client=client)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert len(marker.read_text().split()) == 2 and len(got) == 12 and not got.duplicated(KEY).any()
    failed = got[got["status"] == "failed"]
    assert ("exact", 160, 2) in set(zip(failed["setting"], failed["n"], failed["replicate"]))
    assert failed["error"].str.startswith("KilledWorker").all()  # a task beside it on a dying worker may fail too
    assert_same_table(got[got["status"] != "failed"], serial.merge(got[got["status"] != "failed"][KEY]))
    client.wait_for_workers(2, timeout=60)


class HoldBack(distributed.WorkerPlugin):
    """Hold every task but the one whose key contains ``first`` for ``seconds`` as it starts executing."""

    name = "hold-back"

    def __init__(self, first: str, seconds: float):
        self.first, self.seconds = first, seconds

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.first not in str(key):
            time.sleep(self.seconds)


def test_interrupted_driver_writes_what_finished_and_resumes(study_file, serial, cluster, tmp_path, monkeypatch):
    """A real SIGINT in the driver after its first write: finished batches are on disk, the rest cancelled;
    the rerun fits only what is missing and the table equals the serial run's."""
    lc, client = cluster
    path = tmp_path / "out" / "results.csv"
    append = runner_mod._append_rows
    calls = []

    def append_then_ctrl_c(p, rows):
        append(p, rows)
        calls.append(len(rows))
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runner_mod, "_append_rows", append_then_ctrl_c)
    client.register_plugin(HoldBack("-exact-n80-r0-", seconds=2.0))  # the rest cannot all finish before the Ctrl-C
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(load_study(study_file), tmp_path / "out", progress=False, client=client)
    finally:
        client.unregister_worker_plugin("hold-back")
    first = read_results(path)
    assert 1 <= len(first) < 12 and len(first) == sum(calls)  # every handled batch is on disk
    assert not first.duplicated(KEY).any()
    assert not (tmp_path / "out" / "rates.csv").exists()
    monkeypatch.setattr(runner_mod, "_append_rows", append)
    got = run_study(load_study(study_file), tmp_path / "out", progress=False, client=client)
    assert read_results(path).iloc[: len(first)].equals(first)  # kept, not refitted
    assert_same_table(got, serial)


def _live_processes_in_group(pgid: int) -> list:
    import psutil

    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def test_ctrl_c_on_the_command_line_shuts_the_local_cluster_down(study_file, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while local:2 runs: exit 130,
    the finished rows on disk, and no worker process left behind."""
    slow = tmp_path / "slow.toml"  # long enough that it is still running when interrupted
    slow.write_text(study_file.read_text().replace("replicates = 3", "replicates = 40")
                    .replace("n = [80, 160]", "n = [2000]").replace("max_iter = 20", "max_iter = 300")
                    .replace("tol = 1e-6", "tol = 1e-12"))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "moelab", "run", str(slow), "--out", str(out), "--scheduler", "local:2",
                          "--no-progress"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_results(out / "results.csv")) == 0 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()[1][-2000:]
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "interrupted; every finished fit is in" in err
    assert "KeyboardInterrupt" not in err  # the workers ignored the terminal's SIGINT; the driver shut them down
    rows = read_results(out / "results.csv")
    assert 1 <= len(rows) < 80 and not rows.duplicated(KEY).any()
    deadline = time.monotonic() + 20
    while _live_processes_in_group(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_processes_in_group(p.pid) == []


def test_local_cluster_workers_keep_glibc_dynamic_mmap_threshold(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_=65536 doubled the workers' system CPU time (page faults on
    every large temporary); ``local:N`` workers start without it, and a value the user exported is kept."""
    from moelab.studies.cluster import dask_client

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client("local:1") as client:
        got = list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values())
    assert got == [None]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "262144")
    with dask_client("local:1") as client:
        got = list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values())
    assert got == ["262144"]
