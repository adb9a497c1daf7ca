"""predict writes the benchmark files; evaluate --mode full agrees with the official cityscapesscripts evaluator on
them, with 1 and 2 processes; the counting (void predictions, categories, iIoU) matches it exactly."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cityseg.evaluation.evaluate import instance_path, read_instance_ids
from cityseg.evaluation.metrics import (
    benchmark_scores,
    new_confusion,
    new_instance_stats,
    update_confusion,
    update_instance_stats,
)
from cityseg.labels import EVAL_CLASSES, colorize, label_lut, to_label_ids_lut
from tests.helpers.evaluation import close
from tests.helpers.process import cityseg, launch_cmd, run

NET_SIZE = "data.image_size=[32,64]"  # the network sees half the 64x128 labels' resolution: full != resized
EVAL_IDS = {c.id for c in EVAL_CLASSES}


def overrides(synth_root, trained_run):
    return ["--config", trained_run / "config.yaml", "--checkpoint", trained_run,
            f"data.root={synth_root}", "data.num_workers=0", NET_SIZE]


@pytest.fixture(scope="module")
def predictions(synth_root, trained_run, tmp_path_factory) -> Path:
    """`cityseg predict --split val` under accelerate launch with 2 processes (each writes its own share)."""
    out = tmp_path_factory.mktemp("predict") / "out"
    result = run(launch_cmd(2, "-m", "cityseg", "predict", *overrides(synth_root, trained_run), "--split", "val",
                            "--output", out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote predictions of 7 images" in result.stdout
    return out


@pytest.fixture(scope="module")
def full_metrics(synth_root, trained_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("evaluate") / "full.json"
    result = cityseg("evaluate", *overrides(synth_root, trained_run), "--mode", "full", "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vehicle" in result.stdout and "iIoU" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_predict_writes_three_files_per_image_with_label_ids(predictions, synth_root):
    images = sorted((synth_root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert len(images) == 7
    for image in images:
        stem, city = image.name[: -len("_leftImg8bit.png")], image.parent.name
        label_ids = cv2.imread(str(predictions / "labelIds" / city / f"{stem}_pred_labelIds.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(str(predictions / "color" / city / f"{stem}_pred_color.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(predictions / "overlay" / city / f"{stem}_pred_overlay.jpg"))
        assert label_ids.dtype == np.uint8 and label_ids.shape == (64, 128)  # the label's size, not the network's
        assert color.shape == overlay.shape == (64, 128, 3)
        assert set(np.unique(label_ids).tolist()) <= EVAL_IDS
        train_ids = label_lut("trainid19")[label_ids]
        assert np.array_equal(cv2.cvtColor(color, cv2.COLOR_BGR2RGB), colorize(train_ids))
        assert np.array_equal(to_label_ids_lut("trainid19")[train_ids], label_ids)
    assert len(list(predictions.rglob("*.*"))) == 3 * 7


@pytest.mark.slow
def test_full_resolution_evaluate_matches_official_evaluator(full_metrics, predictions, synth_root,
                                                             official_evaluator, tmp_path):
    official = official_evaluator(synth_root, predictions / "labelIds", tmp_path / "export")
    assert full_metrics["mode"] == "full" and full_metrics["images"] == 7
    assert close(full_metrics["mIoU"], official["averageScoreClasses"], 1e-4)
    for name, value in full_metrics["iou"].items():
        assert close(value, official["classScores"][name], 1e-4), name
    assert close(full_metrics["category_mIoU"], official["averageScoreCategories"], 1e-4)
    for name, value in full_metrics["category_iou"].items():
        assert close(value, official["categoryScores"][name], 1e-4), name
    assert close(full_metrics["iIoU"], official["averageScoreInstClasses"], 1e-4)
    for name, value in full_metrics["iiou"].items():
        assert close(value, official["classInstScores"][name], 1e-4), name
    assert close(full_metrics["category_iIoU"], official["averageScoreInstCategories"], 1e-4)
    present = [v for v in full_metrics["iou"].values() if v is not None]
    assert len(present) >= 15 and 0 < full_metrics["mIoU"] < 1  # a real comparison, not all-NaN or all-zero


@pytest.mark.slow
def test_two_processes_give_the_same_full_resolution_metrics(full_metrics, synth_root, trained_run, tmp_path):
    out = tmp_path / "full2.json"
    result = run(launch_cmd(2, "-m", "cityseg", "evaluate", *overrides(synth_root, trained_run), "eval.mode=full",
                            "--json", out))
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["mode"] == "full"
    for key in ("mIoU", "pixel_acc", "iou", "category_mIoU", "category_iou"):
        assert two[key] == full_metrics[key], key  # one integer confusion matrix: exactly equal
    for name, value in full_metrics["iiou"].items():
        assert close(two["iiou"][name], value, 1e-12), name  # float sums in another order


def perturbed_predictions(synth_root: Path, out: Path) -> None:
    """Ground truth with a fifth of the pixels changed to random ids, void ones (0, 4, 5) among them."""
    rng = np.random.default_rng(0)
    choices = np.array([0, 4, 5, *sorted(EVAL_IDS)], np.uint8)
    for label in sorted((synth_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png")):
        ids = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
        change = rng.random(ids.shape) < 0.2
        ids[change] = rng.choice(choices, size=int(change.sum()))
        target = out / label.parent.name / label.name.replace("_gtFine_labelIds", "_pred_labelIds")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), ids)


@pytest.mark.slow
def test_counting_matches_official_with_void_predictions(synth_root, official_evaluator, tmp_path):
    perturbed_predictions(synth_root, tmp_path / "pred")
    official = official_evaluator(synth_root, tmp_path / "pred", tmp_path / "export")
    lut = torch.from_numpy(label_lut("seed20")).long()  # void ids → 0: predicted void must count as a miss
    confusion, stats = new_confusion(20, "cpu"), new_instance_stats("cpu")
    for label in sorted((synth_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png")):
        prediction_file = tmp_path / "pred" / label.parent.name / label.name.replace("_gtFine_", "_pred_")
        prediction = lut[torch.from_numpy(cv2.imread(str(prediction_file), cv2.IMREAD_UNCHANGED)).long()]
        target = lut[torch.from_numpy(cv2.imread(str(label), cv2.IMREAD_UNCHANGED)).long()]
        update_confusion(confusion, prediction, target)
        update_instance_stats(stats, prediction, read_instance_ids(instance_path(label)), "seed20")
    ours = benchmark_scores(confusion, "seed20", stats)
    assert 0 < ours["mIoU"] < 1 and 0 < ours["iIoU"] < 1
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert ours["iIoU"] == pytest.approx(official["averageScoreInstClasses"], abs=1e-12)
    assert ours["category_mIoU"] == pytest.approx(official["averageScoreCategories"], abs=1e-12)
    assert ours["category_iIoU"] == pytest.approx(official["averageScoreInstCategories"], abs=1e-12)
    for name in ours["iou"]:
        assert ours["iou"][name] == pytest.approx(official["classScores"][name], abs=1e-12, nan_ok=True), name
    for name in ours["iiou"]:
        assert ours["iiou"][name] == pytest.approx(official["classInstScores"][name], abs=1e-12), name
