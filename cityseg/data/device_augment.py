"""Training augmentation of a whole uint8 batch on its device: scale + crop + flip as one affine resampling, then normalize."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_seed
from cityseg.labels import IGNORE_INDEX


def sample_params(data_cfg, seed: int, epoch: int, index: int) -> tuple[float, float, float, bool]:
    """(scale, crop top, crop left, flip) of one sample, a pure function of (seed, epoch, index) like the CPU
    path's; top / left are in the scaled image's pixels, negative when the crop is larger (centered padding)."""
    rng = np.random.default_rng(sample_seed(seed, epoch, index))
    low, high = data_cfg.scale_range
    scale = float(rng.uniform(low, high)) if (low, high) != (1.0, 1.0) else 1.0
    height, width = data_cfg.image_size
    scaled_h, scaled_w = round(height * scale), round(width * scale)
    crop_h, crop_w = data_cfg.crop_size or (height, width)
    top = rng.integers(0, scaled_h - crop_h + 1) if scaled_h >= crop_h else -((crop_h - scaled_h) // 2)
    left = rng.integers(0, scaled_w - crop_w + 1) if scaled_w >= crop_w else -((crop_w - scaled_w) // 2)
    flip = bool(data_cfg.hflip and rng.random() < 0.5)
    return scale, float(top), float(left), flip


def augment_batch(images: torch.Tensor, masks: torch.Tensor, indices, data_cfg, seed: int, epoch: int):
    """uint8 images [B, 3, h, w] and masks [B, h, w] from the cache → normalized float images and long masks at
    data.crop_size (or data.image_size): resize, random scale, crop (padding 0 / 255), flip, normalize.

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
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, [len(theta), 1, crop_h, crop_w], align_corners=False)
    pixels = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # masks + 1 so that the zeros grid_sample pads with become -1, then IGNORE_INDEX
    labels = F.grid_sample(masks[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].long() - 1
    labels[labels < 0] = IGNORE_INDEX
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (pixels - mean) / std, labels
