"""The fan-out of a run's records: one logged step reaches every sink it is configured for (the JSONL logs, an
offline W&B run, a TensorBoard event file, the step file, the console), all read back; a sink turned off gets
nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.process import PYTHON, child_env, run
from tests.helpers.runs import read_jsonl
from tests.helpers.tensorboard_events import scalars
from tests.helpers.wandb_records import history, read_records, summary

FAN_OUT = Path(__file__).with_name("fan_out.py")
STEP_2 = {"step": 2, "epoch": 1, "lr": 0.01, "loss": 0.5, "images_per_s": 100.0, "data_wait": 0.125,
          "step_time_s": 0.25, "grad_norm": 1.5, "nan_skipped": 0, "scaler_skipped": 0}
EVALUATION = {"epoch": 1, "epochs_done": 1, "step": 2, "mIoU": 0.25, "pixel_acc": 0.75,
              "iou": {"road": 0.5, "car": 0.0}}


def fan_out(tmp_path: Path, *overrides: str, **env: str):
    """fan_out.py in a child with a home of its own (wandb reads and writes nothing of the user's)."""
    out, home = tmp_path / "run", tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    result = run([PYTHON, FAN_OUT, f"output_dir={out}", *overrides], timeout=300, env=child_env(
        HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb"), WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"), TMPDIR=str(home / "tmp"), **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.slow
def test_a_logged_step_and_an_evaluation_reach_every_sink(tmp_path):
    step_file = tmp_path / "step"
    out, stdout = fan_out(tmp_path, "tracking.tensorboard=true", "tracking.wandb.mode=offline",
                          CITYSEG_STEP_FILE=str(step_file))
    assert step_file.read_text() == "2\n"  # every step, the last one kept
    assert read_jsonl(out / "train_log.jsonl") == [STEP_2]  # step 1 is off the train.log_every cadence
    assert read_jsonl(out / "metrics.jsonl") == [EVALUATION]
    assert "step 2/10 epoch 1 loss 0.5000 lr 1.00e-02 100.0 img/s" in stdout and "step 1/10" not in stdout
    assert "eval step 2 epoch 1 mIoU 0.2500 pixel_acc 0.7500" in stdout

    tensorboard = scalars(out / "tensorboard")
    expected = {"epoch": 1, "train/loss": 0.5, "train/lr": 0.01, "train/images_per_s": 100.0,
                "train/data_wait": 0.125, "train/step_time_s": 0.25, "train/grad_norm": 1.5,
                "train/nan_skipped": 0, "train/scaler_skipped": 0, "val/mIoU": 0.25, "val/pixel_acc": 0.75,
                "val/iou/road": 0.5, "val/iou/car": 0.0}
    assert {tag: tensorboard[tag] for tag in expected} == {tag: {2: pytest.approx(value)}
                                                           for tag, value in expected.items()}

    (log,) = (out / "wandb").glob("offline-run-*/*.wandb")
    records = read_records(log)
    logged = {}
    for row in history(records):
        assert row["_step"] == 2, row  # nothing of step 1
        logged.update(row)
    assert {tag: logged[tag] for tag in expected} == pytest.approx(expected)
    assert logged["val/iou_table/nrows"] == 2
    assert summary(records)["best_mIoU"] == 0.25 and summary(records)["step"] == 2


@pytest.mark.slow
def test_a_sink_turned_off_gets_nothing(tmp_path):
    out, stdout = fan_out(tmp_path, "tracking.tensorboard=false", "tracking.wandb.mode=disabled")
    assert read_jsonl(out / "train_log.jsonl") == [STEP_2] and read_jsonl(out / "metrics.jsonl") == [EVALUATION]
    assert sorted(path.name for path in out.iterdir()) == ["metrics.jsonl", "train_log.jsonl"]  # no W&B, TensorBoard
    assert not list(tmp_path.glob("step*"))  # no $CITYSEG_STEP_FILE: no step file anywhere
    assert "eval step 2" in stdout
