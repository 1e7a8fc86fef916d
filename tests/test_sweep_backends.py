import functools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import ray

from normlab import cli, sweep
from normlab import verify as verify_module
from normlab.claims import budget
from normlab.data import load_classification
from normlab.store import RunStore
from normlab.train import TrainConfig
from normlab.train.loop import train_classifier
from normlab.verify import VerifyOptions


@pytest.fixture(scope="module", autouse=True)
def runs_one_by_one():
    # These tests wrap the single-run trainer, so the batched trainer of MLP runs (tested
    # in tests/train/test_batched.py) is unregistered here. Tests that need a group
    # trainer register their own.
    saved = dict(sweep.GROUP_TRAINERS)
    sweep.GROUP_TRAINERS.clear()
    yield
    sweep.GROUP_TRAINERS.update(saved)


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


@pytest.fixture(scope="module")
def local_ray():
    # one local Ray instance for the module, because starting one takes seconds
    ray.init(num_cpus=2, include_dashboard=False)
    # Ray workers import the trainers of this module by value, wherever pytest runs
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def tiny_grid():
    return [
        TrainConfig(hidden=(16, 16), epochs=1, eval_every=2, lr=lr, seed=seed, train_size=200)
        for lr in (0.03, 0.1)
        for seed in (0, 1)
    ]


def attempts(store_path) -> dict:
    db = sqlite3.connect(store_path)
    try:
        return dict(db.execute("SELECT key, attempts FROM runs").fetchall())
    finally:
        db.close()


def outcome(record) -> tuple:
    return record.status, record.steps, record.step_loss, record.history, record.final


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "runs.db"
    with RunStore(path) as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False)
    return {key: outcome(record) for key, record in records.items()}


# trainers for the tests below; module level, so worker processes can unpickle them

def raise_once(marker_dir, config, data):
    marker = marker_dir / f"raised-{config.key()}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"simulated first-attempt failure of seed {config.seed}")
    return train_classifier(config, data)


def raise_for_seed_1(config, data):
    if config.seed == 1:
        raise RuntimeError("simulated failure of seed 1")
    return train_classifier(config, data)


def kill_worker(marker_dir, config, data):
    """Kill this worker process: lr=0.03, seed=0 on its first attempt, lr=0.1, seed=1 always."""
    marker = marker_dir / f"killed-{config.key()}"
    first_attempt = not marker.exists()
    marker.touch()
    if (config.lr, config.seed) == (0.1, 1) or ((config.lr, config.seed) == (0.03, 0)
                                                and first_attempt):
        os.kill(os.getpid(), signal.SIGKILL)
    return train_classifier(config, data)


def by_lr(config):
    return config.lr


def group_per_config(log_dir, configs, data):
    """Train a group one config at a time and log the group's seeds to a file."""
    name = "-".join(f"{c.lr}_{c.seed}" for c in configs)
    (log_dir / f"group-{name}").touch()
    return [train_classifier(config, data) for config in configs]


def failing_group(configs, data):
    raise NotImplementedError("simulated group trainer failure")


def test_process_pool_matches_in_process(digits, reference, tmp_path):
    with sweep.open_executor("process", workers=2, threads=1) as executor, \
            RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False,
                                  executor=executor)
    assert set(records) == set(reference)
    for key, record in records.items():
        assert outcome(record) == reference[key]
    assert set(attempts(tmp_path / "runs.db").values()) == {1}


@pytest.mark.parametrize("backend", ["in-process", "process"])
def test_sweep_retries_raising_run(backend, digits, reference, tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.TRAINERS, "classify", functools.partial(raise_once, tmp_path))
    workers = 1 if backend == "in-process" else 2
    with sweep.open_executor(backend, workers=workers, threads=1) as executor, \
            RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False,
                                  executor=executor)
    for key, record in records.items():
        assert outcome(record) == reference[key]
        assert record.error is None
    assert set(attempts(tmp_path / "runs.db").values()) == {2}


@pytest.mark.parametrize("backend", ["in-process", "process"])
def test_sweep_fails_run_after_two_attempts(backend, digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.TRAINERS, "classify", raise_for_seed_1)
    workers = 1 if backend == "in-process" else 2
    with sweep.open_executor(backend, workers=workers, threads=1) as executor, \
            RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False,
                                  executor=executor)
        counts = store.counts()
    assert counts == {"finished": 2, "failed": 2}
    tries = attempts(tmp_path / "runs.db")
    for key, record in records.items():
        seed = record.config.seed
        assert tries[key] == (2 if seed == 1 else 1)
        if seed == 1:
            assert record.error.startswith("Traceback")
            assert "raise_for_seed_1" in record.error
            assert record.error.strip().endswith("RuntimeError: simulated failure of seed 1")


def test_pool_survives_killed_workers(digits, reference, tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.TRAINERS, "classify", functools.partial(kill_worker, tmp_path))
    configs = tiny_grid()
    with sweep.open_executor("process", workers=2, threads=1) as executor, \
            RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(configs, store, digits, progress=False, executor=executor)
    tries = attempts(tmp_path / "runs.db")
    killed_once, always_killed = configs[0].key(), configs[3].key()
    assert records[killed_once].status == "finished"
    assert outcome(records[killed_once]) == reference[killed_once]
    assert tries[killed_once] == 2
    assert records[always_killed].status == "failed"
    assert "died (killed by signal SIGKILL)" in records[always_killed].error
    assert tries[always_killed] == 2
    for config in configs[1:3]:  # in flight when a worker died, so resubmitted uncounted
        assert outcome(records[config.key()]) == reference[config.key()]
        assert tries[config.key()] == 1


def ray_sweep(tmp_path, digits, monkeypatch, trainer=None):
    if trainer is not None:
        monkeypatch.setitem(sweep.TRAINERS, "classify", trainer)
    path = tmp_path / "runs.db"
    with sweep.open_executor("ray", workers=2, threads=1) as executor, RunStore(path) as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False,
                                  executor=executor)
    return records, attempts(path)


def test_ray_backend(digits, reference, tmp_path_factory, monkeypatch, local_ray):
    # one test for every Ray case, so that pytest-xdist starts one Ray instance, not several
    records, tries = ray_sweep(tmp_path_factory.mktemp("plain"), digits, monkeypatch)
    assert {key: outcome(record) for key, record in records.items()} == reference
    assert set(tries.values()) == {1}

    markers = tmp_path_factory.mktemp("raise")
    trainer = functools.partial(raise_once, markers)
    records, tries = ray_sweep(markers, digits, monkeypatch, trainer)
    assert {key: outcome(record) for key, record in records.items()} == reference
    assert set(tries.values()) == {2}

    markers = tmp_path_factory.mktemp("kill")
    trainer = functools.partial(kill_worker, markers)
    records, tries = ray_sweep(markers, digits, monkeypatch, trainer)
    configs = tiny_grid()
    killed_once, always_killed = configs[0].key(), configs[3].key()
    assert outcome(records[killed_once]) == reference[killed_once]
    assert records[always_killed].status == "failed"
    assert "Ray worker process died 2 times" in records[always_killed].error
    assert tries[always_killed] == 2
    for config in configs[1:3]:
        assert outcome(records[config.key()]) == reference[config.key()]


def test_plan_units_groups_by_key(monkeypatch):
    monkeypatch.setattr(sweep, "GROUP_TRAINERS", {})
    sweep.register_group_trainer(
        "classify", lambda c: None if c.norm == "none" else c.lr, group_per_config, max_group=2
    )
    configs = [TrainConfig(lr=lr, seed=seed) for seed in range(3) for lr in (0.1, 0.2)]
    configs.insert(1, TrainConfig(norm="none"))
    units = sweep.plan_units(configs)
    assert [(u.grouped, [(c.norm, c.lr, c.seed) for c in u.configs]) for u in units] == [
        (True, [("batchnorm", 0.1, 0), ("batchnorm", 0.1, 1)]),
        (False, [("none", 0.1, 0)]),
        (True, [("batchnorm", 0.2, 0), ("batchnorm", 0.2, 1)]),
        (True, [("batchnorm", 0.1, 2)]),
        (True, [("batchnorm", 0.2, 2)]),
    ]


@pytest.mark.parametrize("backend", ["in-process", "process"])
def test_group_trainer_stores_runs(backend, digits, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "GROUP_TRAINERS", {})
    sweep.register_group_trainer(
        "classify", by_lr, functools.partial(group_per_config, tmp_path), max_group=2
    )
    workers = 1 if backend == "in-process" else 2
    with sweep.open_executor(backend, workers=workers, threads=1) as executor, \
            RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False,
                                  executor=executor)
    groups = sorted(path.name for path in tmp_path.glob("group-*"))
    assert groups == ["group-0.03_0-0.03_1", "group-0.1_0-0.1_1"]
    for key, record in records.items():
        assert outcome(record) == reference[key]
    assert set(attempts(tmp_path / "runs.db").values()) == {1}


def test_failing_group_trains_runs_alone(digits, reference, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sweep, "GROUP_TRAINERS", {})
    sweep.register_group_trainer("classify", by_lr, failing_group)
    with RunStore(tmp_path / "runs.db") as store:
        records = sweep.run_sweep(tiny_grid(), store, digits, progress=False)
    assert "training its runs as groups of one" in caplog.text
    assert "training it with the single-run trainer" in caplog.text
    assert "simulated group trainer failure" in caplog.text
    for key, record in records.items():
        assert outcome(record) == reference[key]
    # the failed group of two, the failed group of one and the single-run attempt
    assert set(attempts(tmp_path / "runs.db").values()) == {3}


def test_register_group_trainer_rejects_bad_max_group():
    with pytest.raises(ValueError, match="max_group must be a positive integer, got 0"):
        sweep.register_group_trainer("classify", by_lr, failing_group, max_group=0)


def test_open_executor_rejects_bad_options():
    with pytest.raises(ValueError, match="backend must be one of in-process, process, ray"):
        sweep.open_executor("threads")
    with pytest.raises(ValueError, match="applies to the ray backend only"):
        sweep.open_executor("process", workers=2, address="ray://head:10001")
    with pytest.raises(ValueError, match="trains one run at a time, got workers=3"):
        sweep.open_executor("in-process", workers=3)
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        sweep.open_executor("process", workers=0)


def test_ray_executor_names_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'normlab\[ray\]'"):
        sweep.open_executor("ray", workers=2)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"workers": 0}, "--workers must be a positive integer, got 0"),
        ({"backend": "dask"}, "--backend must be one of in-process, process, ray, got 'dask'"),
        ({"address": "ray://head:10001"}, "--address applies to --backend ray only"),
        ({"backend": "in-process", "workers": 2}, "got --workers 2; use --backend process"),
    ],
)
def test_verify_options_reject_bad_backend(changes, message, tmp_path):
    options = VerifyOptions(out=str(tmp_path), **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        options.validate()


def test_verify_options_choose_backend():
    assert VerifyOptions().resolved_backend() == "in-process"
    assert VerifyOptions(workers=3).resolved_backend() == "process"
    assert VerifyOptions(workers=3, backend="ray").resolved_backend() == "ray"


def test_verify_options_need_ray_installed(monkeypatch):
    monkeypatch.setattr(verify_module, "ray_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs the ray package.*pip install 'normlab\[ray\]'"):
        VerifyOptions(backend="ray").validate()


def test_cli_verify_with_process_pool(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(budget.BUDGETS, ("digits", "quick"), {"epochs": 1, "eval_every": 4})
    out = tmp_path / "out"
    argv = ["verify", "--claims", "higher-lr", "--out", str(out), "--seeds", "2",
            "--workers", "2", "--no-progress"]
    assert cli.main(argv) == 0
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts[0]["runs"] == 2 * 8 * 2
    tries = attempts(out / "normlab.db")
    assert len(tries) == 2 * 8 * 2
    assert set(tries.values()) == {1}


def test_cli_rejects_address_without_ray(tmp_path, capsys):
    argv = ["verify", "--out", str(tmp_path), "--address", "ray://head:10001"]
    assert cli.main(argv) == 2
    assert "--address applies to --backend ray only" in capsys.readouterr().err


ORPHAN_SCRIPT = """
import os, sys, time
from normlab import sweep
from normlab.train import TrainConfig

def sleep_then_fail(config, data):
    print(os.getpid(), flush=True)
    time.sleep(120)
    raise RuntimeError("the test should have ended this worker")

executor = sweep.open_executor("process", workers=2, threads=1)
for seed in range(2):
    unit = sweep._Unit([TrainConfig(seed=seed)], sleep_then_fail, grouped=False)
    executor.submit(unit, data=None)
time.sleep(120)
"""


def test_pool_workers_exit_when_parent_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True)
    try:
        workers = [int(parent.stdout.readline()) for _ in range(2)]
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _is_running(pid)]
    assert alive == []


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ray_address_that_nobody_listens_on():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the port is closed again, so connecting is refused at once
    with pytest.raises(ValueError, match=f"cannot reach a Ray cluster at --address "
                                         f"127.0.0.1:{port}.*ray start --head"):
        sweep._check_ray_address(f"127.0.0.1:{port}", timeout=5)
