"""CIFAR-10 from the python distribution (folder or archive) or from npz arrays.

Paper: A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical
report, 2009. The standard split has 50000 training and 10000 test images, 32x32 RGB, in
10 classes. The npz files may hold a subset, which ``data.source`` then states.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from normlab.data.classification import (
    ClassificationData,
    DataError,
    read_npz,
    split_and_build,
    validate_arrays,
)
from normlab.data.download import download_file, verify_manifest, verify_md5

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # NumPy < 2 has no numpy._core
    from numpy.core.multiarray import _reconstruct, scalar

logger = logging.getLogger(__name__)

# Base URLs that ARCHIVE_NAME is appended to, tried in order.
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"

# Published md5 of the archive and of each batch file, the values torchvision's CIFAR10
# dataset checks.
CIFAR10_MD5 = {
    ARCHIVE_NAME: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
NPZ_PATTERNS = ("cifar10_train*.npz", "cifar10_test*.npz")

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
NUM_TRAIN_STANDARD = 50000
NUM_TEST_STANDARD = 10000
VAL_FRACTION = 0.1

# Globals that a batch pickle may reference: a numpy array is pickled as
# _reconstruct(ndarray, ...) plus a dtype, a numpy integer as scalar(dtype, bytes), and
# Python 3 pickles bytes via _codecs.encode. The module name depends on the NumPy
# version that wrote the file.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs.

    A pickle can call any importable function while it loads, so a batch file from an
    untrusted source could run code. Allowing only array reconstruction prevents that.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def candidate_folders(data_dir: Path) -> list[Path]:
    """Return the folders searched for CIFAR-10 files, in order."""
    return [
        data_dir,
        data_dir / "cifar10",
        data_dir / "cifar10_subset",
        data_dir / "classify" / "cifar10",
        data_dir / "classify" / "cifar10_subset",
    ]


def load_cifar10(data_dir: Path, download: bool = False) -> ClassificationData:
    """Load CIFAR-10 from the first folder under ``data_dir`` that has a complete copy.

    In each folder the extracted ``cifar-10-batches-py`` comes first, then the archive,
    then the npz pair. With ``download``, the archive is downloaded into ``data_dir``
    when no folder has a copy. The archive is read in place, never extracted.
    """
    for folder in candidate_folders(data_dir):
        batches = folder / BATCHES_FOLDER
        if all((batches / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return _load_from_batches(folder)
        if (folder / ARCHIVE_NAME).is_file():
            return _load_from_archive(folder)
        npz_paths = find_npz_files(folder)
        if npz_paths is not None:
            return _load_from_npz(folder, *npz_paths)

    if download:
        download_file(
            ARCHIVE_NAME, CIFAR10_MIRRORS, data_dir, CIFAR10_MD5[ARCHIVE_NAME]
        )
        return _load_from_archive(data_dir)

    searched = ", ".join(str(folder) for folder in candidate_folders(data_dir))
    expected = ", ".join((*TRAIN_BATCHES, TEST_BATCH))
    raise DataError(
        f"no complete CIFAR-10 copy found in {data_dir}. Searched {searched} for "
        f"{BATCHES_FOLDER}/ with {expected}, for {ARCHIVE_NAME}, or for npz files "
        f"matching {' and '.join(NPZ_PATTERNS)}. Copy them into {data_dir}, or use "
        f"--download (download=True) to download {ARCHIVE_NAME}"
    )


def find_npz_files(folder: Path) -> tuple[Path, Path] | None:
    """Return the (train, test) npz paths in ``folder``, or None if either is missing.

    Raises:
        DataError: when a pattern matches more than one file.
    """
    found = []
    for pattern in NPZ_PATTERNS:
        matches = sorted(folder.glob(pattern))
        if len(matches) > 1:
            names = ", ".join(path.name for path in matches)
            raise DataError(
                f"{folder} has several files matching {pattern}: {names}; keep one "
                f"train and one test file in that folder"
            )
        found.append(matches[0] if matches else None)
    if None in found:
        return None
    return found[0], found[1]


def read_batch(stream: BinaryIO, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch pickle into images (N, 3, 32, 32) uint8 and labels (N,).

    The ``data`` rows hold 1024 red, then 1024 green, then 1024 blue values, each
    channel in row-major order, so they reshape directly to channel-first images.
    """
    fix = "the file is corrupt, so replace it with the original"
    try:
        # encoding="bytes" keeps the byte-string keys of the Python 2 pickles readable.
        batch = _BatchUnpickler(stream, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
    ) as error:
        raise DataError(f"cannot read the batch {origin}: {error}; {fix}") from error
    # The Python 2 distribution files have byte-string keys, but a batch re-pickled
    # under Python 3 has str keys.
    entries = {}
    if isinstance(batch, dict):
        for key in ("data", "labels"):
            entries[key] = batch.get(key.encode(), batch.get(key))
    if entries.get("data") is None or entries.get("labels") is None:
        raise DataError(f"the batch {origin} is not a dict with data and labels; {fix}")
    data = np.asarray(entries["data"])
    labels = np.asarray(entries["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"the data of the batch {origin} has shape {data.shape} and dtype "
            f"{data.dtype}, expected (N, 3072) uint8; {fix}"
        )
    images = data.reshape(-1, *IMAGE_SHAPE)
    validate_arrays(images, labels, IMAGE_SHAPE, NUM_CLASSES, origin)
    return images, labels


def _concatenate(
    batches: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, ...]:
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return images, labels


def _load_from_batches(folder: Path) -> ClassificationData:
    batches_folder = folder / BATCHES_FOLDER
    verify_manifest(folder)
    verify_manifest(batches_folder)
    batches = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = batches_folder / name
        verify_md5(path, CIFAR10_MD5[name])
        with open(path, "rb") as stream:
            batches[name] = read_batch(stream, str(path))
    return _build(
        _concatenate([batches[name] for name in TRAIN_BATCHES]),
        batches[TEST_BATCH],
        source=f"{batches_folder} (python batches)",
    )


def _load_from_archive(folder: Path) -> ClassificationData:
    archive = folder / ARCHIVE_NAME
    verify_manifest(folder)
    verify_md5(archive, CIFAR10_MD5[ARCHIVE_NAME])
    batches = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in (*TRAIN_BATCHES, TEST_BATCH):
                member = f"{BATCHES_FOLDER}/{name}"
                stream = tar.extractfile(member)
                if stream is None:
                    raise KeyError(member)
                # Read the member first so that archive errors and pickle errors are
                # reported apart.
                content = io.BytesIO(stream.read())
                batches[name] = read_batch(content, f"{archive}:{member}")
    except KeyError as error:
        raise DataError(
            f"{archive} has no file {error.args[0]}; the archive is not the CIFAR-10 "
            f"python distribution, so delete it and download it again (--download or download=True)"
        ) from error
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"cannot read {archive}: {error}; the archive is corrupt, so delete it and "
            f"download it again (--download or download=True)"
        ) from error
    return _build(
        _concatenate([batches[name] for name in TRAIN_BATCHES]),
        batches[TEST_BATCH],
        source=f"{archive} (python batches)",
    )


def _load_from_npz(
    folder: Path, train_path: Path, test_path: Path
) -> ClassificationData:
    verify_manifest(folder)
    arrays = []
    for path in (train_path, test_path):
        x, y = read_npz(path)
        # The npz arrays are height-width-channel, as images are usually stored.
        validate_arrays(x, y, (32, 32, 3), NUM_CLASSES, str(path))
        arrays.append((np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y))
    return _build(
        arrays[0],
        arrays[1],
        source=f"{folder} (npz: {train_path.name}, {test_path.name})",
    )


def _build(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    source: str,
) -> ClassificationData:
    num_train, num_test = train[0].shape[0], test[0].shape[0]
    if num_train < NUM_TRAIN_STANDARD or num_test < NUM_TEST_STANDARD:
        source += (
            f"; subset: {num_train} of the {NUM_TRAIN_STANDARD} CIFAR-10 training "
            f"images and {num_test} of the {NUM_TEST_STANDARD} test images"
        )
    return split_and_build(
        "cifar10",
        train,
        test,
        num_val=max(1, round(num_train * VAL_FRACTION)),
        num_classes=NUM_CLASSES,
        source=source,
    )
