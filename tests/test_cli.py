import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from normlab import cli
from normlab.claims import budget

TINY = {"epochs": 2, "eval_every": 4}


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(budget.BUDGETS, ("digits", "quick"), TINY)


def run_cli(*argv):
    return cli.main(list(argv))


def test_claims_lists_ids(capsys):
    assert run_cli("claims") == 0
    out = capsys.readouterr().out
    assert "higher-lr" in out
    assert "BatchNorm allows higher learning rates." in out
    assert "faster-convergence" in out


def test_help_shows_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        run_cli("verify", "--help")
    out = capsys.readouterr().out
    assert "(default: normlab-out)" in out
    assert "--data-dir DIR" in out
    assert "minutes on 2 CPU cores" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--claims", "bn-is-magic"], "unknown claim 'bn-is-magic'"),
        (["--seeds", "0"], "expected a positive integer, got 0"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--quick", "--full"], "not allowed with argument"),
    ],
)
def test_verify_rejects_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        run_cli("verify", "--out", str(tmp_path), *argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_verify_mnist_without_data_dir(capsys, tmp_path):
    assert run_cli("verify", "--dataset", "mnist", "--out", str(tmp_path)) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_verify_missing_data_dir(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code = run_cli("verify", "--dataset", "mnist", "--data-dir", str(missing),
                   "--out", str(tmp_path / "out"))
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_verify_cuda_without_gpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_cli("verify", "--device", "cuda", "--out", str(tmp_path)) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_verify_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert run_cli("verify", "--out", str(target)) == 2
    assert "pass a writable --out folder" in capsys.readouterr().err


def test_verify_end_to_end_and_resume(tiny_budget, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["verify", "--claims", "higher-lr,faster-convergence", "--out", str(out),
            "--seeds", "2", "--no-progress"]
    assert run_cli(*argv) == 0
    printed = capsys.readouterr().out
    assert "higher-lr" in printed
    assert "faster-convergence" in printed

    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == ["higher-lr", "faster-convergence"]
    for v in verdicts:
        assert v["verdict"] in ("SUPPORTED", "NOT SUPPORTED", "INCONCLUSIVE")
        for field in ("effect", "interval", "dataset", "scale", "runs"):
            assert field in v
        assert v["dataset"] == "digits"
        assert v["scale"] == "quick"
        for plot in v["plots"]:
            # a file name next to verdicts.json, so the folder can move
            assert plot == os.path.basename(plot)
            assert (out / plot).stat().st_size > 10_000
    assert verdicts[0]["runs"] == 2 * 8 * 2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "Decision rule" in (out / "report.md").read_text()

    # a second call trains nothing and gives the same verdicts
    from normlab import sweep

    monkeypatch.setattr(sweep, "train_classifier", _fail_if_called)
    assert run_cli(*argv) == 0
    again = json.loads((out / "verdicts.json").read_text())
    assert [(v["verdict"], v["effect"]) for v in again] == [
        (v["verdict"], v["effect"]) for v in verdicts
    ]


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a stored run was trained again")


DRIVER = """
import sys
from normlab import cli
from normlab.claims import budget
budget.BUDGETS[("digits", "quick")] = {"epochs": 3, "eval_every": 4}
sys.exit(cli.main(sys.argv[1:]))
"""


def count_done(db_path) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path) as db:
            return db.execute(
                "SELECT COUNT(*) FROM runs WHERE status IN ('finished', 'diverged')"
            ).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_sweep_killed_half_way_keeps_finished_runs(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    argv = [sys.executable, str(driver), "verify", "--claims", "higher-lr", "--seeds", "2",
            "--out", str(out), "--no-progress"]
    db_path = out / "normlab.db"

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while count_done(db_path) < 8 and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = count_done(db_path)
    assert 8 <= before < 32, "the sweep should be killed half way"
    with sqlite3.connect(db_path) as db:
        kept = dict(db.execute(
            "SELECT key, final FROM runs WHERE status IN ('finished', 'diverged')"
        ).fetchall())

    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT key, final, attempts, status FROM runs").fetchall()
    assert len(rows) == 32
    assert all(status in ("finished", "diverged") for *_, status in rows)
    for key, final, attempts, _ in rows:
        if key in kept:
            assert final == kept[key]
            assert attempts == 1


def test_verify_rejects_empty_out(capsys):
    assert run_cli("verify", "--out", "") == 2
    assert "--out must name a folder" in capsys.readouterr().err


def test_verify_rejects_busy_out(tmp_path, capsys):
    from normlab.verify import output_lock

    with output_lock(tmp_path):
        assert run_cli("verify", "--out", str(tmp_path), "--no-progress") == 2
    assert "another normlab verify is writing to" in capsys.readouterr().err


def test_verify_rejects_store_of_other_data(tiny_budget, tmp_path, capsys):
    argv = ["verify", "--claims", "higher-lr,higher-lr", "--seeds", "2", "--out",
            str(tmp_path), "--no-progress"]
    assert run_cli(*argv) == 0
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == ["higher-lr"]  # repeated ids run once
    assert oct((tmp_path / "report.md").stat().st_mode & 0o777) == "0o644"

    with sqlite3.connect(tmp_path / "normlab.db") as db:
        db.execute("UPDATE meta SET value='0000' WHERE key='data:classify:digits'")
    capsys.readouterr()
    assert run_cli(*argv) == 2
    assert "contains runs trained on another copy of digits" in capsys.readouterr().err
