"""Albumentations pipelines: train (resize, scale + crop, flip, photometric, normalize) and deterministic eval."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from cityseg.data.photometric import distort_uint8, draw_params
from cityseg.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(data_cfg) -> A.Compose:
    height, width = data_cfg.image_size
    steps = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR)]  # masks always resize nearest
    low, high = data_cfg.scale_range
    if (low, high) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0))
    if data_cfg.crop_size is not None:
        crop_h, crop_w = data_cfg.crop_size
        steps += [
            A.PadIfNeeded(crop_h, crop_w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(crop_h, crop_w),
        ]
    if data_cfg.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if getattr(data_cfg, "photometric", False):
        steps.append(PhotometricDistortion())
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(steps)


def eval_transform(data_cfg, size: list[int] | None = None) -> A.Compose:
    """Resize + normalize only: no randomness, so validation is the same every time (the seed flipped val)."""
    steps = []
    if size is not None:
        steps.append(A.Resize(size[0], size[1], interpolation=cv2.INTER_LINEAR))
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: replays exactly after a resume, whatever the worker layout."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**32)


class PhotometricDistortion(A.ImageOnlyTransform):
    """mmseg's PhotoMetricDistortion on a uint8 RGB image; drawn from the pipeline's generator, which the dataset
    seeds per sample, so a sample's distortion replays after a resume."""

    def __init__(self):
        super().__init__(p=1.0)

    def get_params(self) -> dict:
        return {"photometric": draw_params(self.random_generator)}

    def apply(self, img: np.ndarray, photometric=None, **params) -> np.ndarray:
        return distort_uint8(np.ascontiguousarray(img), photometric)

    def get_transform_init_args_names(self) -> tuple:
        return ()
