"""A short real training run on synthetic data: loss falls, mIoU beats chance, evaluate reproduces it."""
import json

import pytest
from safetensors.torch import load_file

from tests.helpers.process import cityseg
from tests.helpers.runs import read_jsonl


@pytest.mark.slow
def test_training_learns_and_writes_the_run_directory(trained_run):
    evaluations = read_jsonl(trained_run / "metrics.jsonl")
    assert [e["epoch"] for e in evaluations] == list(range(1, 9))
    last = evaluations[-1]
    assert set(last) >= {"epoch", "step", "mIoU", "pixel_acc", "iou"} and len(last["iou"]) == 19
    assert last["mIoU"] > 0.2 and last["pixel_acc"] > 0.6, last  # chance: about 1/19 for both
    losses = [r["loss"] for r in read_jsonl(trained_run / "train_log.jsonl")]
    assert len(losses) == last["step"] and sum(losses[-3:]) < sum(losses[:3])
    weights = load_file(str(trained_run / "model.safetensors"))
    assert any(key.startswith("segmentation_head") for key in weights)
    assert (trained_run / "config.yaml").is_file()


@pytest.mark.slow
def test_evaluate_reproduces_the_last_validation_mIoU(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    result = cityseg("evaluate", "--config", trained_run / "config.yaml", "--checkpoint",
                     trained_run / "model.safetensors", "--json", out, "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    reported = json.loads(out.read_text())
    last = read_jsonl(trained_run / "metrics.jsonl")[-1]
    assert reported["mIoU"] == pytest.approx(last["mIoU"], abs=1e-6)
    assert reported["pixel_acc"] == pytest.approx(last["pixel_acc"], abs=1e-6)
    assert "mIoU" in result.stdout
