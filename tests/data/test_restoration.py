"""Tests for normlab.data.restoration: image folders, named sets, patches and noise.

Synthetic PNG, BMP, TIFF and JPEG files in tmp_path exercise the loaders and every
error path. Tests on the real benchmark files read them from $NORMLAB_DATA_DIR (the
folder holding denoise/ and sr/) and skip when it is unset.

The Set5 bicubic baseline is checked against the table in the README of
tyshiwo/DRRN_CVPR17 (Bicubic column: 33.66/0.9299 for x2, 30.39/0.8682 for x3 and
28.42/0.8104 for x4, PSNR/SSIM on Y). That table follows the VDSR protocol: take Y of
the mod-cropped HR image as uint8, resize Y in double with MATLAB's imresize down and
back up, and compare after shaving ``scale`` pixels from each border.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.data import DataError
from normlab.data.imresize import imresize, round_to_uint8
from normlab.data.restoration import (
    EMBEDDED_SPLITS,
    IMAGE_EXTENSIONS,
    RESTORATION_DATASETS,
    DenoisePatches,
    ImageSet,
    PatchLocation,
    SRPatches,
    add_noise,
    dihedral,
    image_to_tensor,
    load_embedded,
    load_image_folder,
    load_restoration,
    modcrop,
    sr_pair,
    tensor_to_image,
)
from normlab.metrics import psnr, rgb_to_y, ssim

LOGGER = "normlab.data.restoration"


# --------------------------------------------------------------------------------------
# helpers


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(path)
    return path


def write_manifest(folder: Path) -> None:
    lines = [
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}"
        for path in sorted(folder.iterdir())
        if path.is_file()
    ]
    (folder / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def real_data_dir() -> Path:
    value = os.environ.get("NORMLAB_DATA_DIR")
    if not value:
        pytest.skip(
            "NORMLAB_DATA_DIR is not set, so the real benchmark files are unknown"
        )
    return Path(value)


@pytest.fixture
def gray_folder(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """A folder with three grayscale images in three formats, names out of order."""
    folder = tmp_path / "gray"
    folder.mkdir()
    arrays = [random_image((20, 24), seed) for seed in range(3)]
    save(arrays[1], folder / "b.bmp")
    save(arrays[0], folder / "a.png")
    save(arrays[2], folder / "c.tif")
    return folder, arrays


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection fail, to prove that nothing is downloaded."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------
# load_image_folder


def test_folder_sorted_by_name(gray_folder):
    folder, arrays = gray_folder
    images = load_image_folder(folder, "L")
    assert images.names == ("a.png", "b.bmp", "c.tif")
    assert len(images) == 3
    for image, array in zip(images, arrays, strict=True):
        assert image.dtype == np.uint8
        assert np.array_equal(image, array)
    assert images.sizes == ((20, 24),) * 3
    assert images.mode == "L"
    assert images.name == "gray"
    assert images.source == str(folder)
    assert not images.lazy


def test_folder_reads_jpeg_and_upper_case(tmp_path):
    save(random_image((16, 16, 3)), tmp_path / "photo.JPG")
    save(random_image((16, 16, 3), 1), tmp_path / "other.Jpeg")
    images = load_image_folder(tmp_path, "RGB")
    assert images.names == ("other.Jpeg", "photo.JPG")
    assert images[0].shape == (16, 16, 3)


def test_folder_ignores_other_files(gray_folder):
    folder, _ = gray_folder
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    (folder / "sub").mkdir()
    save(random_image((8, 8)), folder / "sub" / "inner.png")
    assert load_image_folder(folder).names == ("a.png", "b.bmp", "c.tif")


def test_folder_gray_replicated_for_rgb(gray_folder, caplog):
    folder, arrays = gray_folder
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_image_folder(folder, "RGB")
    assert images[0].shape == (20, 24, 3)
    for channel in range(3):
        assert np.array_equal(images[0][..., channel], arrays[0])
    messages = [record.message for record in caplog.records]
    replicated = [m for m in messages if "replicated it into 3 channels" in m]
    assert len(replicated) == 3
    assert "a.png" in replicated[0]


def test_folder_rgb_converted_for_gray(tmp_path, caplog):
    rgb = random_image((10, 12, 3))
    save(rgb, tmp_path / "colour.png")
    gray_rgb = np.repeat(random_image((10, 12), 1)[..., None], 3, axis=2)
    save(gray_rgb, tmp_path / "stored_as_rgb.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_image_folder(tmp_path, "L")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(images[0], expected)
    assert np.array_equal(images[1], gray_rgb[..., 0])
    warnings = [r.message for r in caplog.records if "ITU-R 601-2" in r.message]
    assert len(warnings) == 1
    assert "colour.png" in warnings[0]


def test_folder_drops_alpha(tmp_path, caplog):
    rgba = random_image((8, 8, 4))
    save(rgba, tmp_path / "alpha.png", "RGBA")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_image_folder(tmp_path, "RGB")
    assert np.array_equal(images[0], rgba[..., :3])
    assert any("dropped the alpha channel" in r.message for r in caplog.records)


def test_folder_expands_palette(tmp_path):
    rgb = np.zeros((6, 6, 3), dtype=np.uint8)
    rgb[:3] = (200, 10, 30)
    adaptive = Image.Palette.ADAPTIVE
    palette = Image.fromarray(rgb).convert("P", palette=adaptive, colors=4)
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    images = load_image_folder(tmp_path, "RGB")
    assert np.array_equal(images[0], rgb)


def test_folder_rejects_16_bit(tmp_path):
    deep = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    with pytest.raises(DataError, match="deep.png") as error:
        load_image_folder(tmp_path, "L")
    assert "cannot be converted to 8-bit" in str(error.value)


def test_folder_missing(tmp_path):
    with pytest.raises(DataError, match="not found") as error:
        load_image_folder(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)
    assert isinstance(error.value, ValueError)


def test_folder_is_a_file(tmp_path):
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(path)


def test_folder_empty_names_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found") as error:
        load_image_folder(tmp_path)
    for extension in IMAGE_EXTENSIONS:
        assert extension in str(error.value)


def test_folder_corrupt_image_named(gray_folder):
    folder, _ = gray_folder
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png") as error:
        load_image_folder(folder)
    assert "truncated, corrupt or not an image" in str(error.value)


def test_folder_truncated_image_named(gray_folder):
    folder, _ = gray_folder
    data = (folder / "a.png").read_bytes()
    (folder / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="a.png"):
        load_image_folder(folder)


def test_folder_manifest_checked(gray_folder):
    folder, _ = gray_folder
    write_manifest(folder)
    assert len(load_image_folder(folder)) == 3
    save(random_image((20, 24), 9), folder / "b.bmp")
    with pytest.raises(DataError, match="checksum mismatch") as error:
        load_image_folder(folder)
    assert "b.bmp" in str(error.value)


def test_folder_rejects_unknown_mode(gray_folder):
    folder, _ = gray_folder
    with pytest.raises(ValueError, match="mode must be one of"):
        load_image_folder(folder, "RGBA")


def test_folder_lazy_decodes_on_access(gray_folder, caplog):
    folder, arrays = gray_folder
    data = (folder / "c.tif").read_bytes()
    images = load_image_folder(folder, "RGB", lazy=True)
    assert images.lazy
    assert images.sizes == ((20, 24),) * 3
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = images[0]
        again = images[0]
    assert np.array_equal(first[..., 1], arrays[0])
    assert np.array_equal(again, first)
    assert len([r for r in caplog.records if "a.png" in r.message]) == 1

    # A file damaged after loading raises when it is accessed.
    (folder / "c.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="c.tif"):
        images[2]


def test_image_set_indexing(gray_folder):
    folder, arrays = gray_folder
    images = load_image_folder(folder)
    assert np.array_equal(images[-1], arrays[2])
    with pytest.raises(IndexError, match="out of range"):
        images[3]
    with pytest.raises(TypeError, match="integer"):
        images[0:2]


# --------------------------------------------------------------------------------------
# load_restoration


def test_restoration_unknown_name():
    with pytest.raises(DataError, match="unknown restoration dataset") as error:
        load_restoration("urban100", ".")
    for name in RESTORATION_DATASETS:
        assert name in str(error.value)


def test_restoration_needs_data_dir():
    with pytest.raises(DataError, match="needs a data folder") as error:
        load_restoration("set5")
    assert "load_embedded" in str(error.value)


def test_restoration_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_restoration("set5", tmp_path / "absent")


def test_restoration_not_found_lists_searched(tmp_path):
    with pytest.raises(DataError, match="bsd68 not found") as error:
        load_restoration("bsd68", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "denoise" / "bsd68") in message
    assert str(tmp_path / "sr" / "set68") in message


def test_restoration_case_insensitive(tmp_path, caplog):
    folder = tmp_path / "Denoise" / "Train400"
    folder.mkdir(parents=True)
    for index in range(2):
        save(random_image((12, 12), index), folder / f"test_{index:03d}.png")
    # Only the lower-case "denoise" is searched, but each part matches in any case.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_restoration("BSD400", tmp_path)
    assert images.name == "bsd400"
    assert images.mode == "L"
    assert images.names == ("test_000.png", "test_001.png")
    assert any("has 2 images, expected 400" in r.message for r in caplog.records)


def test_restoration_prefers_top_level(tmp_path):
    for parent, seed in ((tmp_path, 0), (tmp_path / "sr", 1)):
        (parent / "set5").mkdir(parents=True)
        save(random_image((8, 8, 3), seed), parent / "set5" / "baby.png")
    images = load_restoration("set5", tmp_path)
    assert images.source == str(tmp_path / "set5")
    assert np.array_equal(images[0], random_image((8, 8, 3), 0))


def test_restoration_sr_replicates_gray(tmp_path):
    folder = tmp_path / "sr" / "Set14"
    folder.mkdir(parents=True)
    save(random_image((10, 10)), folder / "bridge.bmp")
    images = load_restoration("set14", tmp_path)
    assert images.mode == "RGB"
    assert images[0].shape == (10, 10, 3)


def test_restoration_div2k_is_lazy(tmp_path):
    folder = tmp_path / "DIV2K" / "DIV2K_train_HR"
    folder.mkdir(parents=True)
    save(random_image((16, 20, 3)), folder / "0001.png")
    images = load_restoration("div2k", tmp_path)
    assert images.lazy
    assert images.sizes == ((16, 20),)
    assert images[0].shape == (16, 20, 3)


# --------------------------------------------------------------------------------------
# real benchmark files from $NORMLAB_DATA_DIR

REAL_SETS = {
    # name: (count, mode, sizes that occur (H, W))
    "bsd400": (400, "L", {(180, 180)}),
    "bsd68": (68, "L", {(321, 481), (481, 321)}),
    "set12": (12, "L", {(256, 256), (512, 512)}),
    "t91": (91, "RGB", None),
    "set5": (5, "RGB", {(512, 512), (288, 288), (256, 256), (280, 280), (344, 228)}),
    "set14": (14, "RGB", None),
    "bsd100": (100, "RGB", {(321, 480), (480, 321)}),
}


@pytest.mark.parametrize("name", list(REAL_SETS))
def test_real_set_loads(name):
    count, mode, sizes = REAL_SETS[name]
    images = load_restoration(name, real_data_dir())
    assert len(images) == count
    assert images.mode == mode
    assert images.name == name
    channels = 3 if mode == "RGB" else None
    for image in images:
        assert image.dtype == np.uint8
        assert (image.shape[2] if image.ndim == 3 else None) == channels
    if sizes is not None:
        assert set(images.sizes) == sizes


def test_real_set14_bridge_replicated(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        images = load_restoration("set14", real_data_dir())
    bridge = images[images.names.index("bridge.bmp")]
    assert bridge.shape == (512, 512, 3)
    assert np.array_equal(bridge[..., 0], bridge[..., 2])
    warned = [r.message for r in caplog.records if "replicated" in r.message]
    assert len(warned) == 1
    assert "bridge.bmp" in warned[0]


def test_real_div2k_if_present():
    data_dir = real_data_dir()
    try:
        images = load_restoration("div2k", data_dir)
    except DataError as error:
        if "not found" in str(error):
            pytest.skip(f"DIV2K is not in {data_dir}")
        raise
    assert images.lazy
    assert images[0].ndim == 3


@pytest.mark.parametrize(
    ("scale", "published_psnr", "published_ssim"),
    [(2, 33.66, 0.9299), (3, 30.39, 0.8682), (4, 28.42, 0.8104)],
)
def test_real_set5_bicubic_matches_published(scale, published_psnr, published_ssim):
    images = load_restoration("set5", real_data_dir())
    psnrs, ssims = [], []
    for image in images:
        y = round_to_uint8(rgb_to_y(modcrop(image, scale)))
        low = imresize(y / 255.0, 1.0 / scale)
        restored = round_to_uint8(imresize(low, float(scale)) * 255.0)
        psnrs.append(psnr(restored, y, crop_border=scale))
        ssims.append(ssim(restored, y, crop_border=scale))
    # Equal to the published values as rounded: within half their last digit.
    assert abs(np.mean(psnrs) - published_psnr) <= 0.005
    assert abs(np.mean(ssims) - published_ssim) <= 0.00005


def test_real_set5_rgb_pipeline_close_to_published():
    # RGB-domain LR (as EDSR makes it) differs from the Y-domain protocol by rounding.
    images = load_restoration("set5", real_data_dir())
    values = []
    for image in images:
        hr, lr = sr_pair(image, 2)
        values.append(psnr(imresize(lr, 2.0), hr, crop_border=2, y_channel=True))
    assert abs(np.mean(values) - 33.66) < 0.03


# --------------------------------------------------------------------------------------
# load_embedded


@pytest.mark.parametrize("task", ["denoise", "sr"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_loads_offline(no_network, task, split):
    images = load_embedded(task, split)
    assert images.names == EMBEDDED_SPLITS[task][split]
    assert images.mode == ("L" if task == "denoise" else "RGB")
    for image in images:
        assert image.dtype == np.uint8
        assert image.ndim == (2 if task == "denoise" else 3)
        assert min(image.shape[:2]) >= 300
    assert "scikit-image" in images.source


def test_embedded_splits_disjoint():
    for task, splits in EMBEDDED_SPLITS.items():
        assert not set(splits["train"]) & set(splits["test"]), task


def test_embedded_gray_is_pil_luma():
    import skimage.data

    gray = load_embedded("denoise", "train")
    rgb = skimage.data.astronaut()
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(gray[gray.names.index("astronaut")], expected)
    camera = load_embedded("denoise", "test")
    assert np.array_equal(camera[camera.names.index("camera")], skimage.data.camera())


def test_embedded_rejects_unknown():
    with pytest.raises(DataError, match="unknown task 'deblur'"):
        load_embedded("deblur")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_embedded("sr", "val")


# --------------------------------------------------------------------------------------
# image helpers


def test_modcrop_shapes():
    image = random_image((13, 17, 3))
    cropped = modcrop(image, 4)
    assert cropped.shape == (12, 16, 3)
    assert np.array_equal(cropped, image[:12, :16])
    assert modcrop(image[..., 0], 3).shape == (12, 15)
    assert modcrop(image, 1).shape == image.shape
    with pytest.raises(ValueError, match="positive integer"):
        modcrop(image, 0)
    with pytest.raises(ValueError, match="positive integer"):
        modcrop(image, 2.0)


def test_sr_pair_is_imresize_of_modcrop():
    image = random_image((25, 31, 3))
    hr, lr = sr_pair(image, 3)
    assert hr.shape == (24, 30, 3)
    assert lr.shape == (8, 10, 3)
    assert lr.dtype == np.uint8
    assert np.array_equal(lr, imresize(image[:24, :30], 1 / 3))
    with pytest.raises(ValueError, match="uint8"):
        sr_pair(image.astype(np.float32), 2)


def test_tensor_round_trip():
    for shape in ((9, 7), (9, 7, 3)):
        image = random_image(shape)
        tensor = image_to_tensor(image)
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == ((1, 9, 7) if len(shape) == 2 else (3, 9, 7))
        assert float(tensor.max()) <= 1.0
        assert np.array_equal(tensor_to_image(tensor), image)
        assert np.array_equal(tensor_to_image(tensor[None]), image)


def test_tensor_to_image_clamps_and_rounds():
    tensor = torch.tensor([[[-0.2, 1.3, 0.5 / 255, 1.49 / 255]]])
    assert tensor_to_image(tensor).tolist() == [[0, 255, 1, 1]]


def test_add_noise_deterministic_and_unclipped():
    image = np.full((64, 64), 250, dtype=np.uint8)
    first = add_noise(image, 25, seed=3)
    second = add_noise(image, 25, seed=3)
    other = add_noise(image, 25, seed=4)
    assert first.dtype == torch.float32
    assert tuple(first.shape) == (1, 64, 64)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    noise = (first - image_to_tensor(image)) * 255
    assert float(noise.std()) == pytest.approx(25, rel=0.05)
    assert float(first.max()) > 1.0
    assert torch.equal(add_noise(image, 0, seed=3), image_to_tensor(image))
    with pytest.raises(ValueError, match="sigma must be a finite non-negative"):
        add_noise(image, -1, seed=0)


def test_dihedral_gives_eight_distinct():
    image = np.arange(12).reshape(3, 4)
    results = set()
    for transform in range(8):
        out = dihedral(image, transform)
        results.add((out.shape, out.tobytes()))
    assert len(results) == 8
    assert np.array_equal(dihedral(image, 0), image)
    assert np.array_equal(dihedral(image, 4), image[:, ::-1])
    with pytest.raises(ValueError, match="0..7"):
        dihedral(image, 8)


# --------------------------------------------------------------------------------------
# DenoisePatches


@pytest.fixture
def gray_images() -> list[np.ndarray]:
    return [random_image((30, 36), seed) for seed in range(3)]


def test_denoise_patch_shapes(gray_images):
    patches = DenoisePatches(
        gray_images, patch_size=16, sigma=25, num_patches=7, seed=1
    )
    assert len(patches) == 7
    noisy, clean = patches[0]
    assert tuple(noisy.shape) == (1, 16, 16)
    assert tuple(clean.shape) == (1, 16, 16)
    assert noisy.dtype == torch.float32
    assert clean.dtype == torch.float32
    assert 0.0 <= float(clean.min())
    assert float(clean.max()) <= 1.0


def test_denoise_clean_is_transformed_crop(gray_images):
    patches = DenoisePatches(gray_images, patch_size=12, num_patches=20, seed=2)
    for index in range(20):
        where = patches.location(index)
        assert isinstance(where, PatchLocation)
        assert where.image == index % 3
        crop = gray_images[where.image][
            where.top : where.top + 12, where.left : where.left + 12
        ]
        _, clean = patches[index]
        assert torch.equal(clean, image_to_tensor(dihedral(crop, where.transform)))


def test_denoise_noise_level(gray_images):
    patches = DenoisePatches(
        gray_images, patch_size=20, sigma=25, num_patches=30, seed=0
    )
    noise = torch.cat([(noisy - clean).flatten() for noisy, clean in patches]) * 255
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.5)
    assert float(noise.std()) == pytest.approx(25.0, rel=0.03)


def test_denoise_noisy_not_clipped():
    bright = [np.full((20, 20), 255, dtype=np.uint8)]
    noisy, _ = DenoisePatches(bright, patch_size=20, num_patches=1, seed=0)[0]
    assert float(noisy.max()) > 1.0


def test_denoise_deterministic(gray_images):
    first = DenoisePatches(gray_images, patch_size=10, num_patches=6, seed=5)
    second = DenoisePatches(gray_images, patch_size=10, num_patches=6, seed=5)
    # Access in another order: each patch depends only on (seed, epoch, index).
    backward = [second[index] for index in reversed(range(6))][::-1]
    for index in range(6):
        assert torch.equal(first[index][0], backward[index][0])
        assert torch.equal(first[index][1], backward[index][1])
    other = DenoisePatches(gray_images, patch_size=10, num_patches=6, seed=6)
    assert not torch.equal(first[0][0], other[0][0])


def test_denoise_set_epoch_draws_new(gray_images):
    patches = DenoisePatches(gray_images, patch_size=10, num_patches=4, seed=0)
    before = patches[0][0]
    patches.set_epoch(1)
    after = patches[0][0]
    assert not torch.equal(before, after)
    patches.set_epoch(0)
    assert torch.equal(patches[0][0], before)
    with pytest.raises(ValueError, match="epoch"):
        patches.set_epoch(-1)


def test_denoise_uses_all_transforms(gray_images):
    patches = DenoisePatches(gray_images, patch_size=8, num_patches=200, seed=0)
    transforms = {patches.location(index).transform for index in range(200)}
    assert transforms == set(range(8))


def test_denoise_sigma_range(gray_images):
    patches = DenoisePatches(
        gray_images, patch_size=24, sigma=(0, 55), num_patches=40, seed=0
    )
    levels = [float((noisy - clean).std()) * 255 for noisy, clean in patches]
    assert min(levels) < 15
    assert max(levels) > 40
    assert max(levels) < 60


def test_denoise_zero_sigma_is_clean(gray_images):
    noisy, clean = DenoisePatches(gray_images, 8, sigma=0, num_patches=1)[0]
    assert torch.equal(noisy, clean)


def test_denoise_rgb_images():
    images = [random_image((20, 20, 3))]
    noisy, clean = DenoisePatches(images, patch_size=8, num_patches=1)[0]
    assert tuple(noisy.shape) == (3, 8, 8)


def test_denoise_image_too_small_named(tmp_path):
    save(random_image((50, 50)), tmp_path / "large.png")
    save(random_image((30, 45)), tmp_path / "small.png")
    images = load_image_folder(tmp_path)
    with pytest.raises(DataError, match="small.png") as error:
        DenoisePatches(images, patch_size=40, num_patches=4)
    message = str(error.value)
    assert "30x45" in message
    assert "40x40" in message


def test_denoise_rejects_bad_arguments(gray_images):
    with pytest.raises(ValueError, match="num_patches"):
        DenoisePatches(gray_images, num_patches=0)
    with pytest.raises(ValueError, match="seed"):
        DenoisePatches(gray_images, 8, num_patches=1, seed=-1)
    with pytest.raises(ValueError, match="patch_size"):
        DenoisePatches(gray_images, 0, num_patches=1)
    with pytest.raises(ValueError, match="sigma"):
        DenoisePatches(gray_images, 8, sigma=-5, num_patches=1)
    with pytest.raises(ValueError, match="sigma"):
        DenoisePatches(gray_images, 8, sigma=(30, 10), num_patches=1)
    with pytest.raises(ValueError, match="at least one image"):
        DenoisePatches([], 8, num_patches=1)
    with pytest.raises(ValueError, match="uint8"):
        DenoisePatches([np.zeros((20, 20))], 8, num_patches=1)
    with pytest.raises(IndexError, match="out of range"):
        DenoisePatches(gray_images, 8, num_patches=2)[2]


def test_denoise_with_dataloader(gray_images):
    patches = DenoisePatches(gray_images, patch_size=8, num_patches=6, seed=0)
    loader = torch.utils.data.DataLoader(patches, batch_size=3)
    noisy, clean = next(iter(loader))
    assert tuple(noisy.shape) == (3, 1, 8, 8)
    assert torch.equal(clean[1], patches[1][1])


# --------------------------------------------------------------------------------------
# SRPatches


@pytest.fixture
def rgb_images() -> list[np.ndarray]:
    # 26x29 mod-crops to 24x27 for scale 3: 8x9 LR pixels, so 6x6 LR patches touch
    # the borders often.
    return [random_image((26, 29, 3), seed) for seed in range(2)]


def test_sr_patch_shapes(rgb_images):
    patches = SRPatches(rgb_images, scale=3, lr_patch=6, num_patches=5, seed=0)
    lr, hr = patches[0]
    assert tuple(lr.shape) == (3, 6, 6)
    assert tuple(hr.shape) == (3, 18, 18)
    assert lr.dtype == torch.float32
    assert float(hr.min()) >= 0.0
    assert float(hr.max()) <= 1.0


def test_sr_lr_equals_whole_image_resize(rgb_images):
    patches = SRPatches(rgb_images, scale=3, lr_patch=6, num_patches=40, seed=1)
    corners = set()
    for index in range(40):
        where = patches.location(index)
        hr_full, lr_full = sr_pair(rgb_images[where.image], 3)
        lr, hr = patches[index]
        top, left = where.top, where.left
        expected_lr = lr_full[top : top + 6, left : left + 6]
        expected_hr = hr_full[3 * top : 3 * top + 18, 3 * left : 3 * left + 18]
        assert torch.equal(lr, image_to_tensor(dihedral(expected_lr, where.transform)))
        assert torch.equal(hr, image_to_tensor(dihedral(expected_hr, where.transform)))
        corners.add((top == 0, left == 0, top == 2, left == 3))
    # Patches at the top, left, bottom and right borders were all checked.
    assert any(corner[0] for corner in corners)
    assert any(corner[1] for corner in corners)
    assert any(corner[2] for corner in corners)
    assert any(corner[3] for corner in corners)


def test_sr_interior_patch_of_large_image():
    image = random_image((90, 96, 3), seed=4)
    patches = SRPatches([image], scale=2, lr_patch=8, num_patches=30, seed=3)
    _, lr_full = sr_pair(image, 2)
    interior = 0
    for index in range(30):
        where = patches.location(index)
        lr, _ = patches[index]
        crop = lr_full[where.top : where.top + 8, where.left : where.left + 8]
        assert torch.equal(lr, image_to_tensor(dihedral(crop, where.transform)))
        interior += 3 <= where.top <= 45 - 8 - 3 and 3 <= where.left <= 48 - 8 - 3
    assert interior > 10


def test_sr_deterministic(rgb_images):
    first = SRPatches(rgb_images, 2, 4, num_patches=3, seed=7)
    second = SRPatches(rgb_images, 2, 4, num_patches=3, seed=7)
    for index in range(3):
        assert torch.equal(first[index][0], second[index][0])
        assert torch.equal(first[index][1], second[index][1])
    first.set_epoch(2)
    assert not torch.equal(first[0][1], second[0][1])


def test_sr_gray_images_have_one_channel():
    images = [random_image((20, 20))]
    lr, hr = SRPatches(images, 2, 4, num_patches=1)[0]
    assert tuple(lr.shape) == (1, 4, 4)
    assert tuple(hr.shape) == (1, 8, 8)


def test_sr_image_too_small_named(tmp_path):
    save(random_image((100, 100, 3)), tmp_path / "big.png")
    save(random_image((95, 140, 3)), tmp_path / "short.png")
    images = load_image_folder(tmp_path, "RGB")
    with pytest.raises(DataError, match="short.png") as error:
        SRPatches(images, scale=2, lr_patch=48, num_patches=2)
    message = str(error.value)
    assert "95x140" in message
    assert "96x96" in message
    # 96 pixels are exactly enough.
    save(random_image((96, 96, 3)), tmp_path / "short.png")
    SRPatches(load_image_folder(tmp_path, "RGB"), scale=2, lr_patch=48, num_patches=2)


def test_sr_rejects_bad_arguments(rgb_images):
    with pytest.raises(ValueError, match="scale"):
        SRPatches(rgb_images, 0.5, 4, num_patches=1)
    with pytest.raises(ValueError, match="lr_patch"):
        SRPatches(rgb_images, 2, 0, num_patches=1)


def test_sr_with_image_set(no_network):
    images = load_embedded("sr", "test")
    assert isinstance(images, ImageSet)
    patches = SRPatches(images, scale=4, lr_patch=12, num_patches=2, seed=0)
    lr, hr = patches[1]
    assert tuple(hr.shape) == (3, 48, 48)
    assert patches.location(1).image == 1


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), -1.0])
def test_add_noise_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be a finite non-negative number"):
        add_noise(np.zeros((4, 4), np.uint8), sigma, 0)


def test_add_noise_rejects_missing_seed():
    with pytest.raises(ValueError, match="seed must be an integer, got None"):
        add_noise(np.zeros((4, 4), np.uint8), 25, None)
