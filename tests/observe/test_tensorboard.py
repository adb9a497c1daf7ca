"""tracking.tensorboard: the W&B scalars as TensorBoard event files, read back; one writer for 2 processes."""
from __future__ import annotations

import math

import pytest

from tests.helpers.process import CONFIG, cityseg, launch_cmd, run
from tests.helpers.runs import read_jsonl, tiny_overrides
from tests.helpers.tensorboard_events import scalars, texts


@pytest.mark.slow
def test_the_scalars_of_train_log_and_metrics_are_in_the_event_files(synth_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synth_root, out, train__epochs=2, train__max_steps=2, tracking__tensorboard="true")
    first = cityseg("train", *CONFIG, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cityseg("train", *CONFIG, *overrides, "train.max_steps=6")  # continues the same event stream
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = scalars(out / "tensorboard")
    steps = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("images_per_s", "train/images_per_s"),
                     ("data_wait", "train/data_wait"), ("epoch", "epoch")):
        assert found[tag] == pytest.approx({r["step"]: r[key] for r in steps}, rel=1e-6), tag
    evaluations = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in evaluations] == [2, 4, 6]
    assert found["val/mIoU"] == pytest.approx({m["step"]: m["mIoU"] for m in evaluations}, rel=1e-6)
    assert found["val/pixel_acc"] == pytest.approx({m["step"]: m["pixel_acc"] for m in evaluations}, rel=1e-6)
    for name in ("road", "car", "sky"):
        expected = {m["step"]: m["iou"][name] for m in evaluations if not math.isnan(m["iou"][name])}
        assert found[f"val/iou/{name}"] == pytest.approx(expected, rel=1e-6), name
    assert any("optim:" in text and "tensorboard: true" in text for text in texts(out / "tensorboard"))


@pytest.mark.slow
def test_two_processes_write_one_event_stream(synth_root, tmp_path):
    out = tmp_path / "run"
    result = run([*launch_cmd(2, "-m", "cityseg", "train", *CONFIG),
                  *tiny_overrides(synth_root, out, train__max_steps=2, tracking__tensorboard="true")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    assert sorted(scalars(out / "tensorboard")["train/loss"]) == [1, 2]


@pytest.mark.slow
def test_off_by_default(synth_root, tmp_path):
    out = tmp_path / "run"
    result = cityseg("train", *CONFIG, *tiny_overrides(synth_root, out, train__max_steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "tensorboard").exists()
