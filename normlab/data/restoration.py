"""Image restoration data: denoising and super-resolution sets, patches and noise.

The standard benchmarks are read from a data folder:

- denoising (DnCNN, Zhang et al., IEEE TIP 2017), grayscale: ``bsd400`` (the 400
  180x180 BSD training images, folder ``train400``), ``bsd68`` and ``set12``;
- super-resolution (EDSR, Lim et al., CVPRW 2017), RGB: ``t91`` and ``div2k``
  (``DIV2K_train_HR``) for training, ``set5``, ``set14`` and ``bsd100`` for testing.

``load_embedded`` returns natural photographs that ship with scikit-image, so that tests
and quick runs need no download. ``DenoisePatches`` and ``SRPatches`` sample training
patches with the 8 flips and rotations, deterministically for a seed.

Conventions:

- images are uint8 arrays, (H, W) for grayscale and (H, W, 3) for RGB, and tensors are
  float32 (C, H, W) in [0, 1] (pixel / 255);
- Gaussian noise of level ``sigma`` (on the 0-255 scale) is added to the [0, 1] image
  as N(0, (sigma / 255)^2), and the noisy image is neither clipped nor rounded, as in
  the DnCNN training and test code;
- low-resolution images are MATLAB's bicubic ``imresize(hr, 1 / scale)`` of the HR
  image mod-cropped to a multiple of ``scale``, computed on uint8 as MATLAB does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from normlab.data.classification import DataError
from normlab.data.download import (
    MANIFEST_NAME,
    download_file,
    file_digest,
    read_manifest_file,
    verify_manifest,
)
from normlab.data.imresize import imresize, round_to_uint8

logger = logging.getLogger(__name__)


class SetNotFoundError(DataError):
    """A data folder that contains no folder of the requested restoration set."""


IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
MODES = ("L", "RGB")

# Pillow modes that convert to "L" or "RGB" without losing the meaning of the values.
# 16-bit ("I;16"), 32-bit ("I", "F") and other colour spaces ("CMYK", "YCbCr") raise.
_SUPPORTED_SOURCE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


@dataclass(frozen=True)
class RestorationSpec:
    """A named restoration dataset and where to find it under a data folder.

    Attributes:
        task: "denoise" or "sr".
        split: "train" or "test".
        mode: Pillow mode the images are returned in, "L" or "RGB".
        folders: folder names to try, case-insensitively, under the data folder and
            its ``denoise/`` and ``sr/`` subfolders; the first that exists is used.
        num_images: image count of the standard set. Another count is logged as a
            warning, so that a subset is visible.
        lazy: decode each image when it is accessed instead of at load time, for sets
            too large to hold in memory.
    """

    task: str
    split: str
    mode: str
    folders: tuple[str, ...]
    num_images: int
    lazy: bool = False


RESTORATION_DATASETS: dict[str, RestorationSpec] = {
    "bsd400": RestorationSpec("denoise", "train", "L", ("train400", "bsd400"), 400),
    "bsd68": RestorationSpec("denoise", "test", "L", ("bsd68", "set68"), 68),
    "set12": RestorationSpec("denoise", "test", "L", ("set12",), 12),
    "t91": RestorationSpec("sr", "train", "RGB", ("t91",), 91),
    # DIV2K's 800 training images take about 6 GB as uint8 arrays.
    "div2k": RestorationSpec(
        "sr",
        "train",
        "RGB",
        ("DIV2K_train_HR", "div2k/DIV2K_train_HR", "div2k"),
        800,
        lazy=True,
    ),
    "set5": RestorationSpec("sr", "test", "RGB", ("set5",), 5),
    "set14": RestorationSpec("sr", "test", "RGB", ("set14",), 14),
    "bsd100": RestorationSpec("sr", "test", "RGB", ("bsd100", "b100"), 100),
}

# Where ``load_restoration(..., download=True)`` fetches each standard set: a repository
# pinned to a commit and the folder inside it. The files' SHA-256 sums ship in
# ``normlab/data/manifests/<name>.sha256``; DIV2K (about 3.5 GB) is not downloaded.
_RAW = "https://raw.githubusercontent.com"
_DNCNN = f"{_RAW}/cszn/DnCNN/e93b27812d3ff523a3a79d19e5e50d233d7a8d0a"
DOWNLOAD_SOURCES: dict[str, tuple[str, str]] = {
    "bsd400": (
        "denoise/train400",
        f"{_DNCNN}/TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400",
    ),
    "bsd68": ("denoise/bsd68", f"{_DNCNN}/testsets/BSD68"),
    "set12": ("denoise/set12", f"{_DNCNN}/testsets/Set12"),
    "set5": ("sr/set5", f"{_DNCNN}/testsets/Set5"),
    "set14": ("sr/set14", f"{_DNCNN}/testsets/Set14"),
    "t91": (
        "sr/t91",
        f"{_RAW}/tegg89/SRCNN-Tensorflow/78be1a24697935fc39a3a8cf59a6632264afade7/Train",
    ),
    "bsd100": (
        "sr/bsd100",
        f"{_RAW}/jbhuang0604/SelfExSR/8f6dd8c1d20cb7e8792a7177b4f6fd677633f598/data/"
        "BSD100/image_SRF_3",
    ),
}
MANIFEST_DIR = Path(__file__).with_name("manifests")


def download_restoration(name: str, data_dir: str | os.PathLike) -> Path:
    """Download the standard set ``name`` into ``data_dir`` and check every SHA-256 sum.

    Files that are already present with the right sum are kept. The folder gets a
    ``MANIFEST.sha256``, so later loads check the files again.

    Raises:
        DataError: for a set without a download source, or a file that no source served
            with the expected sum (the file is deleted).
    """
    key = name.strip().lower()
    if key not in DOWNLOAD_SOURCES:
        raise DataError(
            f"{key} cannot be downloaded; sets with a download source: "
            f"{', '.join(DOWNLOAD_SOURCES)}. Copy its images into a folder instead"
        )
    relative, base_url = DOWNLOAD_SOURCES[key]
    folder = Path(data_dir).expanduser() / relative
    manifest = MANIFEST_DIR / f"{key}.sha256"
    expected = read_manifest_file(manifest)
    for filename, digest in tqdm(sorted(expected.items()), desc=f"download {key}",
                                 unit="file"):
        target = folder / filename
        if target.exists() and file_digest(target, "sha256") == digest:
            continue
        download_file(filename, [base_url], folder, digest, algorithm="sha256")
    (folder / MANIFEST_NAME).write_text(manifest.read_text())
    return folder


# Natural photographs bundled with scikit-image 0.26 (in ``skimage.data.data_dir``), so
# they load without a network. The train and test lists share no image. RGB photos are
# converted to grayscale for denoising with Pillow's ITU-R 601-2 luma, as
# load_image_folder converts RGB files.
EMBEDDED_FILES = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "rocket": "rocket.jpg",
}
EMBEDDED_SPLITS = {
    "denoise": {
        "train": (
            "astronaut",
            "brick",
            "coffee",
            "grass",
            "gravel",
            "hubble_deep_field",
            "motorcycle_left",
        ),
        "test": ("camera", "chelsea", "coins", "moon", "rocket"),
    },
    "sr": {
        "train": ("astronaut", "coffee", "hubble_deep_field", "motorcycle_left"),
        "test": ("chelsea", "rocket"),
    },
}
EMBEDDED_MODES = {"denoise": "L", "sr": "RGB"}


@dataclass(frozen=True, eq=False)
class ImageSet(Sequence):
    """The images of one dataset, in file-name order, as uint8 arrays.

    ``image_set[i]`` returns image ``i``, (H, W) for mode "L" and (H, W, 3) for "RGB".
    A lazy set decodes the file on each access, and an eager one keeps every image in
    memory.

    Attributes:
        name: dataset name or folder name.
        mode: "L" or "RGB".
        names: file names (or scikit-image names), one per image.
        sizes: (height, width) of each image.
        source: folder or origin of the images.
        images: the decoded images, or None for a lazy set.
        paths: the image files of a lazy set, or None.
    """

    name: str
    mode: str
    names: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    source: str
    images: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    paths: tuple[Path, ...] | None = field(default=None, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"ImageSet index must be an integer, got {index!r}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        if self.images is not None:
            return self.images[index]
        path = self.paths[index]
        image = read_image(path, self.mode, warn=path not in self._warned)
        # Conversion warnings are logged on the first access of each file only.
        self._warned.add(path)
        return image

    @property
    def lazy(self) -> bool:
        """True when images are decoded on access."""
        return self.images is None


def load_image_folder(
    path: str | os.PathLike, mode: str = "L", lazy: bool = False
) -> ImageSet:
    """Load every PNG, BMP, JPEG and TIFF file in a folder, sorted by file name.

    A ``MANIFEST.sha256`` in the folder (``sha256sum`` format) is checked first. Files
    of other types and subfolders are ignored.

    Images are converted to ``mode``. A grayscale image where RGB is expected is
    replicated into three channels with a logged warning, so that Set14's grayscale
    ``bridge.bmp`` can go through RGB models (its Y is then the gray value mapped
    linearly onto 16..235). An RGB image where grayscale is expected
    is converted with Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B,
    rounded), with a warning unless its three channels are equal. Alpha channels are
    dropped with a warning, and palette images are expanded.

    Args:
        path: the folder.
        mode: "L" (grayscale) or "RGB".
        lazy: decode each image on access instead of now. Only the headers are read
            now, so a corrupt file raises when its image is accessed.

    Raises:
        DataError: for a missing folder, a folder without images (the message names
            the extensions), a checksum mismatch, or a corrupt, truncated or
            unsupported image (the message names the file).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "not found"
        raise DataError(
            f"image folder {folder} {problem}; pass the folder that contains the image "
            f"files"
        )
    files = sorted(
        (
            child
            for child in folder.iterdir()
            if child.is_file()
            and not child.name.startswith(".")
            and child.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=lambda child: child.name,
    )
    if not files:
        raise DataError(
            f"no images found in {folder}; expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case)"
        )
    if (folder / MANIFEST_NAME).is_file():
        verify_manifest(folder)

    names = tuple(child.name for child in files)
    if lazy:
        sizes = tuple(_read_size(child) for child in files)
        image_set = ImageSet(
            folder.name, mode, names, sizes, str(folder), paths=tuple(files)
        )
    else:
        images = tuple(read_image(child, mode) for child in files)
        sizes = tuple(image.shape[:2] for image in images)
        image_set = ImageSet(folder.name, mode, names, sizes, str(folder), images)
    logger.info(
        "loaded %d %s images from %s%s", len(names), mode, folder, " (lazy)" * lazy
    )
    return image_set


def read_image(path: str | os.PathLike, mode: str, warn: bool = True) -> np.ndarray:
    """Decode one image file into a uint8 array in ``mode``, as load_image_folder does.

    Args:
        path: the image file.
        mode: "L" for (H, W) or "RGB" for (H, W, 3).
        warn: log a warning when the conversion changes or replicates channels.

    Raises:
        DataError: when Pillow cannot decode the file or its mode is unsupported.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _convert(image, mode, path, warn)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"cannot decode image {path}: {error}; the file is truncated, corrupt or "
            f"not an image, so replace it with an intact copy"
        ) from error


def _read_size(path: Path) -> tuple[int, int]:
    """Return (height, width) from an image header, checking that the mode converts."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            source_mode = image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"cannot read the header of image {path}: {error}; the file is corrupt or "
            f"not an image, so replace it with an intact copy"
        ) from error
    _check_source_mode(source_mode, path)
    return height, width


def _check_source_mode(source_mode: str, path: Path) -> None:
    if source_mode not in _SUPPORTED_SOURCE_MODES:
        raise DataError(
            f"image {path} has Pillow mode {source_mode!r}, which cannot be converted "
            f"to 8-bit grayscale or RGB; convert it to an 8-bit PNG"
        )


def _convert(image: Image.Image, mode: str, path: Path, warn: bool) -> np.ndarray:
    """Return a decoded Pillow image as a uint8 array in ``mode`` ("L" or "RGB")."""
    _check_source_mode(image.mode, path)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    source_mode = image.mode
    if source_mode in ("RGBA", "LA") and warn:
        logger.warning("dropped the alpha channel of %s", path)

    if mode == "RGB":
        if source_mode in ("1", "L", "LA") and warn:
            logger.warning(
                "%s is grayscale; replicated it into 3 channels for RGB", path
            )
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    if source_mode in ("RGB", "RGBA") and warn:
        rgb = np.asarray(image.convert("RGB"))
        is_gray = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(
            rgb[..., 0], rgb[..., 2]
        )
        if not is_gray:
            logger.warning(
                "%s is RGB; converted it to grayscale with the ITU-R 601-2 luma", path
            )
    return np.asarray(image.convert("L"), dtype=np.uint8)


def load_restoration(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> ImageSet:
    """Load a standard denoising or super-resolution set from a data folder.

    The folders tried for each set are in ``RESTORATION_DATASETS``, under ``data_dir``,
    ``data_dir/denoise`` and ``data_dir/sr``, with case-insensitive names. For example
    "bsd400" is found as ``data_dir/denoise/train400`` or ``data_dir/Train400``.
    Denoising sets load as grayscale and SR sets as RGB. ``div2k`` loads lazily.

    Args:
        name: one of ``RESTORATION_DATASETS`` (case-insensitive).
        data_dir: the data folder. It is required. For images without a download,
            use :func:`load_embedded`.
        download: when the set is not found, download it into ``data_dir`` with
            :func:`download_restoration`, checking every file's SHA-256 sum.

    Raises:
        DataError: for an unknown name, a missing data folder, or any error of
            :func:`load_image_folder`.
        SetNotFoundError: for a data folder without a matching folder.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in RESTORATION_DATASETS:
        raise DataError(
            f"unknown restoration dataset {name!r}; choose one of: "
            f"{', '.join(RESTORATION_DATASETS)}"
        )
    spec = RESTORATION_DATASETS[key]
    if data_dir is None:
        raise DataError(
            f"{key} needs a data folder: pass data_dir=DIR with a {spec.folders[0]}/ "
            f"folder in DIR, DIR/denoise or DIR/sr, or use load_embedded() for images "
            f"that ship with scikit-image"
        )
    base = Path(data_dir).expanduser()
    if download and key in DOWNLOAD_SOURCES and _find_set(base, spec) is None:
        base.mkdir(parents=True, exist_ok=True)
        download_restoration(key, base)
    if not base.is_dir():
        raise DataError(
            f"data folder {base} not found; pass an existing folder as data_dir"
        )

    searched = []
    for prefix in ("", "denoise/", "sr/"):
        for relative in spec.folders:
            searched.append(str(base / f"{prefix}{relative}"))
            folder = _find_folder(base, f"{prefix}{relative}")
            if folder is None:
                continue
            image_set = load_image_folder(folder, spec.mode, lazy=spec.lazy)
            if len(image_set) != spec.num_images:
                logger.warning(
                    "%s in %s has %d images, expected %d; results are not comparable "
                    "with published numbers",
                    key,
                    folder,
                    len(image_set),
                    spec.num_images,
                )
            return ImageSet(
                key,
                image_set.mode,
                image_set.names,
                image_set.sizes,
                image_set.source,
                image_set.images,
                image_set.paths,
            )
    raise SetNotFoundError(
        f"{key} not found in {base}; searched (case-insensitively) "
        f"{', '.join(searched)}. Put the {key} images in one of these folders, or "
        f"pass --download (download=True) to fetch them"
    )


def _find_set(base: Path, spec: RestorationSpec) -> Optional[Path]:
    if not base.is_dir():
        return None
    for prefix in ("", "denoise/", "sr/"):
        for relative in spec.folders:
            folder = _find_folder(base, f"{prefix}{relative}")
            if folder is not None:
                return folder
    return None


def _find_folder(parent: Path, relative: str) -> Path | None:
    """Return ``parent/relative`` matching each part case-insensitively, or None."""
    current = parent
    for part in relative.split("/"):
        if not current.is_dir():
            return None
        exact = current / part
        if exact.is_dir():
            current = exact
            continue
        matches = sorted(
            child
            for child in current.iterdir()
            if child.is_dir() and child.name.lower() == part.lower()
        )
        if not matches:
            return None
        current = matches[0]
    return current


def load_embedded(task: str = "denoise", split: str = "train") -> ImageSet:
    """Load natural photographs that ship with scikit-image, with a fixed split.

    No file is downloaded: the images are read with Pillow from
    ``skimage.data.data_dir``. The names per split are in ``EMBEDDED_SPLITS``.

    Args:
        task: "denoise" (grayscale images) or "sr" (RGB images).
        split: "train" or "test".

    Raises:
        DataError: for an unknown task or split, or when the installed scikit-image
            lacks one of the files.
    """
    if task not in EMBEDDED_SPLITS:
        raise DataError(
            f"unknown task {task!r}; choose one of: {', '.join(EMBEDDED_SPLITS)}"
        )
    if split not in EMBEDDED_SPLITS[task]:
        raise DataError(
            f"unknown split {split!r}; choose one of: "
            f"{', '.join(EMBEDDED_SPLITS[task])}"
        )
    try:
        import skimage
        import skimage.data
    except ImportError as error:
        raise DataError(
            "load_embedded needs scikit-image; install it with "
            "`pip install scikit-image`"
        ) from error

    folder = Path(skimage.data.data_dir)
    mode = EMBEDDED_MODES[task]
    names = EMBEDDED_SPLITS[task][split]
    images = []
    for name in names:
        path = folder / EMBEDDED_FILES[name]
        if not path.is_file():
            raise DataError(
                f"scikit-image {skimage.__version__} does not ship {path.name} in "
                f"{folder}; install scikit-image 0.26, or load a data folder with "
                f"load_restoration"
            )
        images.append(read_image(path, mode, warn=False))
    return ImageSet(
        name=f"embedded-{task}-{split}",
        mode=mode,
        names=names,
        sizes=tuple(image.shape[:2] for image in images),
        source=f"scikit-image {skimage.__version__} data ({folder})",
        images=tuple(images),
    )


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom rows and right columns so that H and W are multiples of scale.

    Shape:
        - img: (H, W) or (H, W, C).
        - output: (H - H % scale, W - W % scale) or with C; a view of ``img``.
    """
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    array = np.asarray(img)
    if array.ndim not in (2, 3):
        raise ValueError(f"img must have shape (H, W) or (H, W, C), got {array.shape}")
    height = array.shape[0] - array.shape[0] % scale
    width = array.shape[1] - array.shape[1] % scale
    return array[:height, :width]


def sr_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the mod-cropped HR image and its bicubic LR image, both uint8.

    LR is MATLAB's ``imresize(modcrop(hr, scale), 1 / scale)`` on uint8, the LR of
    the Set5/Set14/B100 evaluation and of DIV2K's bicubic track.

    Shape:
        - hr: (H, W) or (H, W, C), uint8.
        - output: (H', W'[, C]) and (H' / scale, W' / scale[, C]), H' = H - H % scale.
    """
    array = np.asarray(hr)
    if array.dtype != np.uint8:
        raise ValueError(f"hr must be a uint8 image, got dtype {array.dtype}")
    cropped = modcrop(array, scale)
    return cropped, imresize(cropped, 1.0 / scale)


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """Return a uint8 image as a float32 tensor (C, H, W) in [0, 1].

    Shape:
        - img: (H, W) or (H, W, C).
        - output: (1, H, W) or (C, H, W).
    """
    array = np.asarray(img)
    if array.dtype != np.uint8:
        raise ValueError(f"img must be a uint8 image, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"img must have shape (H, W) or (H, W, C), got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Return a float tensor in [0, 1] as a uint8 image, clamped and rounded half up.

    Shape:
        - tensor: (H, W), (C, H, W) or (1, C, H, W).
        - output: (H, W) for one channel, else (H, W, C).
    """
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(
            f"tensor must have shape (H, W), (C, H, W) or (1, C, H, W), got "
            f"{tuple(tensor.shape)}"
        )
    values = tensor.detach().to("cpu", torch.float64).clamp(0.0, 1.0).numpy() * 255.0
    image = np.moveaxis(round_to_uint8(values), 0, -1)
    return image[..., 0] if image.shape[-1] == 1 else image


def add_noise(img: np.ndarray, sigma: float, seed: int) -> torch.Tensor:
    """Return ``img`` / 255 plus white Gaussian noise N(0, (sigma / 255)^2), seeded.

    The result is neither clipped nor rounded, as in DnCNN's test code. The same
    image, sigma and seed always give the same tensor.

    Args:
        img: a uint8 image.
        sigma: noise standard deviation on the 0-255 scale, for example 25.
        seed: seed of ``numpy.random.default_rng`` for the noise.

    Shape:
        - img: (H, W) or (H, W, C).
        - output: (1, H, W) or (C, H, W), float32.
    """
    if not (sigma >= 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite non-negative number, got {sigma!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}; the noise would not repeat")
    clean = image_to_tensor(img)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(tuple(clean.shape), dtype=np.float32)
    return clean + torch.from_numpy(noise) * (sigma / 255.0)


def dihedral(img: np.ndarray, transform: int) -> np.ndarray:
    """Apply one of the 8 flips and rotations of the square to an (H, W[, C]) array.

    ``transform`` in 0..7 rotates by 90 degrees counter-clockwise ``transform % 4``
    times, then flips left-right when ``transform >= 4``.
    """
    if not 0 <= transform < 8:
        raise ValueError(f"transform must be in 0..7, got {transform}")
    out = np.rot90(img, transform % 4, axes=(0, 1))
    if transform >= 4:
        out = out[:, ::-1]
    return out


class PatchLocation(NamedTuple):
    """Source of a patch: image index, top-left corner and flip/rotation.

    For ``SRPatches``, ``top`` and ``left`` are in LR pixels of the mod-cropped image.
    """

    image: int
    top: int
    left: int
    transform: int


class _PatchDataset(torch.utils.data.Dataset):
    """Shared sampling of ``DenoisePatches`` and ``SRPatches``.

    Patch ``index`` comes from image ``index % len(images)``, so every image gives the
    same number of patches. Its crop, flip/rotation and noise come from
    ``numpy.random.default_rng([seed, epoch, index])``, so a patch does not depend on
    the order of access or on DataLoader workers, and ``set_epoch`` draws new ones.
    """

    def __init__(self, images: Sequence[np.ndarray], num_patches: int, seed: int):
        if len(images) == 0:
            raise ValueError("images must contain at least one image")
        if not isinstance(num_patches, (int, np.integer)) or num_patches < 1:
            raise ValueError(
                f"num_patches must be a positive integer, got {num_patches!r}"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.images = images
        self.num_patches = int(num_patches)
        self.seed = int(seed)
        self.epoch = 0
        if isinstance(images, ImageSet):
            self._names = images.names
            self._sizes = images.sizes
        else:
            self._names = tuple(str(i) for i in range(len(images)))
            self._sizes = tuple(
                _check_uint8_image(image, i) for i, image in enumerate(images)
            )

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops, flips and noise for ``epoch`` (0 at construction)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_patches

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_patches:
            raise IndexError(f"patch index {index} out of range for {self.num_patches}")
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _check_sizes(self, min_height: int, min_width: int, patch: str) -> None:
        """Raise DataError for an image below min_height x min_width, naming it."""
        for name, (height, width) in zip(self._names, self._sizes, strict=True):
            if height < min_height or width < min_width:
                raise DataError(
                    f"image {name} is {height}x{width} pixels, smaller than the "
                    f"{patch}; drop the image or use a smaller patch size"
                )


def _check_uint8_image(image: np.ndarray, index: int) -> tuple[int, int]:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"image {index} must be a uint8 array of shape (H, W) or (H, W, C), got "
            f"dtype {array.dtype} and shape {array.shape}"
        )
    return array.shape[0], array.shape[1]


class DenoisePatches(_PatchDataset):
    """Random (noisy, clean) patches for Gaussian denoising, as DnCNN trains.

    Each item crops a ``patch_size`` square from an image, applies one of the 8 flips
    and rotations, scales it to [0, 1] and adds N(0, (sigma / 255)^2) noise. The noisy
    patch is not clipped.

    Args:
        images: uint8 images, an ``ImageSet`` or a sequence of arrays.
        patch_size: side of the square patch in pixels (DnCNN: 40 for sigma 25).
        sigma: noise level on the 0-255 scale, or a (low, high) range to draw a level
            per patch uniformly from, as the blind DnCNN-B does with (0, 55).
        num_patches: patches per epoch.
        seed: seed of the crops, flips and noise.

    Shape:
        Each item is ``(noisy, clean)``, float32 tensors (C, patch_size, patch_size),
        C = 1 for grayscale images.

    Raises:
        DataError: when an image is smaller than the patch, naming it and its size.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        patch_size: int = 40,
        sigma: float | tuple[float, float] = 25.0,
        *,
        num_patches: int,
        seed: int = 0,
    ):
        super().__init__(images, num_patches, seed)
        if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise ValueError(
                f"patch_size must be a positive integer, got {patch_size!r}"
            )
        low, high = (sigma, sigma) if np.isscalar(sigma) else (None, None)
        if not np.isscalar(sigma) and len(sigma) == 2:
            low, high = sigma
        if low is None or not (0 <= low <= high and np.isfinite(high)):
            raise ValueError(
                f"sigma must be a finite non-negative number, or a (low, high) range "
                f"with 0 <= low <= high < inf, got {sigma!r}"
            )
        self.patch_size = int(patch_size)
        self.sigma = sigma
        self._sigma_range = (float(low), float(high))
        self._check_sizes(
            self.patch_size, self.patch_size, f"patch size {patch_size}x{patch_size}"
        )

    def location(self, index: int) -> PatchLocation:
        """Return the location of patch ``index`` in the current epoch."""
        return self._location(self._rng(index), index)

    def _location(self, rng: np.random.Generator, index: int) -> PatchLocation:
        image = index % len(self.images)
        height, width = self._sizes[image]
        top = int(rng.integers(0, height - self.patch_size + 1))
        left = int(rng.integers(0, width - self.patch_size + 1))
        return PatchLocation(image, top, left, int(rng.integers(8)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._rng(index)
        where = self._location(rng, index)
        size = self.patch_size
        image = self.images[where.image]
        patch = image[where.top : where.top + size, where.left : where.left + size]
        clean = image_to_tensor(dihedral(patch, where.transform))

        low, high = self._sigma_range
        sigma = low if low == high else float(rng.uniform(low, high))
        noise = rng.standard_normal(tuple(clean.shape), dtype=np.float32)
        noisy = clean + torch.from_numpy(noise) * (sigma / 255.0)
        return noisy, clean


class SRPatches(_PatchDataset):
    """Random (LR, HR) patch pairs for super-resolution, as EDSR trains.

    Each item crops an HR square of ``lr_patch * scale`` pixels from the mod-cropped
    image at a position that is a multiple of ``scale``, and the LR patch is the
    matching ``lr_patch`` square of ``imresize(hr, 1 / scale)`` (uint8, MATLAB bicubic)
    of the whole image. Only the HR region the LR patch depends on is resized (the
    patch plus ``LR_MARGIN`` LR pixels on each side), which gives the same values as
    resizing the whole image. Both patches get the same flip/rotation.

    Args:
        images: uint8 images, an ``ImageSet`` or a sequence of arrays.
        scale: integer upscaling factor, for example 2, 3 or 4.
        lr_patch: side of the LR patch in pixels (EDSR: 48).
        num_patches: patches per epoch.
        seed: seed of the crops and flips.

    Shape:
        Each item is ``(lr, hr)``, float32 tensors in [0, 1] of shapes
        (C, lr_patch, lr_patch) and (C, lr_patch * scale, lr_patch * scale).

    Raises:
        DataError: when a mod-cropped image is smaller than the HR patch, naming it
            and its size.
    """

    # Bicubic downscaling by 1/scale weights HR pixels within 2 * scale of the sample
    # position, which is 2 LR pixels, so 3 LR pixels of context make a crop exact.
    LR_MARGIN = 3

    def __init__(
        self,
        images: Sequence[np.ndarray],
        scale: int,
        lr_patch: int = 48,
        *,
        num_patches: int,
        seed: int = 0,
    ):
        super().__init__(images, num_patches, seed)
        if not isinstance(scale, (int, np.integer)) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        if not isinstance(lr_patch, (int, np.integer)) or lr_patch < 1:
            raise ValueError(f"lr_patch must be a positive integer, got {lr_patch!r}")
        self.scale = int(scale)
        self.lr_patch = int(lr_patch)
        hr_size = self.lr_patch * self.scale
        # Mod-cropping keeps at least hr_size pixels exactly when the image has them,
        # because hr_size is a multiple of scale.
        self._check_sizes(
            hr_size,
            hr_size,
            f"HR patch size {hr_size}x{hr_size} (lr_patch {lr_patch} x scale {scale})",
        )

    def location(self, index: int) -> PatchLocation:
        """Return the location of patch ``index`` in the current epoch."""
        return self._location(self._rng(index), index)

    def _location(self, rng: np.random.Generator, index: int) -> PatchLocation:
        image = index % len(self.images)
        height, width = self._sizes[image]
        lr_height, lr_width = height // self.scale, width // self.scale
        top = int(rng.integers(0, lr_height - self.lr_patch + 1))
        left = int(rng.integers(0, lr_width - self.lr_patch + 1))
        return PatchLocation(image, top, left, int(rng.integers(8)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._rng(index)
        where = self._location(rng, index)
        hr_image = modcrop(self.images[where.image], self.scale)
        lr = self._lr_crop(hr_image, where.top, where.left)
        scale, size = self.scale, self.lr_patch * self.scale
        top, left = where.top * scale, where.left * scale
        hr = hr_image[top : top + size, left : left + size]
        lr = image_to_tensor(dihedral(lr, where.transform))
        hr = image_to_tensor(dihedral(hr, where.transform))
        return lr, hr

    def _lr_crop(self, hr_image: np.ndarray, top: int, left: int) -> np.ndarray:
        """Return the LR patch at (top, left) of ``imresize(hr_image, 1 / scale)``."""
        scale, size, margin = self.scale, self.lr_patch, self.LR_MARGIN
        lr_height, lr_width = hr_image.shape[0] // scale, hr_image.shape[1] // scale
        row_start, row_stop = max(0, top - margin), min(lr_height, top + size + margin)
        col_start, col_stop = max(0, left - margin), min(lr_width, left + size + margin)
        region = hr_image[
            row_start * scale : row_stop * scale, col_start * scale : col_stop * scale
        ]
        lr_region = imresize(region, 1.0 / scale)
        row, col = top - row_start, left - col_start
        return lr_region[row : row + size, col : col + size]
