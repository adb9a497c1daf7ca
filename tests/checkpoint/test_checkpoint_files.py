"""The checkpoint directory rules in this process, on real files (the quick tier's checkpoint tests): which step
directories count as sealed, keep_last pruning, a truncated newest checkpoint skipped for the one before it, and
`best` replaced only by a higher mIoU."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from cityseg import checkpoint
from cityseg.train.resume import find_resume


def seal(output_dir, step: int) -> None:
    """A sealed step checkpoint as save() leaves it: the weights, then trainer_state.json recording their size."""
    path = checkpoint.step_dir(output_dir, step)
    path.mkdir(parents=True)
    save_file({"weight": torch.full((4, 4), float(step))}, str(path / checkpoint.MODEL_FILE))
    size = (path / checkpoint.MODEL_FILE).stat().st_size
    (path / checkpoint.TRAINER_STATE).write_text(json.dumps({"step": step, "files": {checkpoint.MODEL_FILE: size}}))


def test_only_sealed_step_directories_count_oldest_first(tmp_path):
    for step in (10, 2, 9):
        seal(tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp_step_00000011").mkdir()  # a save in progress
    (tmp_path / "checkpoints" / "step_00000012").mkdir()  # renamed but without its trainer state
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step_00000002", "step_00000009", "step_00000010"]


def test_prune_keeps_the_newest_keep_last(tmp_path):
    for step in range(1, 6):
        seal(tmp_path, step)
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_a_truncated_newest_checkpoint_is_skipped_naming_the_file(tmp_path):
    seal(tmp_path, 1)
    seal(tmp_path, 2)
    weights = checkpoint.step_dir(tmp_path, 2) / checkpoint.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-8])
    warnings = []
    assert find_resume(tmp_path, warn=warnings.append) == checkpoint.step_dir(tmp_path, 1)
    assert len(warnings) == 1 and str(weights) in warnings[0] and "truncated" in warnings[0], warnings


def test_best_is_replaced_only_by_a_higher_miou(tmp_path):
    for step in (1, 2, 3):
        seal(tmp_path, step)
    best = tmp_path / "checkpoints" / "best"
    assert checkpoint.update_best(tmp_path, checkpoint.step_dir(tmp_path, 1), miou=0.5, step=1)
    assert not checkpoint.update_best(tmp_path, checkpoint.step_dir(tmp_path, 2), miou=0.5, step=2)
    assert json.loads((best / "best.json").read_text())["step"] == 1
    assert checkpoint.update_best(tmp_path, checkpoint.step_dir(tmp_path, 3), miou=0.6, step=3)
    assert json.loads((best / "best.json").read_text()) == {"mIoU": 0.6, "step": 3, "source": "step_00000003"}
    assert (best / checkpoint.TRAINER_STATE).is_file() and not list(best.parent.glob(".*best"))
