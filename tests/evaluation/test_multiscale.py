"""Multi-scale + flip testing (eval.scales, --aug-test): mmsegmentation's averaging of probabilities, and the
full-resolution metrics of `cityseg evaluate` agree with the official evaluator on `cityseg predict`'s files."""
from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from cityseg.config.load import load_config
from cityseg.evaluation.inference import segment_logits
from cityseg.model.build import build_model
from tests.helpers.evaluation import close, eval_cfg
from tests.helpers.process import cityseg

SCALES = "eval.scales=[0.75,1.25]"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None).model, 19).eval()


@pytest.mark.slow  # seconds of CPU in this process
@torch.no_grad()
def test_multi_scale_averages_the_probabilities_of_each_scale_and_flip(model):
    images = torch.randn(2, 3, 64, 128)
    got = segment_logits(model, images, [64, 128], eval_cfg(scales=[0.5, 1.0, 1.5], flip=True))
    expected = 0
    for scale in (0.5, 1.0, 1.5):
        size = (round(64 * scale), round(128 * scale))
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            logits = model(scaled.flip(-1) if flipped else scaled)
            logits = logits.flip(-1) if flipped else logits
            expected = expected + F.interpolate(logits, size=(64, 128), mode="bilinear",
                                                align_corners=False).softmax(1) / 6
    assert torch.allclose(got.exp(), expected, atol=1e-5)
    assert got.shape == (2, 19, 64, 128) and torch.isfinite(got).all()


@pytest.mark.slow  # seconds of CPU in this process
@torch.no_grad()
def test_single_scale_is_the_plain_path(model):
    images = torch.randn(1, 3, 64, 128)
    plain = segment_logits(model, images, [64, 128], types.SimpleNamespace(sliding=False, flip=False))
    assert torch.equal(segment_logits(model, images, [64, 128], eval_cfg()), plain)
    assert not torch.equal(segment_logits(model, images, [64, 128], eval_cfg(scales=[0.5, 1.0])).argmax(1),
                           plain.argmax(1))


@pytest.mark.slow
def test_multi_scale_evaluate_matches_the_official_evaluator(synth_root, trained_run, official_evaluator, tmp_path):
    common = ["--config", trained_run / "config.yaml", "--checkpoint", trained_run, f"data.root={synth_root}",
              "data.num_workers=0", "data.image_size=[32,64]", SCALES, "eval.flip=true"]
    predicted = cityseg("predict", *common, "--split", "val", "--output", tmp_path / "pred")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    evaluated = cityseg("evaluate", *common, "--mode", "full", "--json", tmp_path / "ms.json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    ours = json.loads((tmp_path / "ms.json").read_text())
    assert ours["scales"] == [0.75, 1.25] and ours["flip"] is True
    official = official_evaluator(synth_root, tmp_path / "pred" / "labelIds", tmp_path / "export")
    assert close(ours["mIoU"], official["averageScoreClasses"], 1e-4)
    for name, value in ours["iou"].items():
        assert close(value, official["classScores"][name], 1e-4), name
    single = cityseg("evaluate", *common[:-2], "--mode", "full", "--json", tmp_path / "one.json")
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "one.json").read_text())["mIoU"] != ours["mIoU"]  # the scales were used


@pytest.mark.slow
def test_aug_test_flag_sets_mmsegs_scales_and_flip(synth_root, trained_run, tmp_path):
    result = cityseg("evaluate", "--config", trained_run / "config.yaml", "--checkpoint",
                     trained_run / "model.safetensors", f"data.root={synth_root}", "data.num_workers=0", "--aug-test", "--json", tmp_path / "aug.json")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "aug.json").read_text())
    assert metrics["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and metrics["flip"] is True
    assert 0 < metrics["mIoU"] <= 1
