"""Sliding-window inference: every pixel covered, overlaps averaged, and identical to whole-image inference when the
window is the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cityseg.checkpoint import load_weights
from cityseg.config.schema import ModelConfig
from cityseg.evaluation.inference import (
    segment_logits,
    sliding_logits,
    upsampled_argmax,
    window_starts,
)
from cityseg.model.build import build_model
from tests.helpers.evaluation import eval_cfg


@pytest.mark.parametrize("length,crop,stride", [(100, 32, 20), (64, 64, 10), (97, 40, 40), (50, 80, 30), (7, 3, 5)])
def test_windows_cover_every_position(length, crop, stride):
    starts = window_starts(length, crop, stride)
    covered = np.zeros(length, int)
    for start in starts:
        assert 0 <= start and start + min(crop, length) <= length
        covered[start:start + min(crop, length)] += 1
    assert covered.min() >= 1
    assert starts == sorted(set(starts))


class Echo(torch.nn.Module):
    """Returns its input as the 'logits' and counts the windows it sees: the average of copies is the input."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape[-2:]))
        return images * 1.0


def test_sliding_window_covers_every_pixel_and_averages_overlaps():
    images = torch.randn(2, 3, 70, 150)
    echo = Echo()
    out = sliding_logits(echo, images, crop=[32, 64], stride=[20, 40])
    assert out.shape == images.shape
    assert torch.allclose(out, images, atol=1e-6)  # NaN (division by a zero count) or a misplaced window would fail
    assert len(echo.shapes) == len(window_starts(70, 32, 20)) * len(window_starts(150, 64, 40)) > 4
    assert set(echo.shapes) == {(32, 64)}  # already multiples of 32: no padding


def test_sliding_window_pads_odd_windows_to_32():
    images = torch.randn(1, 3, 50, 90)
    echo = Echo()
    out = sliding_logits(echo, images, crop=[40, 70], stride=[25, 35])
    assert torch.allclose(out, images, atol=1e-6)
    assert set(echo.shapes) == {(64, 96)}


@pytest.fixture(scope="module")
def trained_model(trained_run):
    model = build_model(ModelConfig(arch="Unet", encoder="tu-tf_mobilenetv3_small_minimal_100",
                                    encoder_weights=None), 19)
    load_weights(model, trained_run)
    return model.eval()


@pytest.mark.slow
@torch.inference_mode()
def test_sliding_with_the_image_as_window_equals_whole_image(trained_model):
    images = torch.randn(2, 3, 64, 128)
    whole = segment_logits(trained_model, images, [64, 128], eval_cfg())
    sliding = segment_logits(trained_model, images, [64, 128], eval_cfg(sliding=True, crop_size=[64, 128]))
    assert torch.equal(whole, sliding)
    larger_crop = segment_logits(trained_model, images, [64, 128], eval_cfg(sliding=True, crop_size=[512, 1024]))
    assert torch.equal(whole, larger_crop)
    windows = segment_logits(trained_model, images, [64, 128], eval_cfg(sliding=True, crop_size=[32, 64],
                                                                        stride=[16, 32]))
    assert windows.shape == whole.shape and torch.isfinite(windows).all() and not torch.equal(windows, whole)


@pytest.mark.slow
@torch.inference_mode()
def test_flip_averages_the_mirrored_prediction(trained_model):
    images = torch.randn(1, 3, 64, 128)
    plain = segment_logits(trained_model, images, [64, 128], eval_cfg())
    mirrored = segment_logits(trained_model, images.flip(-1), [64, 128], eval_cfg()).flip(-1)
    flipped = segment_logits(trained_model, images, [64, 128], eval_cfg(flip=True))
    assert torch.allclose(flipped, (plain + mirrored) / 2, atol=1e-6)


@pytest.mark.slow
@torch.inference_mode()
def test_logits_at_network_size_upsampled_to_label_size(trained_model):
    images = torch.randn(2, 3, 128, 256)
    logits = segment_logits(trained_model, images, [64, 128], eval_cfg())
    assert logits.shape == (2, 19, 64, 128)
    labels = upsampled_argmax(logits, (128, 256))
    assert labels.shape == (2, 128, 256) and labels.max() < 19
