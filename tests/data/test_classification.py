"""Tests for normlab.data: digits, MNIST and CIFAR-10 loading, checks and downloads.

Synthetic idx, gzip, pickle, tar and npz files in tmp_path exercise every parser and
error path without real data. Tests on the real files read them from $NORMLAB_DATA_DIR
(the folder holding classify/mnist and classify/cifar10_subset) and skip when it is
unset.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from normlab.data import (
    DATASETS,
    ClassificationData,
    DataError,
    cifar10,
    classification,
    download,
    load_classification,
    mnist,
)
from normlab.data.mnist import read_idx

MNIST_STEMS = tuple(mnist.MNIST_MD5)
BATCH_NAMES = (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH)


# --------------------------------------------------------------------------------------
# helpers


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_pixels(split, data: ClassificationData, max_value: int = 255) -> np.ndarray:
    """Undo the normalisation of a split and return its uint8 pixels (N, C, H, W)."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    pixels = torch.round((split.x.double() * std + mean) * max_value)
    return pixels.to(torch.uint8).numpy()


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Return each image with its label as bytes, sorted, to compare image multisets."""
    flat = images.reshape(images.shape[0], -1)
    return sorted(
        row.tobytes() + bytes([label]) for row, label in zip(flat, labels, strict=True)
    )


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format: magic 0x0000080N, dims, data."""
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist_arrays(num_train: int = 24, num_test: int = 10, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), np.uint8),
        "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(num_test) % 10).astype(np.uint8),
    }


def write_mnist_idx(folder: Path, arrays: dict, compress: bool) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, array in arrays.items():
        if compress:
            path = folder / f"{stem}.gz"
            # mtime=0 makes the gzip bytes, and so their md5, reproducible.
            path.write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        else:
            path = folder / stem
            path.write_bytes(idx_bytes(array))
        paths[stem] = path
    return paths


def write_mnist_npz(folder: Path, arrays: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / "mnist_train.npz",
        x=arrays["train-images-idx3-ubyte"],
        y=arrays["train-labels-idx1-ubyte"],
    )
    np.savez(
        folder / "mnist_test.npz",
        x=arrays["t10k-images-idx3-ubyte"],
        y=arrays["t10k-labels-idx1-ubyte"],
    )


def patch_mnist_md5(monkeypatch, paths: dict[str, Path]) -> None:
    for stem, path in paths.items():
        monkeypatch.setitem(mnist.MNIST_MD5, stem, md5_of(path))


class Python2Pickler(pickle._Pickler):
    """Pickler that writes str and bytes as Python 2 strings, as CIFAR-10 files have."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_string
    dispatch[bytes] = save_python2_string


def python2_batch_pickle(images_chw: np.ndarray, labels: np.ndarray) -> bytes:
    """Pickle a batch as the CIFAR-10 python distribution does (Python 2, NumPy 1)."""
    batch = {
        "batch_label": "synthetic batch",
        "labels": [int(label) for label in labels],
        "data": images_chw.reshape(images_chw.shape[0], -1),
        "filenames": [f"image_{index}.png" for index in range(len(labels))],
    }
    stream = io.BytesIO()
    Python2Pickler(stream, protocol=2).dump(batch)
    # NumPy 1 wrote its array constructor under numpy.core, not numpy._core.
    return stream.getvalue().replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )


def make_cifar_batches(per_batch: int = 4, num_test: int = 6, seed: int = 2) -> dict:
    """Return {batch name: (images (N, 3, 32, 32) uint8, labels)}."""
    rng = np.random.default_rng(seed)
    batches = {}
    for index, name in enumerate(BATCH_NAMES):
        count = num_test if name == cifar10.TEST_BATCH else per_batch
        images = rng.integers(0, 256, (count, 3, 32, 32), np.uint8)
        labels = (np.arange(count) + index) % 10
        batches[name] = (images, labels)
    return batches


def write_cifar_batches(folder: Path, batches: dict, monkeypatch) -> Path:
    batches_folder = folder / cifar10.BATCHES_FOLDER
    batches_folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        path = batches_folder / name
        path.write_bytes(python2_batch_pickle(images, labels))
        monkeypatch.setitem(cifar10.CIFAR10_MD5, name, md5_of(path))
    return batches_folder


def write_cifar_archive(folder: Path, batches: dict, monkeypatch) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / cifar10.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        for name, (images, labels) in batches.items():
            content = python2_batch_pickle(images, labels)
            info = tarfile.TarInfo(f"{cifar10.BATCHES_FOLDER}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    monkeypatch.setitem(cifar10.CIFAR10_MD5, cifar10.ARCHIVE_NAME, md5_of(archive))
    return archive


def train_and_test(
    batches: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_x = np.concatenate([batches[name][0] for name in cifar10.TRAIN_BATCHES])
    train_y = np.concatenate([batches[name][1] for name in cifar10.TRAIN_BATCHES])
    test_x, test_y = batches[cifar10.TEST_BATCH]
    return train_x, train_y, test_x, test_y


def write_manifest(folder: Path, names: list[str]) -> None:
    lines = [f"{sha256_of(folder / name)}  {name}" for name in names]
    (folder / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def real_data_dir() -> Path:
    value = os.environ.get("NORMLAB_DATA_DIR")
    if not value:
        pytest.skip(
            "NORMLAB_DATA_DIR is not set, so the real dataset files are unknown"
        )
    return Path(value)


# --------------------------------------------------------------------------------------
# names and data folders


def test_datasets_tuple():
    assert DATASETS == ("digits", "mnist", "cifar10")


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as error:
        load_classification("imagenet")
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "imagenet" in message
    for name in DATASETS:
        assert name in message


def test_name_is_case_insensitive():
    assert load_classification("Digits").name == "digits"


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_data_dir_explains_options(name):
    with pytest.raises(DataError) as error:
        load_classification(name)
    message = str(error.value)
    assert "--data-dir DIR" in message
    assert "download=True" in message


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_nonexistent_folder_raises(name, tmp_path):
    folder = tmp_path / "absent"
    with pytest.raises(DataError, match="not found") as error:
        load_classification(name, folder)
    assert str(folder) in str(error.value)
    assert not folder.exists()


def test_file_as_data_dir_raises(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("not a folder")
    with pytest.raises(DataError, match="is not a folder"):
        load_classification("mnist", path)


def test_mnist_empty_folder_names_files(tmp_path):
    with pytest.raises(DataError) as error:
        load_classification("mnist", tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    for stem in MNIST_STEMS:
        assert f"{stem}.gz" in message
    assert "mnist_train.npz" in message
    assert "mnist_test.npz" in message
    assert "download=True" in message


def test_cifar10_empty_folder_names_files(tmp_path):
    with pytest.raises(DataError) as error:
        load_classification("cifar10", tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    for name in BATCH_NAMES:
        assert name in message
    assert cifar10.ARCHIVE_NAME in message
    assert "cifar10_train*.npz" in message
    assert "download=True" in message


def test_mnist_incomplete_idx_set_raises(tmp_path):
    paths = write_mnist_idx(tmp_path, make_mnist_arrays(), compress=False)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(DataError, match="no complete MNIST copy"):
        load_classification("mnist", tmp_path)


# --------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_data():
    return load_classification("digits")


def test_digits_metadata(digits_data):
    assert digits_data.name == "digits"
    assert digits_data.num_classes == 10
    assert digits_data.in_channels == 1
    assert digits_data.image_size == 8
    assert digits_data.in_features == 64
    assert "scikit-learn" in digits_data.source


def test_digits_split_sizes(digits_data):
    assert len(digits_data.train) == 1077
    assert len(digits_data.val) == 360
    assert len(digits_data.test) == 360
    for split in (digits_data.train, digits_data.val, digits_data.test):
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)


def test_digits_splits_partition_dataset(digits_data):
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]
    expected = sorted_rows(images, bunch.target)
    splits = (digits_data.train, digits_data.val, digits_data.test)
    images_out = np.concatenate(
        [raw_pixels(split, digits_data, 16) for split in splits]
    )
    labels_out = np.concatenate([split.y.numpy() for split in splits])
    assert sorted_rows(images_out, labels_out) == expected


def test_digits_split_is_stratified(digits_data):
    totals = Counter(load_digits().target.tolist())
    expected_fraction = {"train": 0.6, "val": 0.2, "test": 0.2}
    for split_name, fraction in expected_fraction.items():
        counts = Counter(getattr(digits_data, split_name).y.tolist())
        for label, total in totals.items():
            assert abs(counts[label] - fraction * total) <= 1.5, (split_name, label)


def test_digits_split_ignores_run_seed(digits_data):
    torch.manual_seed(1234)
    np.random.seed(1234)
    again = load_classification("digits")
    assert torch.equal(again.train.x, digits_data.train.x)
    assert torch.equal(again.val.y, digits_data.val.y)
    assert torch.equal(again.test.x, digits_data.test.x)


def test_digits_train_is_standardised(digits_data):
    x = digits_data.train.x.double()
    assert abs(x.mean().item()) < 1e-5
    assert abs(x.std(unbiased=False).item() - 1.0) < 1e-5


def test_digits_statistics_from_train_split(digits_data):
    pixels = raw_pixels(digits_data.train, digits_data, 16).astype(np.float64) / 16
    assert digits_data.mean[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert digits_data.std[0] == pytest.approx(pixels.std(), abs=1e-12)


def test_split_works_with_dataloader(digits_data):
    loader = torch.utils.data.DataLoader(digits_data.val, batch_size=100)
    x, y = next(iter(loader))
    assert x.shape == (100, 1, 8, 8)
    assert y.shape == (100,)


# --------------------------------------------------------------------------------------
# MNIST from synthetic files


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_loads(tmp_path, monkeypatch, compress):
    arrays = make_mnist_arrays()
    paths = write_mnist_idx(tmp_path, arrays, compress=compress)
    patch_mnist_md5(monkeypatch, paths)
    data = load_classification("mnist", tmp_path)

    assert (len(data.train), len(data.val), len(data.test)) == (22, 2, 10)
    assert (data.in_channels, data.image_size, data.in_features) == (1, 28, 784)
    assert data.num_classes == 10
    assert "idx files" in data.source
    assert "subset: 24 of the 60000" in data.source
    train_x = arrays["train-images-idx3-ubyte"][:, None]
    train_y = arrays["train-labels-idx1-ubyte"]
    images_out = np.concatenate(
        [raw_pixels(data.train, data), raw_pixels(data.val, data)]
    )
    labels_out = np.concatenate([data.train.y.numpy(), data.val.y.numpy()])
    assert sorted_rows(images_out, labels_out) == sorted_rows(train_x, train_y)
    np.testing.assert_array_equal(
        raw_pixels(data.test, data)[:, 0], arrays["t10k-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_statistics_and_normalisation(tmp_path):
    arrays = make_mnist_arrays()
    write_mnist_idx(tmp_path, arrays, compress=False)
    data = load_classification("mnist", tmp_path)
    train = raw_pixels(data.train, data).astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(train.mean(), abs=1e-12)
    assert data.std[0] == pytest.approx(train.std(), abs=1e-12)
    assert abs(data.train.x.double().mean().item()) < 1e-5
    assert abs(data.train.x.double().std(unbiased=False).item() - 1) < 1e-5


def test_mnist_val_split_fixed(tmp_path):
    write_mnist_idx(tmp_path, make_mnist_arrays(), compress=False)
    first = load_classification("mnist", tmp_path)
    np.random.seed(99)
    torch.manual_seed(99)
    second = load_classification("mnist", tmp_path)
    assert torch.equal(first.val.x, second.val.x)
    assert torch.equal(first.train.y, second.train.y)


def test_mnist_gzip_md5_mismatch(tmp_path):
    paths = write_mnist_idx(tmp_path, make_mnist_arrays(), compress=True)
    path = paths["train-images-idx3-ubyte"]
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_classification("mnist", tmp_path)
    message = str(error.value)
    assert str(path) in message
    assert mnist.MNIST_MD5["train-images-idx3-ubyte"] in message
    assert md5_of(path) in message


@pytest.mark.parametrize("layout", [".", "mnist", "MNIST/raw", "classify/mnist"])
def test_mnist_folder_layouts(tmp_path, layout):
    write_mnist_idx(tmp_path / layout, make_mnist_arrays(), compress=False)
    data = load_classification("mnist", tmp_path)
    assert data.source.startswith(f"{tmp_path / layout} (idx files")


@pytest.mark.parametrize("layout", [".", "mnist", "MNIST/raw", "classify/mnist"])
def test_mnist_npz_layouts(tmp_path, layout):
    arrays = make_mnist_arrays()
    write_mnist_npz(tmp_path / layout, arrays)
    data = load_classification("mnist", tmp_path)
    assert "npz" in data.source
    assert len(data.train) + len(data.val) == 24
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_npz_equals_idx(tmp_path):
    arrays = make_mnist_arrays()
    write_mnist_idx(tmp_path / "a", arrays, compress=False)
    write_mnist_npz(tmp_path / "b", arrays)
    from_idx = load_classification("mnist", tmp_path / "a")
    from_npz = load_classification("mnist", tmp_path / "b")
    assert torch.equal(from_idx.train.x, from_npz.train.x)
    assert torch.equal(from_idx.val.y, from_npz.val.y)
    assert from_idx.mean == from_npz.mean


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801"):
        read_idx(path, ndim=1)


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10])
    with pytest.raises(DataError, match="is truncated") as error:
        read_idx(path, ndim=3)
    assert "(3, 28, 28)" in str(error.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:9])
    with pytest.raises(DataError, match="truncated inside its idx header"):
        read_idx(path, ndim=3)


def test_read_idx_short_file(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than 4 bytes"):
        read_idx(path, ndim=1)


def test_read_idx_extra_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="longer than declared"):
        read_idx(path, ndim=1)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    content = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8) % 10))
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path, ndim=1)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(b"plain bytes, no gzip header")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(path, ndim=1)


def test_mnist_idx_label_out_of_range(tmp_path):
    arrays = make_mnist_arrays()
    arrays["train-labels-idx1-ubyte"][3] = 10
    write_mnist_idx(tmp_path, arrays, compress=False)
    with pytest.raises(DataError, match="range from 0 to 10, expected 0 to 9"):
        load_classification("mnist", tmp_path)


def test_mnist_idx_count_mismatch(tmp_path):
    arrays = make_mnist_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_mnist_idx(tmp_path, arrays, compress=False)
    with pytest.raises(DataError, match="24 images but 23 labels"):
        load_classification("mnist", tmp_path)


def test_mnist_idx_wrong_image_size(tmp_path):
    arrays = make_mnist_arrays()
    arrays["t10k-images-idx3-ubyte"] = np.zeros((10, 32, 32), np.uint8)
    write_mnist_idx(tmp_path, arrays, compress=False)
    with pytest.raises(DataError, match=r"expected \(N, 28, 28\)"):
        load_classification("mnist", tmp_path)


NPZ_CORRUPTIONS = {
    "float images": (dict(x=np.zeros((24, 28, 28), np.float32)), "dtype float32"),
    "wrong shape": (dict(x=np.zeros((24, 1, 28, 28), np.uint8)), "shape"),
    "label too big": (dict(y=np.full(24, 10, np.uint8)), "expected 0 to 9"),
    "negative label": (dict(y=np.full(24, -1, np.int64)), "expected 0 to 9"),
    "float labels": (dict(y=np.zeros(24, np.float64)), "integer"),
    "2-d labels": (dict(y=np.zeros((24, 1), np.uint8)), "1-d integer"),
    "label count": (dict(y=np.zeros(20, np.uint8)), "24 images but 20 labels"),
    "no images": (
        dict(x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.uint8)),
        "no images",
    ),
}


@pytest.mark.parametrize("case", NPZ_CORRUPTIONS, ids=list(NPZ_CORRUPTIONS))
def test_mnist_npz_invalid_arrays(tmp_path, case):
    replacement, message = NPZ_CORRUPTIONS[case]
    arrays = make_mnist_arrays()
    write_mnist_npz(tmp_path, arrays)
    content = {
        "x": arrays["train-images-idx3-ubyte"],
        "y": arrays["train-labels-idx1-ubyte"],
    }
    content.update(replacement)
    np.savez(tmp_path / "mnist_train.npz", **content)
    with pytest.raises(DataError, match=message) as error:
        load_classification("mnist", tmp_path)
    assert "mnist_train.npz" in str(error.value)


def test_mnist_npz_missing_key(tmp_path):
    arrays = make_mnist_arrays()
    write_mnist_npz(tmp_path, arrays)
    np.savez(tmp_path / "mnist_test.npz", images=arrays["t10k-images-idx3-ubyte"])
    with pytest.raises(DataError, match="expected 'x' \\(images\\) and 'y'"):
        load_classification("mnist", tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.95])
def test_mnist_npz_truncated(tmp_path, keep_fraction):
    write_mnist_npz(tmp_path, make_mnist_arrays())
    path = tmp_path / "mnist_train.npz"
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep_fraction)])
    with pytest.raises(DataError, match="cannot read") as error:
        load_classification("mnist", tmp_path)
    assert str(path) in str(error.value)


def test_mnist_npz_pickled_object_rejected(tmp_path):
    arrays = make_mnist_arrays()
    write_mnist_npz(tmp_path, arrays)
    objects = np.array([{"a": 1}] * 24, dtype=object)
    np.savez(
        tmp_path / "mnist_train.npz", x=arrays["train-images-idx3-ubyte"], y=objects
    )
    with pytest.raises(DataError, match="cannot read"):
        load_classification("mnist", tmp_path)


# --------------------------------------------------------------------------------------
# MANIFEST.sha256


def test_manifest_match_loads(tmp_path):
    write_mnist_npz(tmp_path, make_mnist_arrays())
    write_manifest(tmp_path, ["mnist_train.npz", "mnist_test.npz"])
    assert len(load_classification("mnist", tmp_path).test) == 10


def test_manifest_mismatch_raises(tmp_path):
    arrays = make_mnist_arrays()
    write_mnist_npz(tmp_path, arrays)
    write_manifest(tmp_path, ["mnist_train.npz", "mnist_test.npz"])
    expected = sha256_of(tmp_path / "mnist_test.npz")
    np.savez(
        tmp_path / "mnist_test.npz",
        x=arrays["t10k-images-idx3-ubyte"][::-1],
        y=arrays["t10k-labels-idx1-ubyte"][::-1],
    )
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_classification("mnist", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mnist_test.npz") in message
    assert expected in message


def test_manifest_mismatch_names_hashes(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"original")
    write_manifest(tmp_path, ["data.bin"])
    expected = sha256_of(tmp_path / "data.bin")
    (tmp_path / "data.bin").write_bytes(b"changed")
    with pytest.raises(DataError) as error:
        download.verify_manifest(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "data.bin") in message
    assert expected in message
    assert sha256_of(tmp_path / "data.bin") in message


def test_manifest_subfolder_entry_checked(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.gz").write_bytes(b"abc")
    write_manifest(tmp_path, ["sub/a.gz"])
    download.verify_manifest(tmp_path)
    (tmp_path / "sub" / "a.gz").write_bytes(b"abd")
    with pytest.raises(DataError, match="sub/a.gz"):
        download.verify_manifest(tmp_path)


def test_manifest_missing_entry_skipped(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    write_manifest(tmp_path, ["a"])
    manifest = tmp_path / "MANIFEST.sha256"
    manifest.write_text(manifest.read_text() + f"{'0' * 64}  absent.gz\n")
    download.verify_manifest(tmp_path)


def test_manifest_binary_mode_line(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "MANIFEST.sha256").write_text(f"{sha256_of(tmp_path / 'a')} *a\n")
    assert download.read_manifest(tmp_path) == {"a": sha256_of(tmp_path / "a")}


def test_manifest_malformed_line(tmp_path):
    (tmp_path / "MANIFEST.sha256").write_text("not a checksum line\n")
    with pytest.raises(DataError, match="line 1 .* not in sha256sum format"):
        download.verify_manifest(tmp_path)


# --------------------------------------------------------------------------------------
# CIFAR-10 from synthetic files


def check_cifar_content(data: ClassificationData, batches: dict) -> None:
    train_x, train_y, test_x, test_y = train_and_test(batches)
    images_out = np.concatenate(
        [raw_pixels(data.train, data), raw_pixels(data.val, data)]
    )
    labels_out = np.concatenate([data.train.y.numpy(), data.val.y.numpy()])
    assert sorted_rows(images_out, labels_out) == sorted_rows(train_x, train_y)
    np.testing.assert_array_equal(raw_pixels(data.test, data), test_x)
    np.testing.assert_array_equal(data.test.y.numpy(), test_y)


def test_cifar10_batches_folder_loads(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    write_cifar_batches(tmp_path, batches, monkeypatch)
    data = load_classification("cifar10", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 6)
    assert (data.in_channels, data.image_size, data.in_features) == (3, 32, 3072)
    assert len(data.mean) == 3
    assert len(data.std) == 3
    assert "python batches" in data.source
    assert "subset: 20 of the 50000" in data.source
    check_cifar_content(data, batches)


def test_cifar10_batch_md5_mismatch(tmp_path, monkeypatch):
    batches_folder = write_cifar_batches(tmp_path, make_cifar_batches(), monkeypatch)
    monkeypatch.setitem(cifar10.CIFAR10_MD5, "data_batch_3", "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_classification("cifar10", tmp_path)
    assert str(batches_folder / "data_batch_3") in str(error.value)
    assert "0" * 32 in str(error.value)


def test_cifar10_archive_loads(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    write_cifar_archive(tmp_path / "cifar10", batches, monkeypatch)
    data = load_classification("cifar10", tmp_path)
    assert cifar10.ARCHIVE_NAME in data.source
    check_cifar_content(data, batches)


def test_cifar10_archive_md5_mismatch(tmp_path, monkeypatch):
    archive = write_cifar_archive(tmp_path, make_cifar_batches(), monkeypatch)
    monkeypatch.setitem(
        cifar10.CIFAR10_MD5, cifar10.ARCHIVE_NAME, "c58f30108f718f92721af3b95e74349a"
    )
    with pytest.raises(DataError, match="c58f30108f718f92721af3b95e74349a") as error:
        load_classification("cifar10", tmp_path)
    assert md5_of(archive) in str(error.value)


def test_cifar10_archive_missing_member(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    del batches["data_batch_5"]
    write_cifar_archive(tmp_path, batches, monkeypatch)
    with pytest.raises(DataError, match="data_batch_5"):
        load_classification("cifar10", tmp_path)


def test_cifar10_archive_corrupt(tmp_path, monkeypatch):
    archive = tmp_path / cifar10.ARCHIVE_NAME
    archive.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    monkeypatch.setitem(cifar10.CIFAR10_MD5, cifar10.ARCHIVE_NAME, md5_of(archive))
    with pytest.raises(DataError, match="cannot read"):
        load_classification("cifar10", tmp_path)


def test_cifar10_batch_truncated(tmp_path, monkeypatch):
    batches_folder = write_cifar_batches(tmp_path, make_cifar_batches(), monkeypatch)
    path = batches_folder / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    monkeypatch.setitem(cifar10.CIFAR10_MD5, "test_batch", md5_of(path))
    with pytest.raises(DataError, match="cannot read the batch"):
        load_classification("cifar10", tmp_path)


class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_batch_rejects_code(tmp_path, monkeypatch):
    batches_folder = write_cifar_batches(tmp_path, make_cifar_batches(), monkeypatch)
    marker = tmp_path / "marker"
    path = batches_folder / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": RunsCommand(marker), b"labels": [0]}))
    monkeypatch.setitem(cifar10.CIFAR10_MD5, "data_batch_1", md5_of(path))
    with pytest.raises(DataError, match="is not allowed"):
        load_classification("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar10_batch_python3_pickle(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    batches_folder = write_cifar_batches(tmp_path, batches, monkeypatch)
    images, labels = batches["data_batch_2"]
    path = batches_folder / "data_batch_2"
    path.write_bytes(
        pickle.dumps({"data": images.reshape(4, -1), "labels": list(labels)})
    )
    monkeypatch.setitem(cifar10.CIFAR10_MD5, "data_batch_2", md5_of(path))
    check_cifar_content(load_classification("cifar10", tmp_path), batches)


def test_cifar10_batch_wrong_row_size(tmp_path, monkeypatch):
    batches_folder = write_cifar_batches(tmp_path, make_cifar_batches(), monkeypatch)
    path = batches_folder / "data_batch_1"
    path.write_bytes(
        pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4})
    )
    monkeypatch.setitem(cifar10.CIFAR10_MD5, "data_batch_1", md5_of(path))
    with pytest.raises(DataError, match=r"expected \(N, 3072\) uint8"):
        load_classification("cifar10", tmp_path)


def test_cifar10_batch_label_out_of_range(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    batches["test_batch"][1][0] = 12
    write_cifar_batches(tmp_path, batches, monkeypatch)
    with pytest.raises(DataError, match="range from 0 to 12"):
        load_classification("cifar10", tmp_path)


def write_cifar_npz(folder: Path, batches: dict, suffix: str = "_tiny") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = train_and_test(batches)
    # The npz files store images height-width-channel.
    np.savez(
        folder / f"cifar10_train{suffix}.npz",
        x=train_x.transpose(0, 2, 3, 1),
        y=train_y.astype(np.uint8),
    )
    np.savez(
        folder / f"cifar10_test{suffix}.npz",
        x=test_x.transpose(0, 2, 3, 1),
        y=test_y.astype(np.uint8),
    )


@pytest.mark.parametrize(
    "layout", [".", "cifar10", "cifar10_subset", "classify/cifar10_subset"]
)
def test_cifar10_npz_layouts(tmp_path, layout):
    batches = make_cifar_batches()
    write_cifar_npz(tmp_path / layout, batches)
    data = load_classification("cifar10", tmp_path)
    assert "cifar10_train_tiny.npz" in data.source
    assert "subset" in data.source
    check_cifar_content(data, batches)


def test_cifar10_npz_equals_batches(tmp_path, monkeypatch):
    batches = make_cifar_batches()
    write_cifar_npz(tmp_path / "a", batches)
    write_cifar_batches(tmp_path / "b", batches, monkeypatch)
    from_npz = load_classification("cifar10", tmp_path / "a")
    from_batches = load_classification("cifar10", tmp_path / "b")
    assert torch.equal(from_npz.train.x, from_batches.train.x)
    assert torch.equal(from_npz.test.x, from_batches.test.x)
    assert from_npz.std == from_batches.std


def test_cifar10_npz_ambiguous(tmp_path):
    batches = make_cifar_batches()
    write_cifar_npz(tmp_path, batches, suffix="_a")
    write_cifar_npz(tmp_path, batches, suffix="_b")
    with pytest.raises(DataError, match="several files matching") as error:
        load_classification("cifar10", tmp_path)
    assert "cifar10_train_a.npz" in str(error.value)


def test_cifar10_npz_channel_first_rejected(tmp_path):
    batches = make_cifar_batches()
    write_cifar_npz(tmp_path, batches)
    train_x, train_y, _, _ = train_and_test(batches)
    np.savez(tmp_path / "cifar10_train_tiny.npz", x=train_x, y=train_y)
    with pytest.raises(DataError, match=r"expected \(N, 32, 32, 3\)"):
        load_classification("cifar10", tmp_path)


def test_cifar10_full_size_not_subset(monkeypatch, tmp_path):
    batches = make_cifar_batches()
    write_cifar_npz(tmp_path, batches)
    monkeypatch.setattr(cifar10, "NUM_TRAIN_STANDARD", 20)
    monkeypatch.setattr(cifar10, "NUM_TEST_STANDARD", 6)
    assert "subset" not in load_classification("cifar10", tmp_path).source


# --------------------------------------------------------------------------------------
# downloads from a local server


def serve_mnist(http_server, monkeypatch) -> dict[str, Path]:
    paths = write_mnist_idx(http_server.root, make_mnist_arrays(), compress=True)
    patch_mnist_md5(monkeypatch, paths)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", (http_server.url,))
    return paths


def test_download_false_never_requests(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError):
        load_classification("mnist", data_dir)
    assert http_server.requests == []


def test_mnist_download_fetches_files(tmp_path, http_server, monkeypatch):
    served = serve_mnist(http_server, monkeypatch)
    data_dir = tmp_path / "new" / "data"
    data = load_classification("mnist", data_dir, download=True)
    assert len(data.test) == 10
    assert sorted(http_server.requests) == sorted(f"/{stem}.gz" for stem in MNIST_STEMS)
    for stem, path in served.items():
        assert (data_dir / f"{stem}.gz").read_bytes() == path.read_bytes()
    assert list(data_dir.glob("*.part")) == []


def test_mnist_download_only_missing(tmp_path, http_server, monkeypatch):
    served = serve_mnist(http_server, monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for stem in MNIST_STEMS[1:]:
        (data_dir / f"{stem}.gz").write_bytes(served[stem].read_bytes())
    load_classification("mnist", data_dir, download=True)
    assert http_server.requests == [f"/{MNIST_STEMS[0]}.gz"]


def test_mnist_download_not_needed_with_npz(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    write_mnist_npz(tmp_path / "mnist", make_mnist_arrays())
    load_classification("mnist", tmp_path, download=True)
    assert http_server.requests == []


def test_download_md5_mismatch_deletes_file(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    stem = "t10k-labels-idx1-ubyte"
    actual = md5_of(http_server.root / f"{stem}.gz")
    monkeypatch.setitem(mnist.MNIST_MD5, stem, "f" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_classification("mnist", data_dir, download=True)
    message = str(error.value)
    assert f"{stem}.gz" in message
    assert "f" * 32 in message
    assert actual in message
    assert not (data_dir / f"{stem}.gz").exists()
    assert not (data_dir / f"{stem}.gz.part").exists()


def test_download_tries_next_mirror(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    mirrors = (http_server.url + "missing/", http_server.url)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", mirrors)
    data = load_classification("mnist", tmp_path / "data", download=True)
    assert len(data.train) == 22
    assert f"/missing/{MNIST_STEMS[0]}.gz" in http_server.requests


def test_download_all_mirrors_fail(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", (http_server.url + "missing/",))
    with pytest.raises(DataError, match="could not download") as error:
        load_classification("mnist", tmp_path / "data", download=True)
    assert "404" in str(error.value)


def test_download_default_folder(tmp_path, http_server, monkeypatch):
    serve_mnist(http_server, monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = load_classification("mnist", download=True)
    assert str(tmp_path / "cache" / "normlab") in data.source
    assert (tmp_path / "cache" / "normlab" / f"{MNIST_STEMS[0]}.gz").is_file()


def test_cifar10_download_archive(tmp_path, http_server, monkeypatch):
    batches = make_cifar_batches()
    archive = write_cifar_archive(http_server.root, batches, monkeypatch)
    monkeypatch.setattr(cifar10, "CIFAR10_MIRRORS", (http_server.url,))
    data_dir = tmp_path / "data"
    data = load_classification("cifar10", data_dir, download=True)
    assert http_server.requests == [f"/{cifar10.ARCHIVE_NAME}"]
    assert (data_dir / cifar10.ARCHIVE_NAME).read_bytes() == archive.read_bytes()
    check_cifar_content(data, batches)


def test_download_file_url(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "blob.bin").write_bytes(b"content")
    md5 = hashlib.md5(b"content").hexdigest()
    target = download.download_file(
        "blob.bin", [source.as_uri()], tmp_path / "out", md5
    )
    assert target.read_bytes() == b"content"


# --------------------------------------------------------------------------------------
# real files from $NORMLAB_DATA_DIR

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_SUBSET_TRAIN_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_SUBSET_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture(scope="module")
def real_mnist():
    return load_classification("mnist", real_data_dir())


@pytest.fixture(scope="module")
def real_cifar10():
    return load_classification("cifar10", real_data_dir())


def class_counts(*splits) -> list[int]:
    labels = torch.cat([split.y for split in splits])
    return torch.bincount(labels, minlength=10).tolist()


def test_real_mnist_sizes(real_mnist):
    assert (len(real_mnist.train), len(real_mnist.val), len(real_mnist.test)) == (
        55000,
        5000,
        10000,
    )
    assert real_mnist.train.x.shape == (55000, 1, 28, 28)
    assert "subset" not in real_mnist.source


def test_real_mnist_class_counts(real_mnist):
    assert class_counts(real_mnist.train, real_mnist.val) == MNIST_TRAIN_COUNTS
    assert class_counts(real_mnist.test) == MNIST_TEST_COUNTS


def test_real_mnist_statistics(real_mnist):
    # The usual MNIST values are mean 0.1307 and std 0.3081 over all 60000 training
    # images. These statistics cover the 55000 left after the validation hold-out.
    assert real_mnist.mean[0] == pytest.approx(0.1307, abs=2e-3)
    assert real_mnist.std[0] == pytest.approx(0.3081, abs=2e-3)
    assert abs(real_mnist.train.x.double().mean().item()) < 1e-4
    assert abs(real_mnist.train.x.double().std().item() - 1) < 1e-4


def test_real_mnist_idx_matches_npz(real_mnist):
    folder = real_data_dir() / "classify" / "mnist" / "original_gz"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        download.verify_md5(folder / f"{stem}.gz", mnist.MNIST_MD5[stem])
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", ndim=1)
    np.testing.assert_array_equal(raw_pixels(real_mnist.test, real_mnist)[:, 0], images)
    np.testing.assert_array_equal(real_mnist.test.y.numpy(), labels)


def test_real_cifar10_subset(real_cifar10):
    assert (len(real_cifar10.train), len(real_cifar10.val), len(real_cifar10.test)) == (
        3600,
        400,
        1000,
    )
    assert real_cifar10.train.x.shape[1:] == (3, 32, 32)
    assert "subset: 4000 of the 50000" in real_cifar10.source
    assert (
        class_counts(real_cifar10.train, real_cifar10.val) == CIFAR_SUBSET_TRAIN_COUNTS
    )
    assert class_counts(real_cifar10.test) == CIFAR_SUBSET_TEST_COUNTS


def test_real_cifar10_val_split(real_cifar10):
    folder = real_data_dir() / "classify" / "cifar10_subset"
    train_path = next(folder.glob("cifar10_train*.npz"))
    labels = np.load(train_path)["y"]
    train_index, val_index = classification.split_off_validation(4000, 400)
    np.testing.assert_array_equal(real_cifar10.train.y.numpy(), labels[train_index])
    np.testing.assert_array_equal(real_cifar10.val.y.numpy(), labels[val_index])
    assert real_cifar10.test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
