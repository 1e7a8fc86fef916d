"""`normlab train`: data-parallel training equals one process on the global batch."""

import json
import math

import pytest

from normlab import cli
from normlab.data import load_classification
from normlab.train import TrainConfig, train_classifier

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def outside_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _assert_close_lists(actual, expected, what):
    assert len(actual) == len(expected), what
    for index, (value, reference) in enumerate(zip(actual, expected)):
        assert math.isclose(value, reference, rel_tol=1e-5, abs_tol=1e-6), (
            f"{what}[{index}]: {value} != {reference}"
        )


def test_two_processes_match_one(tmp_path, capsys):
    out = tmp_path / "train.json"
    # digits has 1077 training images: the last batch of 53 splits into 27 and 26.
    argv = ["train", "--nproc", "2", "--epochs", "2", "--seed", "3", "--lr", "0.2",
            "--batch-size", "64", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"result: {out}" in printed
    assert "on 2 processes" in printed

    report = json.loads(out.read_text())
    config = TrainConfig.from_dict(report["config"])
    assert (config.seed, config.lr, config.batch_size, config.epochs) == (3, 0.2, 64, 2)
    assert config.norm == "batchnorm"
    assert report["nproc"] == 2
    expected = train_classifier(config, load_classification("digits"))

    assert report["status"] == expected.status
    assert report["steps"] == expected.steps == 34
    _assert_close_lists(report["step_loss"], expected.step_loss, "step_loss")
    assert len(report["history"]) == len(expected.history)
    for row, expected_row in zip(report["history"], expected.history):
        assert row["step"] == expected_row["step"]
        assert row["val_acc"] == expected_row["val_acc"], row["step"]
        _assert_close_lists(
            [row["train_loss"], row["val_loss"]],
            [expected_row["train_loss"], expected_row["val_loss"]],
            f"history at step {row['step']}",
        )
    for name, value in expected.final.items():
        _assert_close_lists([report["final"][name]], [value], f"final {name}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "2", "--batch-size", "63"],
         "the global batch size 63 does not split evenly over 2 processes"),
        (["--nproc", "2", "--device", "cuda"], "needs 2 CUDA devices"),
        (["--nproc", "2", "--lr", "-1"], "lr must be a positive finite number"),
    ],
)
def test_train_rejects_bad_values(argv, message, tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "r.json"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_train_rejects_bad_nproc(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--nproc", value])
    assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_nproc_must_match_torchrun(monkeypatch, tmp_path, capsys):
    for name, value in zip(TORCHRUN_VARIABLES, ("0", "2", "0")):
        monkeypatch.setenv(name, value)
    assert cli.main(["train", "--nproc", "3", "--out", str(tmp_path / "r.json")]) == 2
    assert "nproc 3 differs from torchrun's WORLD_SIZE 2" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["folder", "under-file"])
def test_train_rejects_bad_out_before_training(where, tmp_path, capsys):
    (tmp_path / "afile").touch()
    out = tmp_path if where == "folder" else tmp_path / "afile" / "result.json"
    assert cli.main(["train", "--epochs", "1", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot write the result to --out {out}" in error
    assert "loaded digits" not in error
