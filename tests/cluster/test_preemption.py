"""Stop signals as SLURM sends them: checkpoint complete -> exit 75 -> requeue -> exact resume."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.cluster import (
    REPO,
    assert_same_weights,
    final_step,
    job_log,
    preempted_step,
    tiny,
)

pytestmark = pytest.mark.slow  # every test here runs jobs on the namespace cluster

SLOW_SAVE = Path(__file__).resolve().parent / "slow_save"  # sitecustomize: a save after a stop starts late


def requeued(cluster, job: str) -> bool:
    return int(cluster.job(job).get("Restarts", 0)) >= 1


def test_sigterm_to_the_whole_job_checkpoints_requeues_and_resumes_exactly(cluster, cluster_data, reference_run,
                                                                           tmp_path):
    out = tmp_path / "run"
    env = cluster.job_env(tmp_path, PYTHONPATH=f"{SLOW_SAVE}:{REPO}", CITYSEG_TEST_HOLD_AT_STEP="3")
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh", tiny(cluster_data, out),
                         env=env)
    cluster.wait_step(tmp_path, job, 3)  # the run holds there until the signal arrives (tests/cluster/slow_save)
    cluster.client("scancel", "--signal=TERM", "--full", job)
    cluster.wait_until(lambda: requeued(cluster, job), "requeue", job, tmp_path, 120)
    info = cluster.wait_job(job, tmp_path)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "SIGTERM received" in log and f"requeueing job {job}" in log and f"job {job} restart 1" in log
    saved, step = preempted_step(log)
    assert 3 <= step < 12, log
    assert re.search(rf"resume: from\s+{re.escape(saved)}", log), log  # the stop's checkpoint, not an older one
    assert "forcing job termination" not in log and "Killed" not in log, log
    assert final_step(out) == 12
    assert_same_weights(out, reference_run["out"])


def test_preemption_grace_time_longer_than_30_s_is_honoured(cluster, cluster_data, reference_run, tmp_path):
    """A job of the 'high' partition preempts ours (PreemptMode=REQUEUE, GraceTime=60): SLURM sends SIGTERM to
    every process of the job. Our checkpoint starts 35 s late (a slow filesystem): a launcher agent would have
    killed the ranks after 30 s; the resumed run must start from the checkpoint of the stop."""
    out = tmp_path / "run"
    env = cluster.job_env(tmp_path, PYTHONPATH=f"{SLOW_SAVE}:{REPO}", CITYSEG_TEST_SLOW_STOP_SAVE_S="35",
                          CITYSEG_TEST_HOLD_AT_STEP="3")
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh", tiny(cluster_data, out),
                         env=env)
    cluster.wait_step(tmp_path, job, 3)
    urgent = cluster.client("sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive",
                            f"--output={tmp_path}/urgent-%j.out", "--wrap=sleep 1", env=env).stdout.strip()
    cluster.wait_until(lambda: requeued(cluster, job), "preemption requeue", job, tmp_path, 150)
    assert cluster.wait_job(urgent, tmp_path, timeout=120)["JobState"] == "COMPLETED"
    info = cluster.wait_job(job, tmp_path)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log
    assert "slow_save: stop signal SIGTERM" in log, log  # the ranks got SIGTERM from SLURM and waited 35 s
    saved, step = preempted_step(log)
    assert re.search(rf"resume: from\s+{re.escape(saved)}", log), log
    assert final_step(out) == 12
    assert_same_weights(out, reference_run["out"])
