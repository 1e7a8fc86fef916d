"""Bad input raises one clear error, and the run store in --out stays as it was.

Each command-line case starts from an --out folder whose store already contains a finished
run, runs ``normlab verify`` in this process, and checks the exit code 2, a single
``normlab: error: ...`` line that names the bad value and what to do, no traceback, and
the stored run afterwards. The checks of the Python API cover settings that have no
command-line option.
"""

import gzip
import math
import os
import shutil
import sqlite3
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from normlab import cli
from normlab.data import load_classification
from normlab.models import CNN, MLP
from normlab.nn import create_norm
from normlab.store import SCHEMA_VERSION, RunStore
from normlab.train import RunResult, TrainConfig
from normlab.train.loop import build_model
from normlab.verify import VerifyOptions

STORED = TrainConfig(hidden=(8,), epochs=1, lr=0.05, seed=3)


def store_one_run(out) -> None:
    result = RunResult(
        status="finished",
        steps=2,
        diverged_step=None,
        final={"val_acc": 0.75},
        history=[{"step": 2, "epoch": 1, "val_acc": 0.75}],
        step_loss=[2.0, 1.5],
        wall_time=0.5,
    )
    with RunStore(out / "normlab.db") as store:
        store.finish(store.start(STORED), result)


def store_rows(out) -> tuple[list, list]:
    with sqlite3.connect(f"file:{out / 'normlab.db'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        metrics = db.execute("SELECT * FROM metrics ORDER BY run_id, name, step").fetchall()
    return runs, metrics


@pytest.fixture
def out(tmp_path):
    """Return an --out folder whose store contains one finished run, checked afterwards."""
    folder = tmp_path / "out"
    store_one_run(folder)
    before = store_rows(folder)
    assert len(before[0]) == 1
    yield folder
    assert store_rows(folder) == before


def verify_error(capsys, *argv) -> str:
    """Run ``normlab verify ARGV``, check exit code 2 and one error line; return it."""
    code = cli.main(["verify", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("normlab: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def usage_error(capsys, *argv) -> str:
    """Run ``normlab verify ARGV`` that argparse rejects; return its error line."""
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", "--no-progress", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# -- classification data ---------------------------------------------------------------


def mnist_arrays(num_train: int = 24, num_test: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {
        "train": (rng.integers(0, 256, (num_train, 28, 28), np.uint8),
                  (np.arange(num_train) % 10).astype(np.uint8)),
        "test": (rng.integers(0, 256, (num_test, 28, 28), np.uint8),
                 (np.arange(num_test) % 10).astype(np.uint8)),
    }


def write_mnist_npz(folder, arrays: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in arrays.items():
        np.savez(folder / f"mnist_{split}.npz", x=x, y=y)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_mnist_idx(folder, compress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = mnist_arrays()
    stems = {
        "train-images-idx3-ubyte": arrays["train"][0],
        "train-labels-idx1-ubyte": arrays["train"][1],
        "t10k-images-idx3-ubyte": arrays["test"][0],
        "t10k-labels-idx1-ubyte": arrays["test"][1],
    }
    for stem, array in stems.items():
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        else:
            (folder / stem).write_bytes(idx_bytes(array))


@pytest.mark.parametrize("bad_value, count", [(math.nan, "3 NaN and 0 Inf"),
                                              (math.inf, "0 NaN and 3 Inf")])
def test_npz_images_with_nan_or_inf(bad_value, count, tmp_path, out, capsys):
    arrays = mnist_arrays()
    images = arrays["train"][0].astype(np.float32) / 255
    images[0, 0, :3] = bad_value
    arrays["train"] = (images, arrays["train"][1])
    write_mnist_npz(tmp_path / "data", arrays)
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert "mnist_train.npz" in line
    assert "dtype float32" in line
    assert count in line
    assert "save x as uint8 pixels" in line


def test_npz_labels_with_nan(tmp_path, out, capsys):
    arrays = mnist_arrays()
    labels = arrays["test"][1].astype(np.float64)
    labels[4] = math.nan
    arrays["test"] = (arrays["test"][0], labels)
    write_mnist_npz(tmp_path / "data", arrays)
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert "labels in" in line
    assert "mnist_test.npz" in line
    assert "1 NaN and 0 Inf" in line
    assert "expected a 1-d integer array" in line


def test_cifar_npz_with_inf(tmp_path, out, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    x = rng.random((20, 32, 32, 3))
    x[5, 1, 2, 0] = -math.inf
    np.savez(folder / "cifar10_train.npz", x=x, y=np.arange(20) % 10)
    np.savez(folder / "cifar10_test.npz", x=rng.integers(0, 256, (10, 32, 32, 3), np.uint8),
             y=np.arange(10) % 10)
    line = verify_error(capsys, "--dataset", "cifar10", "--data-dir", str(folder),
                        "--out", str(out))
    assert "cifar10_train.npz" in line
    assert "0 NaN and 1 Inf" in line


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_classification_folder_missing_or_empty(case, tmp_path, out, capsys):
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(folder),
                        "--out", str(out))
    assert str(folder) in line
    expected = "not found" if case == "missing" else "no complete MNIST copy found"
    assert expected in line
    assert "--data-dir" in line or "--download" in line


def test_mnist_idx_truncated(tmp_path, out, capsys):
    folder = tmp_path / "data"
    write_mnist_idx(folder, compress=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(folder),
                        "--out", str(out))
    assert f"{path} is truncated" in line
    assert "(10, 28, 28)" in line
    assert "download it again" in line


def test_mnist_gzip_corrupt(tmp_path, out, capsys):
    folder = tmp_path / "data"
    write_mnist_idx(folder, compress=True)
    path = folder / "train-images-idx3-ubyte.gz"  # the first file checked
    path.write_bytes(path.read_bytes()[:20])
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(folder),
                        "--out", str(out))
    assert f"checksum mismatch for {path}" in line
    assert "expected md5 f68b3c2dcbeaaa9fbdd348bbdeb94873" in line
    assert "download it again" in line


@pytest.mark.parametrize("keep", [0, 0.5])
def test_cifar_npz_truncated(keep, tmp_path, out, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 10)):
        np.savez(folder / f"cifar10_{split}.npz",
                 x=rng.integers(0, 256, (count, 32, 32, 3), np.uint8), y=np.arange(count) % 10)
    path = folder / "cifar10_train.npz"
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    line = verify_error(capsys, "--dataset", "cifar10", "--data-dir", str(folder),
                        "--out", str(out))
    assert f"cannot read {path}" in line
    assert "truncated or corrupt" in line


def test_cifar_batch_corrupt(tmp_path, out, capsys):
    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for index in range(1, 6):
        (batches / f"data_batch_{index}").write_bytes(b"\x80\x02garbage")
    (batches / "test_batch").write_bytes(b"\x80\x02garbage")
    line = verify_error(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert f"checksum mismatch for {batches / 'data_batch_1'}" in line
    assert "replace it with the original" in line


def test_manifest_mismatch(tmp_path, out, capsys):
    folder = tmp_path / "data"
    write_mnist_npz(folder, mnist_arrays())
    wrong = "0" * 64
    (folder / "MANIFEST.sha256").write_text(f"{wrong}  mnist_test.npz\n")
    line = verify_error(capsys, "--dataset", "mnist", "--data-dir", str(folder),
                        "--out", str(out))
    assert f"checksum mismatch for {folder / 'mnist_test.npz'}" in line
    assert f"expects sha256 {wrong}" in line
    assert "replace it with an intact copy" in line


# -- restoration folders ---------------------------------------------------------------


def write_denoise_sets(root) -> dict:
    """Write tiny train400 and bsd68 folders of gray PNGs; return {name: folder}."""
    rng = np.random.default_rng(0)
    folders = {}
    for name, count in (("train400", 2), ("bsd68", 1)):
        folder = root / "denoise" / name
        folder.mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (48, 48), np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
        folders[name] = folder
    return folders


def test_restoration_folder_missing(tmp_path, out, capsys):
    missing = tmp_path / "nowhere"
    line = verify_error(capsys, "--claims", "dncnn-bn", "--data-dir", str(missing),
                        "--out", str(out))
    assert f"data folder {missing} not found" in line


def test_restoration_set_folder_empty(tmp_path, out, capsys):
    folders = write_denoise_sets(tmp_path / "data")
    for path in folders["bsd68"].iterdir():
        path.unlink()
    line = verify_error(capsys, "--claims", "dncnn-bn", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert f"no images found in {folders['bsd68']}" in line
    assert ".png" in line


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
@pytest.mark.parametrize("set_name", ["train400", "set12"])
def test_restoration_image_damaged(damage, set_name, tmp_path, out, capsys):
    folders = write_denoise_sets(tmp_path / "data")
    if set_name == "set12":  # an optional test set: damaged is not the same as absent
        folders["set12"] = folders["train400"].with_name("set12")
        folders["set12"].mkdir()
        shutil.copy(folders["bsd68"] / "0.png", folders["set12"] / "0.png")
    path = folders[set_name] / "0.png"
    content = path.read_bytes()
    if damage == "corrupt":
        path.write_bytes(content[:8] + b"\x00" * (len(content) - 8))
    else:
        path.write_bytes(content[: len(content) // 2])
    line = verify_error(capsys, "--claims", "dncnn-bn", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert f"cannot decode image {path}" in line
    assert "replace it with an intact copy" in line


def test_restoration_manifest_mismatch(tmp_path, out, capsys):
    folders = write_denoise_sets(tmp_path / "data")
    wrong = "f" * 64
    (folders["train400"] / "MANIFEST.sha256").write_text(f"{wrong}  1.png\n")
    line = verify_error(capsys, "--claims", "dncnn-bn", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out))
    assert f"checksum mismatch for {folders['train400'] / '1.png'}" in line
    assert f"expects sha256 {wrong}" in line


# -- names and settings ----------------------------------------------------------------


def test_unknown_claim_id(out, capsys):
    line = usage_error(capsys, "--claims", "higher-lr,bn-is-magic", "--out", str(out))
    assert "argument --claims: unknown claim 'bn-is-magic'" in line
    assert "normlab claims" in line


@pytest.mark.parametrize("build", [
    lambda: create_norm("batchnrom", 8),
    lambda: TrainConfig(norm="batchnrom"),
    lambda: MLP(64, (8,), 10, norm="batchnrom"),
    lambda: CNN(1, 10, 8, norm="batchnrom"),
])
def test_unknown_norm_name(build):
    with pytest.raises(ValueError, match="unknown normalization 'batchnrom'") as info:
        build()
    assert "layernorm" in str(info.value)  # lists the valid names


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
    (["--seeds", "-2"], "argument --seeds: expected a positive integer, got -2"),
    (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["--seeds", "two"], "argument --seeds: expected a positive integer, got 'two'"),
])
def test_cli_setting_out_of_range(argv, message, out, capsys):
    assert message in usage_error(capsys, *argv, "--out", str(out))


@pytest.mark.parametrize("field, value, message", [
    ("lr", -0.1, "lr must be a positive finite number, got -0.1"),
    ("lr", 0.0, "lr must be a positive finite number, got 0.0"),
    ("lr", math.nan, "lr must be a positive finite number, got nan"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("epochs", 0, "epochs must be a positive integer, got 0"),
    ("eval_every", -1, "eval_every must be a positive integer, got -1"),
    ("norm_eps", 0.0, "norm_eps must be a positive finite number, got 0.0"),
    ("norm_eps", -1e-5, "norm_eps must be a positive finite number, got -1e-05"),
    ("norm_momentum", 1.5, "norm_momentum must be None or in [0, 1], got 1.5"),
    ("norm_momentum", -0.1, "norm_momentum must be None or in [0, 1], got -0.1"),
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("seed", -1, "seed must be a non-negative integer, got -1"),
])
def test_config_value_out_of_range(field, value, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert str(info.value) == message


@pytest.mark.parametrize("seeds", [0, -1])
def test_verify_options_reject_seeds(seeds):
    with pytest.raises(ValueError, match=f"--seeds must be a positive integer, got {seeds}"):
        VerifyOptions(seeds=seeds).validate()


@pytest.mark.parametrize("name, message", [
    ("batchnorm", "eps must be positive during training, got 0.0"),
    ("torch-batchnorm", "eps must be positive during training, but got 0.0"),
])
def test_batchnorm_eps_zero_in_training(name, message):
    layer = create_norm(name, 4, dims=1, eps=0.0)
    with pytest.raises(ValueError, match=message):
        layer(torch.zeros(8, 4))


# -- output folder and run store -------------------------------------------------------


def test_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "report.txt"
    blocker.write_text("not a folder")
    line = verify_error(capsys, "--out", str(blocker / "out"))
    assert f"cannot create output folder {blocker / 'out'}" in line
    assert "pass a writable --out folder" in line
    assert blocker.read_text() == "not a folder"


def test_out_folder_read_only(out, capsys):
    if os.geteuid() == 0:
        # root writes into folders without write permission, but not into sysfs
        line = verify_error(capsys, "--out", "/sys/normlab-out")
        assert "cannot create output folder /sys/normlab-out" in line
        assert "pass a writable --out folder" in line
        return
    out.chmod(0o500)
    try:
        line = verify_error(capsys, "--out", str(out))
    finally:
        out.chmod(0o700)
    assert f"output folder {out} is not writable" in line


def test_store_of_newer_normlab(out, capsys):
    db_path = out / "normlab.db"
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                   (str(SCHEMA_VERSION + 1),))
        # a newer layout may lack an index of this one: it must not come back
        db.execute("DROP INDEX metrics_run")
    before = store_rows(out)
    tables = sqlite3.connect(db_path).execute(
        "SELECT name FROM sqlite_master ORDER BY name").fetchall()

    line = verify_error(capsys, "--out", str(out))
    assert f"has schema version {SCHEMA_VERSION + 1}" in line
    assert "Upgrade normlab or pass another --out folder" in line
    assert store_rows(out) == before
    assert sqlite3.connect(db_path).execute(
        "SELECT name FROM sqlite_master ORDER BY name").fetchall() == tables


def test_foreign_database_left_unchanged(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with sqlite3.connect(out / "normlab.db") as db:
        db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    line = verify_error(capsys, "--out", str(out))
    assert "not a normlab run store" in line
    with sqlite3.connect(out / "normlab.db") as db:
        tables = db.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("runs",)]


# -- model and data sizes --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def test_mlp_input_size_mismatch(digits):
    model = build_model(TrainConfig(hidden=(8,)), digits)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(2, 1, 28, 28))
    message = str(info.value)
    assert "MLP expects 64 values per sample" in message
    assert "with 784" in message
    assert "set in_features to match the data" in message


def test_cnn_input_size_mismatch(digits):
    model = build_model(TrainConfig(model="cnn"), digits)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(2, 3, 32, 32))
    message = str(info.value)
    assert "CNN expects input of shape (N, 1, 8, 8)" in message
    assert "got (2, 3, 32, 32)" in message
