"""Throughput figures count training only: a slow validation (a large validation set) and the saves after it fall
into no logging window and no epoch summary, whether they come mid-epoch or at an epoch's end."""
import re
import statistics
import time

import pytest
import torch

from cityseg.data.synthetic import write_synthetic
from cityseg.observe.speed import DataWait, Speedometer
from tests.helpers.process import PYTHON, run
from tests.helpers.runs import read_jsonl, tiny_overrides


@pytest.mark.slow
def test_validation_and_saves_stay_out_of_img_per_s(tmp_path):
    # 16 training images (4 steps of 4 per epoch) and 120 validation images: one validation takes several steps'
    # time. Validation every 2 steps: after steps 2 and 6 (mid-epoch), 4 (the epoch's end) and 8 (the last).
    write_synthetic(tmp_path / "data", n_train=16, n_val=120, height=64, width=128, seed=0)
    out = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(tmp_path / "data", out, train__epochs=2, train__eval_every_steps=2)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eval step ") == 4, result.stdout
    speed = {r["step"]: r["images_per_s"] for r in read_jsonl(out / "train_log.jsonl")}
    assert sorted(speed) == list(range(1, 9))
    steady = statistics.median(speed[step] for step in (2, 4, 6, 8))  # windows after a read only
    # the windows right after a validation + save: mid-epoch (3, 7) and the first of epoch 2 (5); with the
    # validation inside, they would show a small fraction of the steady speed
    for step in (3, 5, 7):
        assert speed[step] > 0.4 * steady, (step, speed)
    verdicts = [line for line in result.stdout.splitlines() if re.match(r"epoch [12]: ", line)]
    assert len(verdicts) == 2, result.stdout
    epoch_speed = [float(re.search(r"([0-9.]+) img/s over the epoch", line).group(1)) for line in verdicts]
    assert epoch_speed[1] > 0.4 * steady, (verdicts, speed)  # epoch 2: two validations and saves left out
    share = [float(re.search(r": ([0-9.]+)% of", line).group(1)) for line in verdicts]
    assert all(0 <= s <= 100 for s in share), verdicts


class SlowStart:
    """A loader whose epoch start (iter(): workers forked or woken, first batches fetched) takes 0.3 s."""

    def __iter__(self):
        time.sleep(0.3)
        return iter([1, 2, 3])


def test_data_wait_counts_an_epoch_start():
    wait = DataWait()
    assert list(wait.timed(SlowStart())) == [1, 2, 3]
    assert wait.seconds >= 0.3


def test_images_per_s_counts_every_process():
    """Each rank adds its own batches; the figures are the whole run's: 2 ranks x 3 steps x 4 images in the time
    this test measures around the window, and MFU per device (the run's FLOPs over 2 devices' peak)."""
    started = time.perf_counter()
    speed = Speedometer(torch.device("cpu"), world=2, flops_per_image=1e9, peak_flops=1e11)
    for _ in range(3):
        speed.add(4, step_done=True)
    time.sleep(0.3)
    record = speed.read(waited_s=0.0)
    elapsed = time.perf_counter() - started
    assert 2 * 3 * 4 / elapsed <= record["images_per_s"] <= 2 * 3 * 4 / 0.3
    assert record["images_per_s"] * record["step_time_s"] == pytest.approx(2 * 4)  # the global batch per step
    assert record["mfu"] == pytest.approx(1e9 * record["images_per_s"] / (2 * 1e11))
    verdict = speed.epoch_verdict(1)
    epoch_speed = float(re.search(r"([0-9.]+) img/s over the epoch", verdict).group(1))
    assert 2 * 3 * 4 / elapsed - 0.1 <= epoch_speed <= 2 * 3 * 4 / 0.3 + 0.1, verdict
