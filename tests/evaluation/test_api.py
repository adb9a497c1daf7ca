"""cityseg.api: the Python inference API gives what `cityseg predict` / `evaluate` give, from a run or checkpoint."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from cityseg.api import Segmenter
from cityseg.checkpoint import CheckpointError
from cityseg.data.cityscapes import read_image
from cityseg.evaluation.metrics import new_confusion, summarize, update_confusion
from tests.helpers.process import cityseg

OPTIONS = ["eval.flip=true", "eval.sliding=true", "eval.crop_size=[48,96]", "eval.stride=[32,64]"]


@pytest.fixture(scope="module")
def val_images(synth_root):
    return sorted((synth_root / "leftImg8bit" / "val").rglob("*.png"))


@pytest.mark.slow
def test_full_resolution_equals_cityseg_predict_with_the_same_options(trained_run, synth_root, val_images, tmp_path):
    """`cityseg predict` with no --config (the run's config.yaml) and the API, sliding + flip: the same label ids."""
    out = tmp_path / "preds"
    result = cityseg("predict", "--checkpoint", trained_run / "model.safetensors", "--input",
                     synth_root / "leftImg8bit" / "val", "--output", out, *OPTIONS)
    assert result.returncode == 0, result.stderr[-3000:]
    segmenter = Segmenter.load(trained_run, overrides=OPTIONS, device="cpu")
    assert segmenter.cfg.eval.flip and segmenter.cfg.eval.sliding
    varied = set()
    for path in val_images:
        image = read_image(path)
        prediction = segmenter.predict(image)
        assert prediction.shape == image.shape[:2] and prediction.dtype == np.uint8
        stem = path.name.replace("_leftImg8bit.png", "")
        written = cv2.imread(str(out / "labelIds" / path.parent.name / f"{stem}_pred_labelIds.png"),
                             cv2.IMREAD_UNCHANGED)
        assert np.array_equal(segmenter.to_label_ids(prediction), written), path.name
        varied |= set(np.unique(prediction).tolist())
    assert len(varied) > 1  # a trained model, not a constant map


@pytest.mark.slow
def test_metrics_from_api_predictions_equal_cityseg_evaluate_full(trained_run, synth_root, val_images, tmp_path):
    metrics_file = tmp_path / "metrics.json"
    result = cityseg("evaluate", "--checkpoint", trained_run / "model.safetensors", "--mode", "full",
                     "--json", metrics_file, "eval.flip=true")
    assert result.returncode == 0, result.stderr[-3000:]
    segmenter = Segmenter.load(trained_run / "model.safetensors", overrides=["eval.flip=true"], device="cpu")
    from cityseg.labels import label_lut

    lut = label_lut(segmenter.cfg.data.label_scheme)
    confusion = new_confusion(len(segmenter.class_names), torch.device("cpu"))
    for path in val_images:
        label_path = synth_root / "gtFine" / "val" / path.parent.name / path.name.replace(
            "_leftImg8bit.png", "_gtFine_labelIds.png")
        target = torch.from_numpy(lut[cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)].astype(np.int64))
        prediction = torch.from_numpy(segmenter.predict(read_image(path)).astype(np.int64))
        update_confusion(confusion, prediction[None], target[None])
    expected = json.loads(metrics_file.read_text())["mIoU"]
    assert summarize(confusion, segmenter.class_names)["mIoU"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_training_size_and_batch_tensors(trained_run, val_images):
    segmenter = Segmenter.load(trained_run, device="cpu")
    images = [read_image(path) for path in val_images[:3]]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8 RGB
    at_training_size = segmenter.predict_batch(batch, full_resolution=False)
    assert tuple(at_training_size.shape) == (3, *segmenter.cfg.data.image_size)
    assert np.array_equal(at_training_size[1].numpy(), segmenter.predict(images[1], full_resolution=False))
    full = segmenter.predict_batch(batch)
    assert tuple(full.shape[-2:]) == images[0].shape[:2]
    recorded = yaml.safe_load((trained_run / "config.yaml").read_text())["data"]  # what the run trained with
    assert recorded["mean"] == recorded["std"] == [0.5, 0.5, 0.5]  # timm's tf_mobilenetv3 weights, not ImageNet's
    mean, std = (torch.tensor(recorded[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    normalized = (batch.float() / 255 - mean) / std  # what the data pipeline feeds the network
    assert torch.equal(segmenter.predict_batch(normalized), full)
    logits = segmenter.logits(batch)
    assert tuple(logits.shape) == (3, len(segmenter.class_names), *segmenter.cfg.data.image_size)
    assert segmenter.colorize(full[0].numpy()).shape == (*images[0].shape[:2], 3)


@pytest.mark.slow
def test_predict_batch_takes_numpy_and_torch_channels_last_or_first(trained_run, val_images):
    """What a user has at hand: read_image's (H, W, 3) arrays stacked, as numpy or torch, batched or not."""
    segmenter = Segmenter.load(trained_run, device="cpu")
    images = np.stack([read_image(path) for path in val_images[:2]])  # (B, H, W, 3) uint8
    expected = segmenter.predict_batch(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(segmenter.predict_batch(images), expected)  # numpy NHWC
    assert torch.equal(segmenter.predict_batch(torch.from_numpy(images)), expected)  # torch NHWC
    assert torch.equal(segmenter.predict_batch(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), expected)
    assert torch.equal(segmenter.predict_batch(images[1]), expected[1:])  # one (H, W, 3) image
    mean = np.array(segmenter.cfg.data.mean, dtype=np.float32).reshape(3, 1, 1)  # the run's recorded normalization
    std = np.array(segmenter.cfg.data.std, dtype=np.float32).reshape(3, 1, 1)
    normalized = (images[0].transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std  # one (3, H, W) float
    assert torch.equal(segmenter.predict_batch(normalized), expected[:1])
    assert torch.equal(segmenter.logits(images), segmenter.logits(torch.from_numpy(images).permute(0, 3, 1, 2)))


@pytest.mark.slow
def test_a_checkpoint_directory_loads_with_its_own_config(trained_run, val_images):
    image = read_image(val_images[0])
    best = Segmenter.load(trained_run / "checkpoints" / "best", device="cpu")
    step = json.loads((trained_run / "checkpoints" / "best" / "best.json").read_text())["step"]
    newest = sorted((trained_run / "checkpoints").glob("step_*"))[-1]
    assert best.cfg == Segmenter.load(newest, device="cpu").cfg
    if int(newest.name[5:]) == step:
        assert np.array_equal(best.predict(image), Segmenter.load(newest, device="cpu").predict(image))


@pytest.mark.slow
def test_bad_inputs_say_what_was_expected(trained_run, tmp_path):
    segmenter = Segmenter.load(trained_run, device="cpu")
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB array, got float32"):
        segmenter.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected images as \(B, 3, H, W\) or \(3, H, W\), or uint8 \(B, H, W, 3\)"):
        segmenter.predict_batch(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 8, 3\) float32"):  # channels last: raw uint8 only
        segmenter.predict_batch(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected a numpy array or torch tensor of images, got list"):
        segmenter.predict_batch([np.zeros((8, 8, 3), dtype=np.uint8)])
    with pytest.raises(CheckpointError, match="no run directory"):
        Segmenter.load(tmp_path / "nothing")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no model.safetensors yet \(training not finished\?\); load "):
        Segmenter.load(unfinished)
