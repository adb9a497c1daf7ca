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


def test_full_resolution_labels_come_from_bilinear_logits_not_nearest():
    """Two pixels of 3 classes upsampled 2 -> 4 wide. Half-pixel centres put the output pixels at input x = 0 (clamped),
    0.25, 0.75 and 1 (clamped): 3/4 A + 1/4 B = [1.5, 0.5, 1.6] and 1/4 A + 3/4 B = [0.5, 1.5, 1.6] are class 2, which
    neither pixel is; nearest would copy A, A, B, B (classes 0, 0, 1, 1)."""
    pixel_a, pixel_b = [2.0, 0.0, 1.6], [0.0, 2.0, 1.6]
    logits = torch.tensor([pixel_a, pixel_b]).T.reshape(1, 3, 1, 2)
    assert upsampled_argmax(logits, (1, 4)).tolist() == [[[0, 2, 2, 1]]]


def bilinear_reference(logits: np.ndarray, out_size) -> np.ndarray:
    """Bilinear resize with half-pixel centres (cv2.INTER_LINEAR's, the training images'), written out per axis."""
    def weights(out_len: int, in_len: int) -> np.ndarray:
        matrix = np.zeros((out_len, in_len))
        for dst in range(out_len):
            src = max((dst + 0.5) * in_len / out_len - 0.5, 0.0)
            low = int(src)
            high = min(low + 1, in_len - 1)
            matrix[dst, low] += 1 - (src - low)
            matrix[dst, high] += src - low
        return matrix
    rows, cols = weights(out_size[0], logits.shape[-2]), weights(out_size[1], logits.shape[-1])
    return np.einsum("yh,nchw,xw->ncyx", rows, logits, cols)


def test_upsampled_argmax_equals_a_written_out_bilinear_resize():
    logits = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    expected = bilinear_reference(logits.double().numpy(), (7, 11)).argmax(1)
    np.testing.assert_array_equal(upsampled_argmax(logits, (7, 11)).numpy(), expected)
