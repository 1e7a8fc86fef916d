import math
import sqlite3

import pytest

from normlab import sweep
from normlab.data import load_classification
from normlab.store import SCHEMA_VERSION, RunStore, StoreError
from normlab.train import RunResult, TrainConfig


def result(status="finished", steps=4, acc=0.5) -> RunResult:
    return RunResult(
        status=status,
        steps=steps,
        diverged_step=steps if status == "diverged" else None,
        final={"val_acc": acc, "test_loss": math.nan},
        history=[
            {"step": 2, "epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_acc": 0.4},
            {"step": 4, "epoch": 1, "train_loss": 0.5, "val_loss": float("inf"),
             "val_acc": acc},
        ],
        step_loss=[2.0, 1.5, 1.0, 0.5],
        wall_time=1.25,
    )


def test_store_round_trips_a_run(tmp_path):
    config = TrainConfig(lr=0.3, seed=4)
    with RunStore(tmp_path / "runs.db") as store:
        run_id = store.start(config)
        assert store.status(config.key()) == "running"
        store.finish(run_id, result())
    with RunStore(tmp_path / "runs.db") as store:
        record = store.load(config.key())
    assert record.config == config
    assert record.status == "finished"
    assert record.steps == 4
    assert record.step_loss == [2.0, 1.5, 1.0, 0.5]
    assert [row["step"] for row in record.history] == [2, 4]
    assert record.history[1]["val_acc"] == 0.5
    assert math.isnan(record.history[1]["val_loss"])  # Inf is stored as missing
    assert record.final["val_acc"] == 0.5
    assert math.isnan(record.final["test_loss"])
    assert record.wall_time == 1.25


def test_store_records_failure_and_retry(tmp_path):
    config = TrainConfig()
    with RunStore(tmp_path / "runs.db") as store:
        run_id = store.start(config)
        store.fail(run_id, "Traceback ...\nValueError: boom")
        assert store.load(config.key()).error.endswith("boom")
        assert store.start(config) == run_id
        store.finish(run_id, result())
        record = store.load(config.key())
    assert record.status == "finished"
    assert record.error is None


def test_store_rejects_newer_schema(tmp_path):
    path = tmp_path / "runs.db"
    RunStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="written by a newer normlab"):
        RunStore(path)


def test_store_rejects_non_database(tmp_path):
    path = tmp_path / "runs.db"
    path.write_text("not a database, just text " * 100)
    with pytest.raises(StoreError, match="cannot open run store"):
        RunStore(path)


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny_grid():
    return [
        TrainConfig(hidden=(16, 16), epochs=1, eval_every=5, lr=lr, seed=seed)
        for lr in (0.03, 0.1)
        for seed in (0, 1)
    ]


def test_sweep_trains_only_missing_runs(tmp_path, digits, monkeypatch):
    # one run at a time, through the single-run trainer that the test wraps
    monkeypatch.setattr(sweep, "GROUP_TRAINERS", {})
    configs = tiny_grid()
    with RunStore(tmp_path / "runs.db") as store:
        first = sweep.run_sweep(configs[:3], store, digits, progress=False)
        assert len(first) == 3

        trained = []
        original = sweep.train_classifier
        monkeypatch.setattr(
            sweep, "train_classifier",
            lambda config, data: trained.append(config) or original(config, data),
        )
        second = sweep.run_sweep(configs + configs[:1], store, digits, progress=False)
    assert trained == [configs[3]]
    assert set(second) == {c.key() for c in configs}
    for key in first:
        assert second[key].step_loss == first[key].step_loss


def test_sweep_redoes_a_run_left_running(tmp_path, digits):
    config = tiny_grid()[0]
    with RunStore(tmp_path / "runs.db") as store:
        store.start(config)  # a run whose process was killed
        records = sweep.run_sweep([config], store, digits, progress=False)
    assert records[config.key()].status == "finished"


def test_sweep_keeps_going_after_a_failing_run(tmp_path, digits, monkeypatch):
    configs = tiny_grid()
    original = sweep.train_classifier

    def flaky(config, data):
        if config.seed == 1:
            raise RuntimeError("simulated failure")
        return original(config, data)

    monkeypatch.setattr(sweep, "train_classifier", flaky)
    monkeypatch.setattr(sweep, "GROUP_TRAINERS", {})
    with RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(configs, store, digits, progress=False)
        counts = store.counts()
    assert counts == {"finished": 2, "failed": 2}
    failed = [r for r in records.values() if r.status == "failed"]
    assert all("simulated failure" in r.error for r in failed)


def test_store_rejects_a_foreign_sqlite_database(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a normlab run store"):
        RunStore(path)


def test_store_meta_keeps_first_value(tmp_path):
    with RunStore(tmp_path / "runs.db") as store:
        assert store.check_meta("data:classify:digits", "abc") == "abc"
        assert store.check_meta("data:classify:digits", "xyz") == "abc"
