"""Tests for normlab.data.imresize, the MATLAB-compatible bicubic resize.

Expected values are derived by hand from the kernel, or are published outputs:

- MATLAB ``imresize([1,2;3,4],[4,4],'bilinear')`` and the resize of that result back
  to 2x2 (antialiased), as printed in the question and answer copied at
  https://manongdao.com/q-286597.html (a Stack Overflow question comparing
  ``cv2.resize`` with MATLAB). These check the coordinate mapping, the symmetric
  padding and the antialiasing, which the bilinear and bicubic paths share.
- ``imresize(reshape(0:15, 4, 4)', 0.5, 'bicubic', 'AntiAliasing', false)`` =
  [2.1875 4.3125; 10.6875 12.8125], printed by an Octave (image package) script in
  the public code index (repository not named there). The first value is also worked
  out by hand in ``test_bicubic_without_antialiasing_published``.

PIL and ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` use the same
kernel (a = -0.5) and mapping, so they agree on interior pixels when the scale divides
the size. They truncate the kernel at the border instead of padding symmetrically, so
border pixels differ. scikit-image and torch's bilinear resize differ everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.transform import resize as skimage_resize

from normlab.data.imresize import contributions, cubic_kernel, imresize, round_to_uint8


def keys(x: float) -> float:
    """Keys' cubic with a = -0.5, written out for hand computations."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


@pytest.fixture(scope="module")
def camera_crop() -> np.ndarray:
    """A 132x132 float crop of scikit-image's camera, divisible by 2, 3 and 4."""
    return skimage.data.camera()[100:232, 200:332].astype(np.float64) / 255


# --------------------------------------------------------------------------------------
# values derived by hand


def test_kernel_values_by_hand():
    points = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5])
    expected = [1.0, 0.8671875, 0.5625, 0.2265625, 0.0, -0.0703125, -0.0625,
                -0.0234375, 0.0, 0.0]  # fmt: skip
    assert np.allclose(cubic_kernel(points), expected, atol=1e-15)
    assert np.allclose(cubic_kernel(-points), expected, atol=1e-15)


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 2.0, 3.0, 1.7])
@pytest.mark.parametrize("shape", [(12, 18), (12, 18, 3)])
def test_constant_image_stays_constant(scale, shape):
    image = np.full(shape, 0.3)
    out = imresize(image, scale)
    assert np.allclose(out, 0.3, atol=1e-13)
    uint8 = imresize(np.full(shape, 77, dtype=np.uint8), scale)
    assert uint8.dtype == np.uint8
    assert np.all(uint8 == 77)


def test_ramp_downscale_by_two_by_hand():
    ramp = np.arange(1.0, 17.0)[None, :].repeat(3, axis=0)
    out = imresize(ramp, 0.5)[0]
    assert out.shape == (8,)
    # The antialiased kernel is 0.5 * keys(0.5 * d). Output pixel x (1-based) sits at
    # u = 2x - 0.5, between input pixels 2x - 1 and 2x, with taps at distances
    # +-0.5, +-1.5, +-2.5, +-3.5 and weights 0.5 * keys(0.25), 0.5 * keys(0.75), ...
    distances = (3.5, 2.5, 1.5, 0.5, -0.5, -1.5, -2.5, -3.5)
    weights = [0.5 * keys(0.5 * d) for d in distances]
    assert sum(weights) == pytest.approx(1.0, abs=1e-15)
    # Symmetric weights reproduce a linear ramp where all taps are inside: u itself.
    assert np.allclose(out[2:6], [5.5, 7.5, 9.5, 11.5], atol=1e-13)
    # Output 1 reads input pixels -2..5, which symmetric padding maps to the values
    # 3 2 1 1 2 3 4 5.
    first = sum(w * v for w, v in zip(weights, [3, 2, 1, 1, 2, 3, 4, 5], strict=True))
    assert first == pytest.approx(1.44921875, abs=1e-15)
    assert out[0] == pytest.approx(first, abs=1e-13)
    # The ramp is antisymmetric about its centre, so the last output mirrors the first.
    assert out[-1] == pytest.approx(17 - first, abs=1e-13)


def test_ramp_upscale_by_two_by_hand():
    ramp = np.arange(1.0, 17.0)[:, None].repeat(2, axis=1)
    out = imresize(ramp, 2.0)[:, 0]
    assert out.shape == (32,)
    # Output x sits at u = x / 2 + 0.25, and the cubic reproduces linear functions.
    x = np.arange(1, 33)
    assert np.allclose(out[3:-3], (x / 2 + 0.25)[3:-3], atol=1e-13)
    # Output 1 sits at u = 0.75: taps at input pixels -1, 0, 1, 2 (distances 1.75,
    # 0.75, -0.25, -1.25) read the values 2, 1, 1, 2 after symmetric padding.
    distances = (1.75, 0.75, -0.25, -1.25)
    first = sum(keys(d) * v for d, v in zip(distances, (2, 1, 1, 2), strict=True))
    assert out[0] == pytest.approx(first, abs=1e-13)
    assert first == pytest.approx(0.90625, abs=1e-15)


def test_contribution_weights_sum_to_one():
    for scale in (0.25, 1 / 3, 0.5, 2.0, 3.0):
        length = 24
        out_length = round(length * scale)
        weights, indices = contributions(length, out_length, scale)
        assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-14)
        assert indices.min() >= 0
        assert indices.max() < length


# --------------------------------------------------------------------------------------
# published outputs


def test_bilinear_matches_published_matlab():
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    up = imresize(image, output_shape=(4, 4), method="bilinear")
    expected_up = [
        [1.0, 1.25, 1.75, 2.0],
        [1.5, 1.75, 2.25, 2.5],
        [2.5, 2.75, 3.25, 3.5],
        [3.0, 3.25, 3.75, 4.0],
    ]
    assert np.allclose(up, expected_up, atol=1e-12)
    down = imresize(up, output_shape=(2, 2), method="bilinear")
    assert np.allclose(down, [[1.5625, 2.1875], [2.8125, 3.4375]], atol=1e-12)


def test_bicubic_without_antialiasing_published():
    image = np.arange(16.0).reshape(4, 4)
    out = imresize(image, 0.5, antialiasing=False)
    assert np.allclose(out, [[2.1875, 4.3125], [10.6875, 12.8125]], atol=1e-12)
    # By hand along one axis: u = 1.5 reads values 0 0 1 2 (padded) with weights
    # keys(1.5), keys(0.5), keys(0.5), keys(1.5) = -0.0625, 0.5625, 0.5625, -0.0625.
    along_one_axis = -0.0625 * 0 + 0.5625 * 0 + 0.5625 * 1 - 0.0625 * 2
    assert along_one_axis == 0.4375
    # Rows step by 4 and columns by 1, so the 2-D value is 4 * 0.4375 + 0.4375.
    assert out[0, 0] == pytest.approx(5 * along_one_axis, abs=1e-12)


# --------------------------------------------------------------------------------------
# shapes, dtypes and channels


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [
        ((255, 256), 1 / 3, (85, 86)),
        ((7, 9), 0.5, (4, 5)),
        ((144, 96), 1 / 3, (48, 32)),
        ((10, 12), 2.0, (20, 24)),
        ((10, 12), 1.25, (13, 15)),
    ],
)
def test_output_size_is_ceil(shape, scale, expected):
    assert imresize(np.zeros(shape), scale).shape == expected


def test_output_shape_uses_per_axis_scale():
    image = np.random.default_rng(0).random((12, 20))
    out = imresize(image, output_shape=(6, 10))
    assert out.shape == (6, 10)
    assert np.allclose(out, imresize(image, 0.5), atol=1e-13)
    assert imresize(image, output_shape=(6, 40)).shape == (6, 40)


def test_channels_are_resized_independently():
    rng = np.random.default_rng(1)
    image = rng.random((15, 21, 3))
    out = imresize(image, 1 / 3)
    assert out.shape == (5, 7, 3)
    for channel in range(3):
        assert np.allclose(out[..., channel], imresize(image[..., channel], 1 / 3))


def test_transpose_commutes():
    image = np.random.default_rng(2).random((18, 27))
    assert np.allclose(imresize(image.T, 1 / 3), imresize(image, 1 / 3).T, atol=1e-13)


def test_float_output_is_float64_and_unclipped():
    step = np.zeros((16, 16), dtype=np.float32)
    step[:, 8:] = 1.0
    out = imresize(step, 2.0)
    assert out.dtype == np.float64
    # Keys' kernel has negative lobes, so a step overshoots below 0 and above 1.
    assert out.min() < 0
    assert out.max() > 1


def test_uint8_rounds_and_clips():
    step = np.zeros((16, 16), dtype=np.uint8)
    step[:, 8:] = 255
    out = imresize(step, 2.0)
    assert out.dtype == np.uint8
    assert out.min() == 0
    assert out.max() == 255
    as_float = imresize(step.astype(np.float64), 2.0)
    assert np.array_equal(out, round_to_uint8(as_float))


def test_uint8_rounds_after_each_pass():
    image = np.random.default_rng(3).integers(0, 256, (30, 30), dtype=np.uint8)
    out = imresize(image, 0.5)
    # Rows first: round the row pass to uint8, then resize the columns.
    rows = round_to_uint8(imresize(image.astype(np.float64), output_shape=(15, 30)))
    expected = round_to_uint8(imresize(rows.astype(np.float64), output_shape=(15, 15)))
    assert np.array_equal(out, expected)
    single_rounding = round_to_uint8(imresize(image.astype(np.float64), 0.5))
    assert np.abs(out.astype(int) - single_rounding).max() <= 1


def test_round_to_uint8_half_up():
    values = np.array([-3.0, -0.5, 0.49, 0.5, 1.5, 2.5, 254.5, 255.4, 300.0])
    expected = [0, 0, 0, 1, 2, 3, 255, 255, 255]
    assert round_to_uint8(values).tolist() == expected


def test_identity_scale_returns_input():
    image = np.random.default_rng(4).random((9, 11, 3))
    assert np.allclose(imresize(image, 1.0), image, atol=1e-15)


# --------------------------------------------------------------------------------------
# other libraries


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 2.0, 3.0])
def test_pil_bicubic_agrees_on_interior(camera_crop, scale):
    ours = imresize(camera_crop, scale)
    height, width = ours.shape
    pil_image = Image.fromarray(camera_crop.astype(np.float32), mode="F")
    pil = np.asarray(pil_image.resize((width, height), Image.BICUBIC), dtype=np.float64)
    margin = 4
    interior = np.abs(ours - pil)[margin:-margin, margin:-margin]
    # PIL computes in float32, so agreement is to about 1e-7.
    assert interior.max() < 1e-5
    assert np.abs(ours - pil).max() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 0.25, 2.0])
def test_torch_antialiased_bicubic_agrees_on_interior(camera_crop, scale):
    ours = imresize(camera_crop, scale)
    theirs = F.interpolate(
        torch.from_numpy(camera_crop)[None, None],
        size=ours.shape,
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )[0, 0].numpy()
    margin = 4
    assert np.abs(ours - theirs)[margin:-margin, margin:-margin].max() < 1e-12
    assert np.abs(ours - theirs).max() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 0.25, 2.0])
def test_bilinear_resizers_differ(camera_crop, scale):
    ours = imresize(camera_crop, scale)
    margin = 4
    skimage_out = skimage_resize(camera_crop, ours.shape, order=1, anti_aliasing=True)
    torch_out = F.interpolate(
        torch.from_numpy(camera_crop)[None, None],
        size=ours.shape,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    # More than 10 gray levels apart somewhere inside the image.
    assert np.abs(ours - skimage_out)[margin:-margin, margin:-margin].max() > 10 / 255
    assert np.abs(ours - torch_out)[margin:-margin, margin:-margin].max() > 10 / 255


# --------------------------------------------------------------------------------------
# input errors


def test_rejects_bad_ndim():
    with pytest.raises(ValueError, match="one image, not a batch"):
        imresize(np.zeros((2, 4, 4, 3)), 0.5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        imresize(np.zeros(5), 0.5)


def test_rejects_empty_image():
    with pytest.raises(ValueError, match="must not be empty"):
        imresize(np.zeros((0, 4)), 0.5)


@pytest.mark.parametrize("scale", [0, -0.5, float("inf"), float("nan"), "2"])
def test_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="positive finite"):
        imresize(np.zeros((4, 4)), scale)


def test_rejects_scale_and_shape_together():
    with pytest.raises(ValueError, match="exactly one of scale and output_shape"):
        imresize(np.zeros((4, 4)), 0.5, output_shape=(2, 2))
    with pytest.raises(ValueError, match="exactly one of scale and output_shape"):
        imresize(np.zeros((4, 4)))


@pytest.mark.parametrize("shape", [(2,), (2, 2, 2), (0, 3), (2.5, 3)])
def test_rejects_bad_output_shape(shape):
    with pytest.raises(ValueError, match="output_shape must be"):
        imresize(np.zeros((4, 4)), output_shape=shape)


def test_rejects_unknown_method():
    with pytest.raises(ValueError, match="bicubic, bilinear"):
        imresize(np.zeros((4, 4)), 0.5, method="lanczos3")
