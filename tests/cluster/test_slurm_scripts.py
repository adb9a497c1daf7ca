"""launch/submit.py: the sbatch command it builds, its config check, and a job it submits to the cluster; slurm/eval.sh:
the launch it makes on a GPU node (srun and nvidia-smi replaced by stand-ins that record what they were asked)."""
from __future__ import annotations

import os
import re
import shlex
import stat
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


@pytest.mark.slow
def test_submit_preflights_the_world_of_all_nodes_times_gpus(cluster_data):
    """2 nodes x 4 GPUs is 8 processes: a batch of 8 fits 2 processes' share of 32 images (16) but not 8's (4)."""
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "4",
           "--dry-run", f"data.root={cluster_data}", "data.batch_size=8"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
    assert "data.batch_size: 8 is larger than each process's share of the training set (32 samples / 8 processes = 4)" \
        in result.stderr, result.stderr
    assert "--world-size 8" in result.stderr.splitlines()[-1] and "nothing submitted" in result.stderr
    assert "sbatch" not in result.stdout


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


def stand_in(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_eval_script(tmp_path, gpus_listed: int, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """slurm/eval.sh as a batch job would run it, with srun recording its arguments one per line and nvidia-smi
    listing `gpus_listed` GPUs; returns the script's result and what srun was asked to run."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir(exist_ok=True)
    record.unlink(missing_ok=True)
    stand_in(bin_dir, "srun", f'printf "%s\\n" "$@" > {shlex.quote(str(record))}')
    gpu_lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus_listed))
    stand_in(bin_dir, "nvidia-smi", gpu_lines)
    base = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "ACCELERATE_"))}
    env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix, "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_ID": "1234", "SLURM_CPUS_PER_TASK": "8", **env}
    script = ["bash", str(REPO / "slurm" / "eval.sh"), "--config", CONFIG, "--checkpoint", "run/model.safetensors"]
    result = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, record.read_text().splitlines() if record.is_file() else []


def launch_of(processes: int) -> list[str]:
    """What eval.sh hands srun for `processes` processes on one node (job 1234: port 20000 + 1234)."""
    multi = ["--multi_gpu"] if processes > 1 else []
    return ["--ntasks=1", "--cpus-per-task=8", "accelerate", "launch", "--num_machines", "1", "--num_processes",
            str(processes), "--main_process_port", "21234", "--dynamo_backend", "no", *multi, "-m", "cityseg",
            "evaluate", "--config", CONFIG, "--checkpoint", "run/model.safetensors"]


def test_eval_script_starts_one_process_per_gpu_of_the_node(tmp_path):
    # SLURM_GPUS_ON_NODE (what SLURM gave the job) wins over what nvidia-smi lists
    result, srun = run_eval_script(tmp_path, gpus_listed=8, SLURM_GPUS_ON_NODE="4")
    assert result.returncode == 0, result.stderr
    assert srun == launch_of(4)
    assert "with 4 process(es)" in result.stdout
    result, srun = run_eval_script(tmp_path, gpus_listed=8, SLURM_GPUS_ON_NODE="1")
    assert result.returncode == 0 and srun == launch_of(1), result.stderr
    result, srun = run_eval_script(tmp_path, gpus_listed=2)  # no SLURM_GPUS_ON_NODE: the GPUs nvidia-smi lists
    assert result.returncode == 0 and srun == launch_of(2), result.stderr
    result, srun = run_eval_script(tmp_path, gpus_listed=8, SLURM_GPUS_ON_NODE="4", ACCELERATE_USE_CPU="1")
    assert result.returncode == 0 and srun == launch_of(1), result.stderr


def test_eval_script_on_a_node_without_gpus_stops_in_one_line(tmp_path):
    result, srun = run_eval_script(tmp_path, gpus_listed=0)
    assert result.returncode == 2 and srun == []
    assert result.stderr.count("\n") == 1 and "no GPU on" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
