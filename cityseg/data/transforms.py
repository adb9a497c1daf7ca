"""Albumentations pipelines: train (resize, scale, crop, flip, photometric, normalize, pad) and deterministic eval."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from cityseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, ConfigError
from cityseg.data.photometric import distort_uint8, draw_params
from cityseg.labels import IGNORE_INDEX

CROP_TRIES = 10  # mmseg RandomCrop: redraws while one class dominates, at most this many times


def normalization(data_cfg) -> tuple[tuple, tuple]:
    """(mean, std) in [0, 1] units: data.mean / data.std as resolved for the run, ImageNet's where unset."""
    mean, std = getattr(data_cfg, "mean", None), getattr(data_cfg, "std", None)
    return tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)


def train_transform(data_cfg) -> A.Compose:
    """mmsegmentation's order: resize, random scale, crop (cat_max_ratio), flip, photometric, normalize, then pad
    to the crop size at the bottom / right with 0 (the mean colour after normalization) and ignore labels."""
    height, width = data_cfg.image_size
    steps = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR)]  # masks always resize nearest
    low, high = data_cfg.scale_range
    if (low, high) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0))
    crop = train_crop(data_cfg)
    if crop is not None:
        steps.append(CatMaxRatioCrop(*crop, cat_max_ratio=getattr(data_cfg, "cat_max_ratio", 1.0)))
    if data_cfg.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if getattr(data_cfg, "photometric", False):
        steps.append(PhotometricDistortion())
    mean, std = normalization(data_cfg)
    steps.append(A.Normalize(mean=mean, std=std))
    if crop is not None:
        steps.append(A.PadIfNeeded(*crop, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                                   fill=0, fill_mask=IGNORE_INDEX))
    return A.Compose([*steps, ToTensorV2()])


def train_crop(data_cfg) -> list[int] | None:
    """The [H, W] window samples are cropped (and padded) to: data.crop_size; where it is null, data.image_size
    when a random scale would otherwise give every sample a size of its own (no batch could be stacked), as
    data.cache.device_augment does; None where every sample is data.image_size already."""
    if data_cfg.crop_size is not None:
        return list(data_cfg.crop_size)
    return None if tuple(data_cfg.scale_range) == (1.0, 1.0) else list(data_cfg.image_size)


def train_shape(data_cfg) -> list[int]:
    """[H, W] of every training sample the network sees (both augmentation paths)."""
    return list(data_cfg.crop_size or data_cfg.image_size)


def padding_note(data_cfg) -> str | None:
    """One line where data.crop_size is larger than data.image_size: every crop is mostly padding, computed on."""
    crop, (height, width) = data_cfg.crop_size, data_cfg.image_size
    if crop is None or (crop[0] <= height and crop[1] <= width):
        return None
    factor = crop[0] * crop[1] / (min(crop[0], height) * min(crop[1], width))
    return (f"note: data.crop_size {crop[0]}x{crop[1]} is larger than data.image_size {height}x{width}: every "
            f"sample is padded to {crop[0]}x{crop[1]}, {factor:.1f}x its pixels at scale 1 (data.scale_range "
            f"{list(data_cfg.scale_range)}), and the network computes on the padding; a crop of at most "
            f"data.image_size avoids it")


def check_divisible(data_cfg, multiple: int, model_name: str) -> None:
    """Training samples' height and width must be multiples of what the model downsamples by (smp refuses others
    at the first forward)."""
    shape = train_shape(data_cfg)
    if shape[0] % multiple == 0 and shape[1] % multiple == 0:
        return
    key = "data.crop_size" if data_cfg.crop_size else "data.image_size"
    fit = [max(multiple, round(side / multiple) * multiple) for side in shape]
    raise ConfigError(f"{key}: training samples of {shape[0]}x{shape[1]} are not divisible by {multiple}, which "
                      f"{model_name} needs (its encoder downsamples {multiple}x); e.g. {key}=[{fit[0]},{fit[1]}]",
                      key)


def eval_transform(data_cfg, size: list[int] | None = None) -> A.Compose:
    """Resize + normalize only: no randomness, so validation is the same every time (the seed flipped val)."""
    steps = []
    if size is not None:
        steps.append(A.Resize(size[0], size[1], interpolation=cv2.INTER_LINEAR))
    mean, std = normalization(data_cfg)
    steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: replays exactly after a resume, whatever the worker layout."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**32)


class CatMaxRatioCrop(A.DualTransform):
    """mmseg RandomCrop: a window of min(crop, image) per side (the pad comes after normalization); with
    cat_max_ratio < 1 a window where one class holds that share or more of the labelled pixels (or only one class
    is present) is redrawn, up to CROP_TRIES times, from the pipeline's seeded generator."""

    def __init__(self, height: int, width: int, cat_max_ratio: float = 1.0):
        super().__init__(p=1.0)
        self.height, self.width, self.cat_max_ratio = height, width, cat_max_ratio

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        mask = data["mask"]
        crop_h, crop_w = min(self.height, mask.shape[0]), min(self.width, mask.shape[1])

        def draw():
            return self.py_random.randint(0, mask.shape[0] - crop_h), self.py_random.randint(0, mask.shape[1] - crop_w)

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(CROP_TRIES):
                labels, counts = np.unique(mask[top:top + crop_h, left:left + crop_w], return_counts=True)
                counts = counts[labels != IGNORE_INDEX]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return {"window": (top, left, crop_h, crop_w)}

    def apply(self, img: np.ndarray, window=None, **params) -> np.ndarray:
        top, left, crop_h, crop_w = window
        return img[top:top + crop_h, left:left + crop_w]

    def apply_to_mask(self, mask: np.ndarray, window=None, **params) -> np.ndarray:
        return self.apply(mask, window)

    def get_transform_init_args_names(self) -> tuple:
        return ("height", "width", "cat_max_ratio")


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
