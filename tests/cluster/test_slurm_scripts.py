"""launch/submit.py: the sbatch command it builds, its config check, and a job it submits to the cluster."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers.cluster import REPO, final_step, job_log, tiny

CONFIG = "configs/demo.yaml"


@pytest.mark.slow
def test_submit_dry_run_prints_quoted_command_and_submits_nothing(cluster_data):
    # the preflight runs on this GPU-less machine for 2 nodes x 4 GPUs: fp16 and batch share judged for that job
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "4",
           "--time", "04:00:00", "--partition", "gpu", "--account", "my lab", "--dry-run",
           f"data.root={cluster_data}", "data.batch_size=2", "train.mixed_precision=fp16", "train.max_steps=5",
           "tracking.wandb.tags=[a, b]"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()[0].split(" && ", 1)[1]
    assert shlex.split(printed) == [
        "sbatch", "--parsable", "--job-name=demo", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4",
        "--time=04:00:00", "--partition=gpu", "--account=my lab", "slurm/train.sh", "--config", CONFIG,
        f"data.root={cluster_data}", "data.batch_size=2", "train.mixed_precision=fp16", "train.max_steps=5",
        "tracking.wandb.tags=[a, b]"]
    assert "not submitted" in result.stdout


def test_submit_rejects_a_config_typo_before_the_queue():
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--dry-run", "train.max_stepz=5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train.max_stepz" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "sbatch" not in result.stdout


@pytest.mark.slow
def test_submit_helper_submits_a_job_that_runs(cluster, cluster_data, tmp_path):
    cmd = ["nsenter", f"--net=/run/netns/{cluster.host('ctl')}", sys.executable, "launch/submit.py",
           "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00", "--log-dir", str(tmp_path),
           *tiny(cluster_data, tmp_path / "run", max_steps=2)]
    result = subprocess.run(cmd, cwd=REPO, env=cluster.job_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert f"log: {tmp_path}/demo-{job}.out" in result.stdout
    info = cluster.wait_job(job, tmp_path, timeout=180)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job)
    assert final_step(tmp_path / "run") == 2
