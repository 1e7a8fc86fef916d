"""``normlab verify`` killed, interrupted or out of disk space, then resumed.

Each command-line test runs the real command line in a subprocess with one thread. The
driver script below shortens the digits budget to 2 epochs, so the grid of layer-order and
momentum-eps at 2 seeds (14 distinct runs of about 0.2 s each) trains in a few seconds.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLAIMS = "layer-order,momentum-eps"
NUM_RUNS = 14  # 4 + 12 configs, one of them shared by the two claims
DEADLINE_S = 120

DRIVER = """
import os
import resource
import signal
import sys
import time

from normlab import cli
from normlab.claims import budget
from normlab.report import writer

budget.BUDGETS[("digits", "quick")] = {"epochs": 2, "eval_every": 4}

# Python keeps SIGINT ignored when the parent ignored it (a test runner started in the
# background), so restore the KeyboardInterrupt that Ctrl-C raises in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

# With PAUSE_FILE set, report writing stops half way (after verdicts.json), creates
# that file and sleeps, so a test can send a signal during report writing.
pause_file = os.environ.get("PAUSE_FILE")
if pause_file:
    write_markdown = writer.write_markdown

    def paused_write_markdown(*args, **kwargs):
        open(pause_file, "w").close()
        time.sleep(60)
        return write_markdown(*args, **kwargs)

    writer.write_markdown = paused_write_markdown

# With FILE_SIZE_LIMIT set, a write that makes any file larger than that many bytes
# fails with EFBIG instead of killing the process, as a full disk fails a write.
file_size_limit = os.environ.get("FILE_SIZE_LIMIT")
if file_size_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(file_size_limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

sys.exit(cli.main(sys.argv[1:]))
"""

RUN_COLUMNS = "id, key, status, attempts, steps, final, wall_time, started_at, ended_at"


def driver_argv(tmp_path: Path, out: Path) -> list[str]:
    driver = tmp_path / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    return [sys.executable, str(driver), "verify", "--claims", CLAIMS, "--seeds", "2",
            "--out", str(out), "--no-progress"]


def child_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def read_only(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def count_done(db_path: Path) -> int:
    """Return the number of ended runs, or 0 while the store is not readable yet."""
    if not db_path.exists():
        return 0
    try:
        with read_only(db_path) as db:
            return db.execute(
                "SELECT COUNT(*) FROM runs WHERE status IN ('finished', 'diverged')"
            ).fetchone()[0]
    except sqlite3.Error:
        return 0


def count_running(db_path: Path) -> int:
    try:
        with read_only(db_path) as db:
            return db.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(condition, process: subprocess.Popen) -> None:
    """Wait until ``condition()`` is true while ``process`` still runs."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process.poll() is None, f"normlab verify ended early with {process.returncode}"
        assert time.monotonic() < deadline, "normlab verify made no progress in time"
        time.sleep(0.02)
    assert process.poll() is None, f"normlab verify ended with {process.returncode} too soon"


def snapshot(db_path: Path) -> dict:
    """Return {key: (run row, metric rows)} of every ended run."""
    with read_only(db_path) as db:
        rows = db.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('finished', 'diverged')"
        ).fetchall()
        runs = {}
        for row in rows:
            metrics = db.execute(
                "SELECT step, epoch, name, value FROM metrics WHERE run_id=? "
                "ORDER BY name, step",
                (row[0],),
            ).fetchall()
            runs[row[1]] = (row, metrics)
    return runs


def all_runs(db_path: Path) -> list[tuple]:
    with read_only(db_path) as db:
        return db.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchall()


def integrity(db_path: Path) -> str:
    with read_only(db_path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def comparable(verdicts_path: Path) -> list[dict]:
    """Return the verdicts without training times, with plot file names only."""
    verdicts = json.loads(verdicts_path.read_text())
    for verdict in verdicts:
        verdict.pop("wall_time")
        verdict["plots"] = [Path(plot).name for plot in verdict["plots"]]
    return verdicts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """Verdicts of an uninterrupted call with the same seeds."""
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "out"
    subprocess.run(driver_argv(tmp_path, out), env=child_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return comparable(out / "verdicts.json")


def check_resumed(db_path: Path, kept: dict) -> None:
    """Check that the runs in ``kept`` are unchanged and that every run has ended once."""
    rows = all_runs(db_path)
    keys = [row[1] for row in rows]
    assert len(rows) == NUM_RUNS
    assert len(set(keys)) == NUM_RUNS
    assert all(row[2] in ("finished", "diverged") for row in rows)
    after = snapshot(db_path)
    for key, before in kept.items():
        assert after[key] == before, f"run {key} changed when the sweep resumed"
    with read_only(db_path) as db:
        duplicated = db.execute(
            "SELECT COUNT(*) FROM (SELECT run_id, name, step FROM metrics "
            "GROUP BY run_id, name, step HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    assert duplicated == 0
    assert integrity(db_path) == "ok"


@pytest.mark.slow
def test_sigkill_half_way_then_resume(tmp_path, reference):
    out = tmp_path / "out"
    db_path = out / "normlab.db"
    argv = driver_argv(tmp_path, out)

    process = subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: count_done(db_path) >= NUM_RUNS // 3, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    kept = snapshot(db_path)
    unfinished = {row[1] for row in all_runs(db_path)} - set(kept)
    assert NUM_RUNS // 3 <= len(kept) < NUM_RUNS, "the sweep should be killed half way"
    assert integrity(db_path) == "ok"

    resumed = subprocess.run(argv, env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    check_resumed(db_path, kept)
    attempts = {row[1]: row[3] for row in all_runs(db_path)}
    for key in unfinished:  # left running by the kill, so trained a second time
        assert attempts[key] == 2
    assert comparable(out / "verdicts.json") == reference


@pytest.mark.slow
def test_sigint_in_training_and_in_report(tmp_path, reference):
    out = tmp_path / "out"
    db_path = out / "normlab.db"
    argv = driver_argv(tmp_path, out)

    # Ctrl-C while runs train
    process = subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count_done(db_path) >= 2 and count_running(db_path) >= 1, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=DEADLINE_S)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert integrity(db_path) == "ok"
    kept = snapshot(db_path)
    assert 2 <= len(kept) < NUM_RUNS

    # Ctrl-C while the report is written: every run has ended by then
    pause_file = tmp_path / "paused"
    process = subprocess.Popen(argv, env=child_env(PAUSE_FILE=str(pause_file)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(pause_file.exists, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=DEADLINE_S)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    check_resumed(db_path, kept)
    # verdicts.json is written before report.md, where the call was interrupted
    assert comparable(out / "verdicts.json") == reference
    assert not (out / "report.md").exists()
    assert not list(out.glob(".report.md.*"))  # no temporary file left behind


@pytest.mark.slow
def test_failing_write_keeps_earlier_runs(tmp_path, reference):
    out = tmp_path / "out"
    db_path = out / "normlab.db"
    argv = driver_argv(tmp_path, out)

    # 150 kB lets the first few runs commit, then a write to the store fails
    failed = subprocess.run(argv, env=child_env(FILE_SIZE_LIMIT="150000"),
                            capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    lines = failed.stderr.splitlines()
    errors = [line for line in lines if line.startswith("normlab: error:")]
    assert len(errors) == 1, failed.stderr
    assert f"cannot write run store {db_path}" in errors[0]
    assert "Runs stored before are kept" in errors[0]
    assert "run the same command again" in errors[0]
    assert integrity(db_path) == "ok"
    kept = snapshot(db_path)
    assert 1 <= len(kept) < NUM_RUNS

    resumed = subprocess.run(argv, env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    check_resumed(db_path, kept)
    assert comparable(out / "verdicts.json") == reference


class FailingCommit:
    """A connection that fails every COMMIT the way SQLite reports a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_full_disk_during_commit_rolls_back(tmp_path):
    from normlab.store import RunStore, StoreError
    from normlab.train import RunResult, TrainConfig

    result = RunResult(status="finished", steps=2, diverged_step=None,
                       final={"val_acc": 0.5}, history=[], step_loss=[1.0, 0.5],
                       wall_time=0.1)
    path = tmp_path / "normlab.db"
    with RunStore(path) as store:
        first = TrainConfig(seed=0)
        store.finish(store.start(first), result)
        second = TrainConfig(seed=1)
        run_id = store.start(second)
        connection = store._db
        store._db = FailingCommit(connection)
        with pytest.raises(StoreError, match="database or disk is full. Runs stored before"):
            store.finish(run_id, result)
        store._db = connection
        assert not connection.in_transaction  # rolled back, so the next write can go on
        assert store.status(first.key()) == "finished"
        assert store.load(first.key()).step_loss == [1.0, 0.5]
        assert store.status(second.key()) == "running"  # trained again by the next call
        assert store.load(second.key()).step_loss == []
    assert integrity(path) == "ok"
