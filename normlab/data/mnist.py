"""MNIST from the idx distribution files or from npz arrays.

Paper: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 1998. The standard split has 60000 training and 10000
test images of 28x28 grayscale digits, with pixel 0 the background and 255 the ink.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path

import numpy as np

from normlab.data.classification import (
    ClassificationData,
    DataError,
    read_npz,
    split_and_build,
    validate_arrays,
)
from normlab.data.download import download_file, verify_manifest, verify_md5

logger = logging.getLogger(__name__)

# Base URLs that the standard file names are appended to, tried in order.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)

# Standard file stems (without ".gz") and the published md5 of each gzip file, the
# values torchvision's MNIST dataset checks. Uncompressed files have no published md5.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_NPZ = ("mnist_train.npz", "mnist_test.npz")

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_TRAIN_STANDARD = 60000
# 5000 of the 60000 standard training images are held out for validation, the same
# fraction (1/12) of a smaller training set.
VAL_FRACTION = 5000 / 60000

# The idx type code of unsigned bytes, the only element type the MNIST files use.
_IDX_UBYTE = 0x08


def candidate_folders(data_dir: Path) -> list[Path]:
    """Return the folders searched for MNIST files, in order."""
    return [
        data_dir,
        data_dir / "mnist",
        data_dir / "MNIST" / "raw",
        data_dir / "classify" / "mnist",
    ]


def load_mnist(data_dir: Path, download: bool = False) -> ClassificationData:
    """Load MNIST from the first folder under ``data_dir`` that has a complete copy.

    In each folder the four idx files (gzip or uncompressed) come before the npz pair.
    With ``download``, idx files missing from ``data_dir`` itself are downloaded there
    when no folder has a complete copy.
    """
    for folder in candidate_folders(data_dir):
        idx_paths = find_idx_files(folder)
        if idx_paths is not None:
            return _load_from_idx(folder, idx_paths)
        if all((folder / name).is_file() for name in MNIST_NPZ):
            return _load_from_npz(folder)

    if download:
        for stem, md5 in MNIST_MD5.items():
            if _find_idx_file(data_dir, stem) is None:
                download_file(f"{stem}.gz", MNIST_MIRRORS, data_dir, md5)
        return _load_from_idx(data_dir, find_idx_files(data_dir))

    searched = ", ".join(str(folder) for folder in candidate_folders(data_dir))
    raise DataError(
        f"no complete MNIST copy found in {data_dir}. Searched {searched} for the four "
        f"idx files ({', '.join(f'{stem}.gz' for stem in MNIST_MD5)}, gzip or "
        f"uncompressed) or the npz pair ({', '.join(MNIST_NPZ)}). Copy them into "
        f"{data_dir}, or use --download (download=True) to download the idx files"
    )


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """Return {stem: path} of the four idx files, or None if one is not in folder."""
    paths = {stem: _find_idx_file(folder, stem) for stem in MNIST_MD5}
    if any(path is None for path in paths.values()):
        return None
    return paths


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes with ``ndim`` dimensions, gzip or not.

    The idx header is two zero bytes, the element type code (0x08 for unsigned bytes),
    the number of dimensions, then each dimension as a big-endian uint32. The data must
    fill exactly the declared shape.

    Raises:
        DataError: for a wrong magic number or a truncated or corrupt file.
    """
    fix = "delete it and download it again (--download or download=True) or copy in the original"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"cannot read {path}: {error}; the file is corrupt, so {fix}"
        ) from error

    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic != expected_magic:
        found = "a file shorter than 4 bytes" if magic is None else f"0x{magic:08x}"
        raise DataError(
            f"{path} is not an idx file of unsigned bytes with {ndim} dimensions: "
            f"magic number {found}, expected 0x{expected_magic:08x}; {fix}"
        )

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated inside its idx header; {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    num_bytes = len(raw) - header_size
    expected_bytes = int(np.prod(shape, dtype=np.int64))
    if num_bytes != expected_bytes:
        state = "truncated" if num_bytes < expected_bytes else "longer than declared"
        raise DataError(
            f"{path} is {state}: its header declares shape {shape} ({expected_bytes} "
            f"bytes) but it contains {num_bytes} data bytes; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_from_idx(folder: Path, paths: dict[str, Path]) -> ClassificationData:
    verify_manifest(folder)
    for stem, path in paths.items():
        if path.suffix == ".gz":
            verify_md5(path, MNIST_MD5[stem])

    train_x = read_idx(paths["train-images-idx3-ubyte"], ndim=3)
    train_y = read_idx(paths["train-labels-idx1-ubyte"], ndim=1)
    test_x = read_idx(paths["t10k-images-idx3-ubyte"], ndim=3)
    test_y = read_idx(paths["t10k-labels-idx1-ubyte"], ndim=1)
    names = ", ".join(path.name for path in paths.values())
    return _build(
        (train_x, train_y, f"{paths['train-images-idx3-ubyte']} and its labels"),
        (test_x, test_y, f"{paths['t10k-images-idx3-ubyte']} and its labels"),
        source=f"{folder} (idx files: {names})",
    )


def _load_from_npz(folder: Path) -> ClassificationData:
    verify_manifest(folder)
    train_x, train_y = read_npz(folder / MNIST_NPZ[0])
    test_x, test_y = read_npz(folder / MNIST_NPZ[1])
    return _build(
        (train_x, train_y, str(folder / MNIST_NPZ[0])),
        (test_x, test_y, str(folder / MNIST_NPZ[1])),
        source=f"{folder} (npz: {', '.join(MNIST_NPZ)})",
    )


def _build(
    train: tuple[np.ndarray, np.ndarray, str],
    test: tuple[np.ndarray, np.ndarray, str],
    source: str,
) -> ClassificationData:
    for x, y, origin in (train, test):
        validate_arrays(x, y, IMAGE_SHAPE, NUM_CLASSES, origin)
    num_train = train[0].shape[0]
    if num_train < NUM_TRAIN_STANDARD:
        source += (
            f"; subset: {num_train} of the {NUM_TRAIN_STANDARD} MNIST training images"
        )
    # (N, 28, 28) -> (N, 1, 28, 28) as views, without copying.
    return split_and_build(
        "mnist",
        (train[0][:, None], train[1]),
        (test[0][:, None], test[1]),
        num_val=max(1, round(num_train * VAL_FRACTION)),
        num_classes=NUM_CLASSES,
        source=source,
    )
