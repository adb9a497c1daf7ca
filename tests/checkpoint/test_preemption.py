"""Preempted = uninterrupted: a signalled run checkpoints, exits 75 and, resumed, ends bit-identical to a straight one."""
from __future__ import annotations

import os
import signal

import pytest

from tests.helpers.process import child_env, finish, group_pids, start, train, wait_for
from tests.helpers.runs import (
    assert_exit,
    assert_same_run,
    sealed_steps,
    trainer_state,
    unsealed_dirs,
)

# 16 images, batch 2: 8 steps in the epoch, a checkpoint after every one; 2 loader workers to be signalled too
ONE = dict(data__batch_size=2, data__num_workers=2, checkpoint__every_steps=1, checkpoint__keep_last=20)


@pytest.fixture(scope="module")
def straight_one(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight1") / "run"
    assert_exit(train(synth_root, out, **ONE), 0)
    return out


@pytest.mark.slow
def test_signal_to_every_process_checkpoints_requeues_and_resumes_identically(synth_root, straight_one, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "requeue"
    env = child_env(CITYSEG_REQUEUE_FILE=str(marker))
    proc = start(synth_root, out, env=env, **ONE)
    wait_for(lambda: sealed_steps(out), proc)
    job = group_pids(proc.pid)
    assert len(job) >= 3, job  # the training process and its 2 DataLoader workers, as scancel --signal sees them
    # SIGTERM, the harder one: torch's own handler in loader workers would let it kill them (and the run)
    os.killpg(proc.pid, signal.SIGTERM)
    result = finish(proc)
    assert_exit(result, 75)
    assert "killed by signal" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    stopped_at = sealed_steps(out)[-1]
    checkpoint = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert f"preempted: checkpoint {checkpoint} written at step {stopped_at}" in result.stdout
    assert marker.read_text().strip() == str(checkpoint)
    assert 0 < trainer_state(checkpoint)["batch_in_epoch"] < 8  # a mid-epoch position
    assert not unsealed_dirs(out)

    resumed = train(synth_root, out, env=env, **ONE)
    assert_exit(resumed, 0)
    assert f"resume: from {checkpoint}" in resumed.stdout
    assert_same_run(out, straight_one)


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_to_resume_from(synth_root, straight_one, tmp_path):
    out = tmp_path / "run"
    proc = start(synth_root, out, **ONE)
    while True:  # freeze the job the moment a save is under way; kill it only if it is still mid-save
        wait_for(lambda: unsealed_dirs(out), proc, poll=0.002)
        os.killpg(proc.pid, signal.SIGSTOP)
        if unsealed_dirs(out):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        os.killpg(proc.pid, signal.SIGCONT)
    finish(proc)
    half_written = int(unsealed_dirs(out)[0].name.rsplit("_", 1)[1])
    assert all(step < half_written for step in sealed_steps(out))

    resumed = train(synth_root, out, **ONE)
    assert_exit(resumed, 0)
    if half_written > 1:
        assert f"resume: from {out / 'checkpoints' / f'step_{half_written - 1:08d}'}" in resumed.stdout
    else:
        assert "resume: no checkpoint in output_dir, starting fresh" in resumed.stdout
    assert not unsealed_dirs(out)  # the leftover is cleared by the next save of that step
    assert_same_run(out, straight_one)
