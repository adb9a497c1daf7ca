"""The LR of a real run is the one schedule's (optim.Schedule: warmup, poly decay to min_lr, the global-batch factor):
every logged `lr` of train_log.jsonl is Schedule.lr of its step, and that schedule matches its definition by hand."""
import math

import pytest

from cityseg.config.load import load_config
from cityseg.train.optim import Schedule
from tests.helpers.process import REPO, train
from tests.helpers.runs import read_jsonl, tiny_overrides

# 16 images / batch 4 = 4 steps per epoch x 2 epochs; global batch 4 against a reference of 16, sqrt: factor 0.5
SCHEDULE = {"train__epochs": 2, "optim__lr": 0.01, "optim__warmup_steps": 3, "optim__poly_power": 2.0,
            "optim__min_lr": 0.001, "train__reference_global_batch": 16, "optim__lr_scaling": "sqrt"}


@pytest.mark.slow
def test_every_logged_lr_is_the_one_schedule(synth_root, tmp_path):
    out = tmp_path / "run"
    result = train(synth_root, out, **SCHEDULE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optim.lr 0.01 scaled (sqrt) by 0.5 to 0.005" in result.stdout
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(synth_root, out, **SCHEDULE))
    schedule = Schedule.for_run(cfg, processes=1, total_steps=8)
    records = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records:  # the record of step s carries the LR its update used: the schedule at s - 1
        assert record["lr"] == pytest.approx(schedule.lr(record["step"] - 1), rel=1e-12), record
    by_hand = [0.5 * 0.01 * (s + 1) / 3 if s < 3 else 0.5 * ((0.01 - 0.001) * (1 - (s - 3) / 5) ** 2 + 0.001)
               for s in range(8)]
    assert [r["lr"] for r in records] == pytest.approx(by_hand, rel=1e-12)
    assert math.isclose(records[-1]["lr"], 0.5 * ((0.01 - 0.001) * 0.2 ** 2 + 0.001))
