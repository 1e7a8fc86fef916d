"""Datasets for the experiments: image classification with fixed splits, and image
restoration (denoising and super-resolution) folders, patches and resizing."""

from normlab.data.classification import (
    DATASETS,
    ClassificationData,
    DataError,
    Split,
    load_classification,
)
from normlab.data.imresize import imresize
from normlab.data.restoration import (
    RESTORATION_DATASETS,
    DenoisePatches,
    ImageSet,
    SRPatches,
    add_noise,
    image_to_tensor,
    load_embedded,
    load_image_folder,
    load_restoration,
    modcrop,
    sr_pair,
    tensor_to_image,
)

__all__ = [
    "DATASETS",
    "ClassificationData",
    "DataError",
    "Split",
    "load_classification",
    "RESTORATION_DATASETS",
    "DenoisePatches",
    "ImageSet",
    "SRPatches",
    "add_noise",
    "image_to_tensor",
    "imresize",
    "load_embedded",
    "load_image_folder",
    "load_restoration",
    "modcrop",
    "sr_pair",
    "tensor_to_image",
]
