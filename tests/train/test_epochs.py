"""One epoch numbering: a step's epoch (from 1) in the console, train_log.jsonl, metrics.jsonl and checkpoints."""
from __future__ import annotations

import json
import re

import pytest

from tests.helpers.process import cityseg
from tests.helpers.runs import read_jsonl, tiny_overrides


@pytest.mark.slow
def test_one_epoch_number_for_a_step_everywhere(synth_root, tmp_path):
    """16 images, batch 4: 4 steps per epoch, 2 epochs; the evaluation after epoch e is labelled e."""
    out = tmp_path / "run"
    result = cityseg("train", "--config", "configs/demo.yaml", *tiny_overrides(synth_root, out, train__epochs=2))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {r["step"]: r["epoch"] for r in read_jsonl(out / "train_log.jsonl")}
    assert steps == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 2}
    evaluations = read_jsonl(out / "metrics.jsonl")
    assert [(m["step"], m["epoch"], m["epochs_done"]) for m in evaluations] == [(4, 1, 1), (8, 2, 2)]
    for step, epoch in ((4, 1), (8, 2)):
        assert f"step {step}/8 epoch {epoch} " in result.stdout
        assert f"eval step {step} epoch {epoch} " in result.stdout
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert (state["epoch"], state["epochs_done"], state["batch_in_epoch"]) == (2, 2, 0)
    done = result.stdout.strip().splitlines()[-1]
    assert re.search(r"^done: 8 steps; .* best mIoU 0\.\d{4} at step [48]$", done), done


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_labels_the_epoch_in_progress(synth_root, tmp_path):
    out = tmp_path / "run"
    result = cityseg("train", "--config", "configs/demo.yaml",
                     *tiny_overrides(synth_root, out, train__epochs=2, train__max_steps=6))
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert (state["epoch"], state["epochs_done"], state["batch_in_epoch"]) == (2, 1, 2)
    assert [(m["step"], m["epoch"]) for m in read_jsonl(out / "metrics.jsonl")] == [(4, 1), (6, 2)]
