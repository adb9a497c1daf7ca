"""Training augmentation of a whole uint8 batch on its device: scale + crop + flip as one affine resampling, then normalize."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cityseg.data.photometric import distort_batch, draw_params, params_table
from cityseg.data.transforms import normalization, sample_seed
from cityseg.labels import IGNORE_INDEX


def sample_params(data_cfg, seed: int, epoch: int, index: int) -> tuple[float, float, float, bool]:
    """(scale, crop top, crop left, flip) of one sample, a pure function of (seed, epoch, index) like the CPU
    path's; top / left are in the scaled image's pixels, 0 where the crop is larger (padded at the bottom / right,
    as mmsegmentation pads)."""
    rng = np.random.default_rng(sample_seed(seed, epoch, index))
    low, high = data_cfg.scale_range
    scale = float(rng.uniform(low, high)) if (low, high) != (1.0, 1.0) else 1.0
    height, width = data_cfg.image_size
    scaled_h, scaled_w = round(height * scale), round(width * scale)
    crop_h, crop_w = data_cfg.crop_size or (height, width)
    top = rng.integers(0, scaled_h - crop_h + 1) if scaled_h >= crop_h else 0
    left = rng.integers(0, scaled_w - crop_w + 1) if scaled_w >= crop_w else 0
    flip = bool(data_cfg.hflip and rng.random() < 0.5)
    if flip and scaled_w < crop_w:  # the window mirrored: the image still starts at the left, padding at the right
        left = scaled_w - crop_w
    return scale, float(top), float(left), flip


def sample_theta(data_cfg, seed: int, epoch: int, indices) -> torch.Tensor:
    """The affine sampling matrices [B, 2, 3] of a batch's samples: drawn on the host (in a loader worker, see
    AugmentParamsCollate), so the device never hands indices back to the host.

    Output pixel centre t (in crop pixels) samples the cache at (offset + t) / scaled_size in normalized
    coordinates, whatever the cache's own size, so the resize to image_size is folded into the same resampling.
    """
    height, width = data_cfg.image_size
    crop_h, crop_w = data_cfg.crop_size or (height, width)
    theta = torch.zeros(len(indices), 2, 3, dtype=torch.float32)
    for row, index in enumerate(indices.tolist() if torch.is_tensor(indices) else indices):
        scale, top, left, flip = sample_params(data_cfg, seed, epoch, index)
        scaled_h, scaled_w = round(height * scale), round(width * scale)
        sign = -1.0 if flip else 1.0
        theta[row, 0, 0], theta[row, 0, 2] = sign * crop_w / scaled_w, (2 * left + crop_w) / scaled_w - 1
        theta[row, 1, 1], theta[row, 1, 2] = crop_h / scaled_h, (2 * top + crop_h) / scaled_h - 1
    return theta


def sample_photometric(data_cfg, seed: int, epoch: int, indices) -> torch.Tensor | None:
    """[B, 5] photometric draws (data.photometric) of a batch's samples, each from its own seeded stream; None when
    off. The CPU path draws from albumentations' stream instead: the same distribution, not the same numbers."""
    if not getattr(data_cfg, "photometric", False):
        return None
    return params_table([draw_params(np.random.default_rng([sample_seed(seed, epoch, index), 1]))
                         for index in indices])


class AugmentParamsCollate:
    """collate_fn of a device_augment loader: (uint8 images, masks, theta) with theta drawn in the worker for the
    epoch each sample carries (or, for a plain index, the epoch in the dataset's shared memory)."""

    def __init__(self, collate, data_cfg, seed: int, shared_epoch: torch.Tensor):
        self.collate, self.data_cfg, self.seed, self.shared_epoch = collate, data_cfg, seed, shared_epoch

    def __call__(self, batch):
        # raw cached samples carry their epoch (a batch never spans two); others are of the set_epoch epoch
        epoch = int(batch[0][3]) if len(batch[0]) > 3 else int(self.shared_epoch)
        images, masks, indices = self.collate(batch)
        indices = indices.tolist()
        theta = sample_theta(self.data_cfg, self.seed, epoch, indices)
        photometric = sample_photometric(self.data_cfg, self.seed, epoch, indices)
        return images, masks, theta if photometric is None else (theta, photometric)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, indices, data_cfg, seed: int, epoch: int):
    """uint8 images [B, 3, h, w] and masks [B, h, w] from the cache → normalized float images and long masks at
    data.crop_size (or data.image_size): resize, random scale, crop, flip, normalize, pad (0 after normalization /
    255 at the bottom / right)."""
    indices = indices.tolist() if torch.is_tensor(indices) else list(indices)
    theta = sample_theta(data_cfg, seed, epoch, indices).to(images.device)
    photometric = sample_photometric(data_cfg, seed, epoch, indices)
    return augment_with_theta(images, masks, theta if photometric is None else (theta, photometric.to(images.device)),
                              data_cfg)


_NORMALIZE = {}  # (device, mean, std) -> (mean, std) * 255 tensors, made once: a host->device copy per batch syncs


def augment_with_theta(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, data_cfg):
    """augment_batch with the sampling matrices given (on the images' device); no host read or copy. With
    data.photometric, `theta` is the pair (theta, photometric table) AugmentParamsCollate sends."""
    photometric = None
    if isinstance(theta, (tuple, list)):
        theta, photometric = theta
    height, width = data_cfg.image_size
    crop_h, crop_w = data_cfg.crop_size or (height, width)
    grid = F.affine_grid(theta.float(), [len(theta), 1, crop_h, crop_w], align_corners=False)
    pixels = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # masks + 1 so that the zeros grid_sample pads with become -1, then IGNORE_INDEX
    labels = F.grid_sample(masks[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].long() - 1
    labels = torch.where(labels < 0, IGNORE_INDEX, labels)  # not labels[labels < 0] = ...: a boolean index syncs
    key = (images.device, *normalization(data_cfg))
    if key not in _NORMALIZE:
        _NORMALIZE[key] = tuple(torch.tensor(values, device=images.device).view(1, 3, 1, 1) * 255 for values in key[1:])
    mean, std = _NORMALIZE[key]
    if photometric is not None:
        pixels = distort_batch(pixels, photometric)
    inside = (grid.abs() <= 1).all(-1)[:, None]  # sampled from the image, not the padding beyond it
    return torch.where(inside, (pixels - mean) / std, 0.0), labels
