"""Resumed across epoch boundaries: stopped mid-epoch 0 of 3 and resumed, a run ends as an uninterrupted one
(weights, every step's loss and LR, every evaluation), with 1 and 2 processes: no resume offset leaks into epoch 1."""
from __future__ import annotations

import os
import signal

import pytest

from tests.helpers.process import child_env, finish, rank_pids, start, train, wait_for
from tests.helpers.runs import (
    assert_exit,
    final_weights,
    logged_steps,
    max_abs_diff,
    read_jsonl,
    sealed_steps,
    trainer_state,
)

pytestmark = pytest.mark.slow
# 16 images, 8 steps per epoch either way (1 x 2 or 2 x 1 images per step), 3 epochs
SHAPES = {1: dict(data__batch_size=2, train__epochs=3), 2: dict(data__batch_size=1, train__epochs=3)}
STEPS_PER_EPOCH = 8


def stop_after_first_checkpoint(proc, out, processes: int) -> None:
    """When the first checkpoint is sealed, freeze the training processes, signal them and let them go on: the
    stop lands on the step in progress, early in epoch 0 whatever the machine's speed."""
    wait_for(lambda: sealed_steps(out), proc)
    if processes == 1:
        pids = [proc.pid]  # its process group: the trainer (no loader workers here)
        send = os.killpg
    else:
        ranks = wait_for(lambda: (lambda found: len(found) == processes and found)(rank_pids(proc.pid)), proc)
        pids, send = list(ranks.values()), os.kill
    for sig in (signal.SIGSTOP, signal.SIGUSR1, signal.SIGCONT):
        for pid in pids:
            send(pid, sig)


@pytest.mark.parametrize("processes", [1, 2])
def test_stopped_mid_epoch_0_of_3_and_resumed_ends_as_an_uninterrupted_run(synth_root, tmp_path, processes):
    shape = SHAPES[processes]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert_exit(train(synth_root, straight, processes, **shape), 0)

    env = child_env(CITYSEG_REQUEUE_FILE=str(tmp_path / "requeue"))
    proc = start(synth_root, out, processes, env=env, checkpoint__every_steps=1, **shape)
    stop_after_first_checkpoint(proc, out, processes)
    result = finish(proc)
    assert result.returncode != 0 and "preempted: checkpoint" in result.stdout, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / f"step_{sealed_steps(out)[-1]:08d}"
    state = trainer_state(checkpoint)
    assert state["epochs_done"] == 0 and 0 < state["batch_in_epoch"] < STEPS_PER_EPOCH, state  # mid-epoch 0

    resumed = train(synth_root, out, processes, env=env, **shape)  # checkpoint.every_steps back to 0: allowed
    assert_exit(resumed, 0)
    assert f"resume: from {checkpoint}" in resumed.stdout
    assert max_abs_diff(final_weights(out), final_weights(straight)) == 0.0
    steps = logged_steps(out)
    assert steps == logged_steps(straight)  # every step's loss and LR, before and after the resume
    assert [(step, epoch) for step, epoch, _, _ in steps] == \
        [(step, 1 + (step - 1) // STEPS_PER_EPOCH) for step in range(1, 3 * STEPS_PER_EPOCH + 1)]
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")  # after each epoch
