"""One run per output_dir (double sbatch, requeue + manual resubmit): the second stops in one line, touching
nothing; every rank hears the main process's verdict; a run killed with SIGKILL leaves no lock for its requeue."""
import os
import signal
import socket

import pytest

from cityseg.distributed.run_lock import acquire, release
from tests.helpers.process import launch_cmd, rank_reports, run, start, train, wait_for
from tests.helpers.runs import sealed_steps


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_dir_stops_in_one_line_and_a_killed_run_leaves_no_lock(synth_root, tmp_path):
    out = tmp_path / "run"
    long_run = dict(train__epochs=500, checkpoint__every_steps=1, checkpoint__keep_last=1)
    first = start(synth_root, out, **long_run)
    try:
        wait_for(lambda: sealed_steps(out), first)  # training, saving and pruning its checkpoints
        second = train(synth_root, out, timeout=300, **long_run)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"error: {out}: in use by another run (pid {first.pid} on {socket.gethostname()} since "
            f"{(out / '.lock').read_text().split(' since ')[1].strip()}; {out / '.lock'}): wait for it to end or "
            "stop it, or choose another output_dir"], second.stderr[-3000:]
        assert "resume:" not in second.stdout  # stopped before it chose (and would prune) the first run's checkpoint
        assert first.poll() is None  # the first run trains on, and saves on
        saved = sealed_steps(out)[-1]
        wait_for(lambda: sealed_steps(out) and sealed_steps(out)[-1] > saved, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a node loss or the OOM killer would: no cleanup runs
        first.wait(timeout=60)
    assert acquire(out, wait_s=0) is None  # the requeued run gets the lock at once
    release(out)


@pytest.mark.slow
def test_every_rank_hears_that_the_output_dir_is_taken(tmp_path):
    """The main process alone locks; rank 1 must not train alone or wait in a collective: it gets the same line."""
    assert acquire(tmp_path, wait_s=0) is None  # this test process is the other run
    try:
        result = run(launch_cmd(2, "tests/distributed/hold_lock.py", tmp_path), timeout=300)
    finally:
        release(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(rank_reports(result.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1], result.stdout
    for report in reports:
        assert report["busy"] and report["busy"].startswith(f"{tmp_path}: in use by another run (pid {os.getpid()} "
                                                             f"on {socket.gethostname()} since "), report
