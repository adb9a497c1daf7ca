"""The asynchronous stop vote over 2 and 3 gloo ranks: a signal to one rank or to all stops every rank at the
same vote step, within two vote intervals of the signal, with one checkpoint and a requeue."""
from __future__ import annotations

import os
import re
import signal

import pytest

from cityseg.distributed.stop_vote import CALIBRATION_STEPS
from tests.helpers.process import child_env, finish, rank_pids, start, wait_for
from tests.helpers.runs import read_jsonl, sealed_steps, trainer_state, unsealed_dirs

pytestmark = pytest.mark.slow
# batch 1: 16 images give 8 (2 ranks) or 5 (3 ranks) steps per epoch; iteration-based with no saves and no
# validation before the end: the preemption's checkpoint is the run's only one. stop_vote_s 3: several steps per
# vote at this machine's step time (the test reads the k the run agreed on); a dead vote fails in a minute
RUN = dict(data__batch_size=1, train__epochs="null", train__max_steps=400, train__eval_every_epochs=1000,
           checkpoint__every_steps=1000, train__stop_vote_s=3, dist__timeout_minutes=1)


def step_reached(path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # not written yet
        return 0


@pytest.mark.parametrize("processes,signalled", [(2, "one"), (3, "one"), (3, "all"), (2, "all")])
def test_every_rank_stops_at_the_same_vote_step(synth_root, tmp_path, processes, signalled):
    out, marker, step_file = tmp_path / "run", tmp_path / "requeue", tmp_path / "step"
    env = child_env(CITYSEG_REQUEUE_FILE=str(marker), CITYSEG_STEP_FILE=str(step_file))
    proc = start(synth_root, out, processes=processes, env=env, **RUN)
    ranks = wait_for(lambda: (lambda found: found if len(found) == processes else None)(rank_pids(proc.pid)), proc)
    # by events: past the synchronous calibration steps, so the signal meets the asynchronous votes
    signal_step = wait_for(lambda: (lambda step: step if step >= CALIBRATION_STEPS + 2 else None)(
        step_reached(step_file)), proc, poll=0.002)
    for rank in (range(processes) if signalled == "all" else [processes - 1]):  # "one": not the main process
        os.kill(ranks[rank], signal.SIGUSR1)
    result = finish(proc, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]  # accelerate launch turns the ranks' 75 into 1
    (k,) = map(int, re.findall(r"stop vote: asynchronous, read every (\d+) steps", result.stdout))

    (stopped_at,) = sealed_steps(out)  # one checkpoint, the preemption's
    checkpoint = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert marker.read_text().strip() == str(checkpoint)
    assert result.stdout.count("preempted: checkpoint") == 1 and f"written at step {stopped_at}" in result.stdout
    # every rank saved its state at that one step (a rank stopping elsewhere would save elsewhere, or hang the save)
    assert {f"random_states_{rank}.pkl" for rank in range(processes)} <= {p.name for p in checkpoint.iterdir()}
    assert trainer_state(checkpoint)["step"] == stopped_at and not unsealed_dirs(out)
    assert max(record["step"] for record in read_jsonl(out / "train_log.jsonl")) == stopped_at
    # votes are read every k steps after the calibration; the signal joins the next vote, read k steps later
    assert (stopped_at - CALIBRATION_STEPS) % k == 0, (stopped_at, k)
    assert signal_step < stopped_at <= signal_step + 1 + 2 * k, (signal_step, stopped_at, k)
    # the first rank to leave exits 75 (after every rank saved: preempt waits for all); the launcher then
    # SIGTERMs the ranks still exiting
    root_cause = result.stderr.split("Root Cause", 1)[-1]
    assert re.search(r"exitcode\s*:\s*75\b", root_cause), result.stderr[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)) <= {"75", "-15"}, result.stderr[-3000:]
