"""Two ranks over gloo: a signal to one rank stops both at the same step, one checkpoint, identical resume."""
from __future__ import annotations

import os
import signal

import pytest

from tests.helpers.process import child_env, finish, rank_pids, start, train, wait_for
from tests.helpers.runs import (
    assert_exit,
    assert_same_run,
    sealed_steps,
    trainer_state,
    unsealed_dirs,
)

pytestmark = pytest.mark.slow
# 16 images, batch 2, 2 ranks: 4 steps per epoch, a checkpoint after every one
TWO = dict(data__batch_size=2, checkpoint__every_steps=1, checkpoint__keep_last=20)


def test_signal_to_one_rank_stops_all_ranks_at_one_step_and_resumes_identically(synth_root, tmp_path):
    straight, out, marker = tmp_path / "straight", tmp_path / "run", tmp_path / "requeue"
    env = child_env(CITYSEG_REQUEUE_FILE=str(marker))
    assert_exit(train(synth_root, straight, processes=2, **TWO), 0)

    proc = start(synth_root, out, processes=2, env=env, **TWO)
    # the ranks are found while they start up; the signal then follows the event "step 1 is sealed" within a poll
    # (milliseconds), so the stop lands at step 2 or 3 of 4 however slow the machine is
    ranks = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(rank_pids(proc.pid)), proc)
    wait_for(lambda: sealed_steps(out), proc, poll=0.002)
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the per-step all-reduce
    result = finish(proc)
    assert result.returncode != 0  # accelerate launch turns the ranks' 75 into 1; the marker says "requeue"
    stopped_at = sealed_steps(out)[-1]
    checkpoint = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert marker.read_text().strip() == str(checkpoint)
    assert result.stdout.count("preempted: checkpoint") == 1
    assert f"written at step {stopped_at}" in result.stdout
    assert sealed_steps(out) == list(range(1, stopped_at + 1))  # nothing after the stop: both ranks stopped there
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert 0 < trainer_state(checkpoint)["batch_in_epoch"] < 4
    assert not unsealed_dirs(out)

    resumed = train(synth_root, out, processes=2, env=env, **TWO)
    assert_exit(resumed, 0)
    assert f"resume: from {checkpoint}" in resumed.stdout
    assert_same_run(out, straight)
