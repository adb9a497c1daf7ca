"""launch/submit.py --sweep: the combinations and the job-array sbatch line (dry run), and a 2-task array on the
cluster whose tasks train with their own values, names and output_dirs, grouped in one W&B group."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.helpers.cluster import REPO, final_step, tiny


def submit(*args: str, env: dict | None = None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "launch/submit.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env or os.environ)


@pytest.mark.slow
def test_sweep_dry_run_prints_every_combination_and_one_array_line(cluster_data, tmp_path):
    result = submit("--gpus-per-node", "0", "--log-dir", str(tmp_path), "--dry-run", "--sweep", "optim.lr=1e-3,3e-4",
                    "--sweep", "data.image_size=[32,64],[64,128]", "--max-parallel", "2",
                    *tiny(cluster_data, tmp_path / "run", max_steps=1), env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sweep: 4 runs as job array tasks 0-3, W&B group demo-sweep"
    assert lines[1:5] == [
        f"  task 0: optim.lr=1e-3 data.image_size=[32,64] -> {tmp_path}/run/lr=1e-3_image_size=-32-64",
        f"  task 1: optim.lr=1e-3 data.image_size=[64,128] -> {tmp_path}/run/lr=1e-3_image_size=-64-128",
        f"  task 2: optim.lr=3e-4 data.image_size=[32,64] -> {tmp_path}/run/lr=3e-4_image_size=-32-64",
        f"  task 3: optim.lr=3e-4 data.image_size=[64,128] -> {tmp_path}/run/lr=3e-4_image_size=-64-128"]
    sbatch = shlex.split(lines[5].split(" && ", 1)[1])
    assert "--array=0-3%2" in sbatch and f"--output={tmp_path}/%x-%A_%a.out" in sbatch
    export = next(a for a in sbatch if a.startswith("--export="))
    assert re.search(rf"CITYSEG_SWEEP_FILE={re.escape(str(tmp_path))}/demo-sweep-\d{{8}}-\d{{6}}\.tsv$", export)
    assert sbatch[sbatch.index("slurm/train.sh") + 1:][:2] == ["--config", "configs/demo.yaml"]
    assert "not submitted" in lines[-1] and not list(tmp_path.glob("*.tsv"))


def test_sweep_rejects_a_bad_value_before_the_queue(tmp_path):
    result = submit("--dry-run", "--sweep", "optim.name=sgd,lion", "--config", "configs/demo.yaml")
    assert result.returncode == 2 and "sweep task 1" in result.stderr and "lion" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sweep_runs_a_job_array_with_a_task_per_combination(cluster, cluster_data, tmp_path):
    out = tmp_path / "run"
    result = submit("--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00", "--log-dir", str(tmp_path),
                    "--sweep", "optim.lr=0.001,0.002", *tiny(cluster_data, out, max_steps=1),
                    "tracking.wandb.mode=offline", env=cluster.job_env(tmp_path),
                    prefix=["nsenter", f"--net=/run/netns/{cluster.host('ctl')}"])
    assert result.returncode == 0, result.stderr
    array = re.search(r"submitted job array (\d+) \(2 tasks", result.stdout).group(1)
    for task, lr in ((0, 0.001), (1, 0.002)):
        info = cluster.wait_job(f"{array}_{task}", tmp_path, timeout=240)
        log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"demo-{array}_{task}.*"))
        assert info["JobState"] == "COMPLETED", log[-4000:]
        assert f"sweep task {task} of array {array}" in log
        run_dir = out / f"lr={lr}"
        assert final_step(run_dir) == 1
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["name"] == f"demo-lr={lr}"
        assert config["output_dir"] == str(run_dir) and config["tracking"]["wandb"]["group"] == "demo-sweep"
        assert (run_dir / "wandb").is_dir()  # its own W&B run (offline), in the sweep's group
    assert sorted(p.name for p in out.iterdir()) == ["lr=0.001", "lr=0.002"]


@pytest.mark.slow
def test_a_preempted_sweep_task_requeues_and_resumes_alone(cluster, cluster_data, tmp_path):
    out = tmp_path / "run"
    result = submit("--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00", "--log-dir", str(tmp_path),
                    "--sweep", "optim.lr=0.001,0.002", *tiny(cluster_data, out, max_steps=12),
                    env=cluster.job_env(tmp_path), prefix=["nsenter", f"--net=/run/netns/{cluster.host('ctl')}"])
    assert result.returncode == 0, result.stderr
    array = re.search(r"submitted job array (\d+)", result.stdout).group(1)
    def running_task0():  # a pending array is one record (the array's id); a started task has its own JobId
        info = cluster.job(f"{array}_0")
        return info["JobId"] if info.get("JobState") == "RUNNING" else None
    task0 = cluster.wait_until(running_task0, "task 0 running", array, tmp_path, 120)
    cluster.wait_step(tmp_path, task0, 3)  # train.sh's step file is named by the task's own SLURM_JOB_ID
    cluster.client("scancel", "--signal=TERM", "--full", f"{array}_0")
    infos = {task: cluster.wait_job(f"{array}_{task}", tmp_path, timeout=300) for task in (0, 1)}
    log0 = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"demo-{array}_0.*"))
    assert infos[0]["JobState"] == "COMPLETED" and infos[0]["Restarts"] == "1", log0[-4000:]
    assert infos[1]["JobState"] == "COMPLETED" and infos[1]["Restarts"] == "0"
    assert f"requeueing job {task0}" in log0 and log0.count("sweep task 0 of array") == 2  # same overrides again
    assert final_step(out / "lr=0.001") == 12 and final_step(out / "lr=0.002") == 12
    assert "resume: from" in log0
