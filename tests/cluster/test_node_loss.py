"""A host lost mid-epoch (all its processes gone, or its cable cut): bounded end, requeue or restart, exact resume."""
from __future__ import annotations

import time

import pytest

from tests.helpers.cluster import assert_same_weights, final_step, job_log, tiny

pytestmark = pytest.mark.slow  # every test here runs jobs on the namespace cluster


def test_host_killed_and_back_within_seconds_restarts_inside_the_allocation(cluster, cluster_data, reference_run,
                                                                            tmp_path):
    """Power cycle of h2: every process there dies (sockets reset); its slurmd is back 3 s later, long before
    SlurmdTimeout, so SLURM never declares the node down: train.sh must notice and restart in the allocation."""
    out = tmp_path / "run"
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh", tiny(cluster_data, out))
    cluster.wait_step(tmp_path, job, 5)
    killed_at = time.monotonic()
    cluster.script("kill-host", "h2", str(cluster.root))
    time.sleep(3)
    cluster.script("start-slurmd", "h2", str(cluster.root))
    cluster.wait_until(lambda: "restart 1 of 2" in job_log(tmp_path, job), "in-job restart", job, tmp_path, 150)
    print(f"restart logged {time.monotonic() - killed_at:.0f} s after the host was killed")
    info = cluster.wait_job(job, tmp_path)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert f"lost host(s): {cluster.host('h2')}: no word from their tasks 15 s after" in log, log
    assert "Connection reset by peer" in log or "Connection closed by peer" in log, log  # rank 0 saw it at once
    assert final_step(out) == 12
    assert_same_weights(out, reference_run["out"])


def test_host_silent_past_slurmd_timeout_is_declared_down_and_the_job_requeued(cluster, cluster_data, reference_run,
                                                                               tmp_path):
    """h2's cable is cut, then its processes die (a power loss: no reset reaches anyone). Rank 0 must give up
    within dist.timeout_minutes (0.5 here) naming the host; SLURM declares h2 down and requeues the job; once h2
    is back, the job resumes from the last complete checkpoint and ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    job = cluster.sbatch(tmp_path, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh",
                         tiny(cluster_data, out, dist__timeout_minutes=0.5))
    cluster.wait_step(tmp_path, job, 5)
    cut_at = time.monotonic()
    cluster.script("cut-host", "h2", str(cluster.root))
    cluster.script("kill-host", "h2", str(cluster.root))
    cluster.wait_until(lambda: not cluster.rank_pids("h1"), "end of rank 0 on h1", job, tmp_path, 120)
    print(f"rank 0 ended {time.monotonic() - cut_at:.0f} s after the cut")
    cluster.wait_until(lambda: int(cluster.job(job).get("Restarts", 0)) >= 1, "requeue", job, tmp_path, 120)
    cluster.script("heal-host", "h2", str(cluster.root))
    cluster.script("start-slurmd", "h2", str(cluster.root))
    info = cluster.wait_job(job, tmp_path, timeout=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"Node failure on {cluster.host('h2')}" in log, log  # srun names the host SLURM declared down
    assert "[rank 0] error: a collective failed" in log, log  # rank 0 gave up by itself (dist.timeout_minutes)
    assert final_step(out) == 12
    assert_same_weights(out, reference_run["out"])
