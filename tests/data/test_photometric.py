"""Photometric distortion: the CPU transform is mmsegmentation's uint8 steps exactly, the device path's float
arithmetic agrees with them, seeded per sample on both paths."""
import types

import cv2
import numpy as np
import torch

from cityseg.data.device_augment import augment_batch
from cityseg.data.photometric import (
    PhotometricParams,
    distort,
    draw_params,
    hsv_to_rgb,
    rgb_to_hsv,
)
from cityseg.data.transforms import PhotometricDistortion, sample_seed, train_transform


def image(seed=0, size=(16, 24)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def as_tensor(img):
    return torch.from_numpy(img).permute(2, 0, 1).float()


def mmseg_reference(img: np.ndarray, p: PhotometricParams) -> np.ndarray:
    """mmseg PhotoMetricDistortion.transform, with cv2 for the HSV conversion as mmcv does (uint8 between steps)."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    out = img.copy()
    if p.brightness is not None:
        out = convert(out, beta=p.brightness)
    if p.contrast is not None and p.contrast_first:
        out = convert(out, alpha=p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        if p.saturation is not None:
            hsv[..., 1] = convert(hsv[..., 1], alpha=p.saturation)
        if p.hue is not None:
            hsv[..., 0] = (hsv[..., 0].astype(int) + int(p.hue)) % 180
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.contrast is not None and not p.contrast_first:
        out = convert(out, alpha=p.contrast)
    return out


def test_cpu_transform_is_mmsegs_uint8_steps_exactly():
    img = image(2)
    transform = PhotometricDistortion()
    for seed in range(20):
        params = draw_params(np.random.default_rng(seed))
        out = transform.apply(img, photometric=params)
        assert out.dtype == np.uint8 and np.array_equal(out, mmseg_reference(img, params)), params


def test_brightness_and_contrast_are_mmsegs_arithmetic():
    img = image()
    for params in (PhotometricParams(20.5, 1.3, True, None, None), PhotometricParams(-31.0, 0.6, False, None, None)):
        ours = distort(as_tensor(img), params).permute(1, 2, 0).numpy()
        expected = mmseg_reference(img, params).astype(np.float32)
        assert np.abs(ours - expected).max() <= 2.5  # mmseg truncates to uint8 after each step (x contrast)


def test_saturation_and_hue_agree_with_opencv_hsv():
    img = image(1)
    params = PhotometricParams(None, None, True, 1.4, 12.0)
    ours = distort(as_tensor(img), params).permute(1, 2, 0).numpy()
    expected = mmseg_reference(img, params).astype(np.float32)
    assert np.median(np.abs(ours - expected)) <= 2.0 and np.abs(ours - expected).mean() <= 3.0  # cv2: 8-bit HSV
    x = torch.rand(3, 9, 9)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_draws_cover_every_distortion_and_skip_half_the_time():
    draws = [draw_params(np.random.default_rng(seed)) for seed in range(400)]
    for field in ("brightness", "contrast", "saturation", "hue"):
        applied = sum(getattr(d, field) is not None for d in draws)
        assert 140 < applied < 260, field
    assert all(-32 <= d.brightness <= 32 for d in draws if d.brightness is not None)
    assert all(-18 <= d.hue <= 18 for d in draws if d.hue is not None)


def data_cfg(**values):
    base = {"image_size": [16, 24], "scale_range": [1.0, 1.0], "crop_size": None, "hflip": False,
            "photometric": True}
    return types.SimpleNamespace(**{**base, **values})


def test_train_transform_is_seeded_per_sample():
    transform = train_transform(data_cfg())
    assert any(isinstance(step, PhotometricDistortion) for step in transform.transforms)
    assert not any(isinstance(step, PhotometricDistortion)
                   for step in train_transform(data_cfg(photometric=False)).transforms)
    img, mask = image(), np.zeros((16, 24), np.uint8)
    outputs = []
    for seed in (5, 5, 6, 7, 8):
        transform.set_random_seed(seed)
        outputs.append(transform(image=img, mask=mask)["image"])
    assert torch.equal(outputs[0], outputs[1])
    assert sum(not torch.equal(outputs[0], other) for other in outputs[2:]) >= 2


def test_device_path_distorts_per_sample_and_replays():
    images = torch.from_numpy(np.stack([image(s) for s in range(4)])).permute(0, 3, 1, 2).contiguous()
    masks = torch.zeros(4, 16, 24, dtype=torch.uint8)
    plain, _ = augment_batch(images, masks, [0, 1, 2, 3], data_cfg(photometric=False), seed=0, epoch=0)
    jittered, labels = augment_batch(images, masks, [0, 1, 2, 3], data_cfg(), seed=0, epoch=0)
    again, _ = augment_batch(images, masks, [0, 1, 2, 3], data_cfg(), seed=0, epoch=0)
    other_epoch, _ = augment_batch(images, masks, [0, 1, 2, 3], data_cfg(), seed=0, epoch=1)
    assert torch.equal(jittered, again) and not torch.equal(jittered, other_epoch)
    changed = [not torch.allclose(jittered[i], plain[i]) for i in range(4)]
    assert 1 <= sum(changed) and torch.equal(labels, torch.zeros_like(labels))
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    for i in range(4):  # exactly distort() of that sample's draw, before the normalization
        params = draw_params(np.random.default_rng([sample_seed(0, 0, i), 1]))
        expected = (distort(plain[i] * std + mean, params) - mean) / std
        assert torch.allclose(jittered[i], expected, atol=1e-3), i


def test_loader_collate_sends_the_draws_the_device_applies():
    from torch.utils.data import default_collate

    from cityseg.data.device_augment import AugmentParamsCollate, augment_with_theta

    images = torch.from_numpy(np.stack([image(s) for s in range(3)])).permute(0, 3, 1, 2).contiguous()
    masks = torch.zeros(3, 16, 24, dtype=torch.uint8)
    samples = [(images[i], masks[i], 10 + i) for i in range(3)]
    collate = AugmentParamsCollate(default_collate, data_cfg(), seed=3, shared_epoch=torch.tensor(2))
    batch_images, batch_masks, augmentation = collate(samples)
    assert isinstance(augmentation, tuple) and augmentation[1].shape == (3, 5)
    direct, _ = augment_batch(images, masks, [10, 11, 12], data_cfg(), seed=3, epoch=2)
    assert torch.equal(augment_with_theta(batch_images, batch_masks, augmentation, data_cfg())[0], direct)
    off = AugmentParamsCollate(default_collate, data_cfg(photometric=False), seed=3, shared_epoch=torch.tensor(2))
    assert torch.is_tensor(off(samples)[2])  # unchanged batches when data.photometric is off


def test_stream_samples_bring_their_own_epoch_to_the_draws():
    """A raw cached sample from the training stream carries its epoch: the draws are that epoch's, not the shared
    set_epoch one (the workers prefetch the next epoch while this one still trains)."""
    from cityseg.data.cityscapes import collate
    from cityseg.data.device_augment import AugmentParamsCollate, augment_with_theta

    images = torch.from_numpy(np.stack([image(s) for s in range(3)])).permute(0, 3, 1, 2).contiguous()
    masks = torch.zeros(3, 16, 24, dtype=torch.uint8)
    samples = [(images[i], masks[i], 10 + i, 5) for i in range(3)]  # (image, mask, index, epoch 5)
    batch_images, batch_masks, augmentation = AugmentParamsCollate(collate, data_cfg(), seed=3,
                                                                   shared_epoch=torch.tensor(2))(samples)
    direct, _ = augment_batch(images, masks, [10, 11, 12], data_cfg(), seed=3, epoch=5)
    assert torch.equal(augment_with_theta(batch_images, batch_masks, augmentation, data_cfg())[0], direct)
