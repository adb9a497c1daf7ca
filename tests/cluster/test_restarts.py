"""In-allocation restarts (CITYSEG_MAX_RESTARTS): a crashed rank comes back from the last checkpoint."""
from __future__ import annotations

import os
import re
import signal

import pytest

from tests.helpers.cluster import assert_same_weights, final_step, job_log, tiny

pytestmark = pytest.mark.slow  # every test here runs jobs on the namespace cluster


def kill_rank_at_step(cluster, log_dir, job: str, rank: int, host: str, step: int) -> int:
    done = cluster.wait_step(log_dir, job, step)
    pid = cluster.wait_until(lambda: cluster.rank_pids(host).get(rank), f"rank {rank} on {host}", job, log_dir, 30)
    os.kill(pid, signal.SIGKILL)
    return done


def test_a_killed_rank_is_restarted_inside_the_allocation(cluster, cluster_data, reference_run, tmp_path):
    out = tmp_path / "run"
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh", tiny(cluster_data, out))
    kill_rank_at_step(cluster, tmp_path, job, rank=1, host="h2", step=5)
    info = cluster.wait_job(job, tmp_path)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log  # same allocation, never requeued
    assert re.search(rf"restart 1 of 2 inside the allocation after a failure at step \d+ "
                     rf"\({cluster.host('h2')}: task 1: Killed\)", log), log
    assert log.count("rank 1 of 2 on") == 2, log
    assert final_step(out) == 12
    assert_same_weights(out, reference_run["out"])


def test_restart_budget_used_up_fails_the_job_without_requeue(cluster, cluster_data, tmp_path):
    env = cluster.job_env(tmp_path, CITYSEG_MAX_RESTARTS="0")
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh",
                         tiny(cluster_data, tmp_path / "run"), env=env)
    kill_rank_at_step(cluster, tmp_path, job, rank=0, host="h1", step=3)
    info = cluster.wait_job(job, tmp_path)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "all 0 in-job restarts are used (CITYSEG_MAX_RESTARTS): job failed, not requeued" in log, log
    assert log.count("rank 0 of 2 on") == 1, log


def test_a_failure_before_the_first_step_is_never_retried(cluster, cluster_data, tmp_path):
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh",
                         tiny(cluster_data, tmp_path / "run", data__root="/nonexistent"))
    info = cluster.wait_job(job, tmp_path, timeout=120)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "/nonexistent" in log and "before its first step" in log and "not retried" in log, log
    assert log.count("rank 0 of 2 on") == 1 and "requeueing" not in log, log
