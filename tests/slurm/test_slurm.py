"""slurm/train.sh, slurm/eval.sh and launch/submit.py against the real two-node SLURM cluster of conftest.py."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/demo.yaml"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """64 small training images: 16 steps per epoch at 2 images per process on 2 processes."""
    out = tmp_path_factory.mktemp("data") / "synth"
    subprocess.run([sys.executable, "-m", "cityseg", "synth", "--out", str(out), "--train", "64", "--val", "4",
                    "--height", "64", "--width", "128"], cwd=REPO, check=True, capture_output=True)
    return out


def tiny(data: Path, output_dir: Path, max_steps: int) -> list[str]:
    """Overrides for a CPU-sized run of the demo config."""
    return [f"data.root={data}", "data.image_size=[64,128]", "data.batch_size=2", "data.num_workers=0",
            f"output_dir={output_dir}", f"train.max_steps={max_steps}", "train.epochs=1000",
            "train.log_every=20", "tracking.wandb.mode=disabled"]


def job_env(cluster, log_dir: Path) -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it): this Python first, CPU processes, our log dir."""
    # COLUMNS: rich wraps log lines at 80 columns when stdout is not a terminal; keep paths on one line.
    env = {**cluster.env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CITYSEG_LOG_DIR": str(log_dir),
           "COLUMNS": "300",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix  # so slurm/env.sh does not activate another environment
    return env


def sbatch(cluster, log_dir: Path, options: list[str], script: str, args: list[str], env=None):
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.err",
           *options, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or job_env(cluster, log_dir), capture_output=True, text=True)


def job_log(log_dir: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob(f"*-{job_id}.*")))


def final_step(output_dir: Path) -> int:
    return json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def test_submit_dry_run_prints_quoted_command_and_submits_nothing(synth_data, tmp_path):
    # the preflight runs on this GPU-less machine for 2 nodes x 4 GPUs: fp16 and batch share judged for that job
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "4",
           "--time", "04:00:00", "--partition", "gpu", "--account", "my lab", "--dry-run",
           f"data.root={synth_data}", "train.mixed_precision=fp16", "train.max_steps=5", "tracking.wandb.tags=[a, b]"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()[0].split(" && ", 1)[1]
    assert shlex.split(printed) == [
        "sbatch", "--parsable", "--job-name=demo", "--nodes=2", "--gpus-per-node=4", "--time=04:00:00",
        "--partition=gpu", "--account=my lab", "slurm/train.sh", "--config", CONFIG,
        f"data.root={synth_data}", "train.mixed_precision=fp16", "train.max_steps=5", "tracking.wandb.tags=[a, b]"]
    assert "not submitted" in result.stdout


def test_submit_rejects_a_config_typo_before_the_queue():
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--dry-run", "train.max_stepz=5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.max_stepz" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "sbatch" not in result.stdout


def test_gpu_nodes_get_one_process_per_gpu(slurm_cluster, tmp_path):
    """The launch commands on 2 nodes x 4 (fake) GPUs, read from a stand-in `accelerate` that only prints them."""
    stub = tmp_path / "bin" / "accelerate"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "accelerate on $SLURMD_NODENAME gpus=$CUDA_VISIBLE_DEVICES: $*"\n')
    stub.chmod(0o755)
    env = {**job_env(slurm_cluster, tmp_path), "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    del env["ACCELERATE_USE_CPU"]
    train = sbatch(slurm_cluster, tmp_path, ["--nodes=2"], "slurm/train.sh", ["--config", CONFIG, "a=1"], env)
    evaluate = sbatch(slurm_cluster, tmp_path, [], "slurm/eval.sh", ["--config", CONFIG, "--checkpoint", "m"], env)
    for job_id in (train.stdout.strip(), evaluate.stdout.strip()):
        assert slurm_cluster.wait_job(job_id)["JobState"] == "COMPLETED", job_log(tmp_path, job_id)
    train_log, eval_log = (job_log(tmp_path, r.stdout.strip()) for r in (train, evaluate))
    launches = sorted(line for line in train_log.splitlines() if line.startswith("accelerate on"))
    assert len(launches) == 2, train_log
    for rank, line in enumerate(launches):
        assert line.startswith(f"accelerate on node{rank + 1} gpus=0,1,2,3: launch --machine_rank {rank} "
                               "--num_machines 2 --num_processes 8 --main_process_ip node1"), line
        assert line.endswith(f"--multi_gpu train.py --config {CONFIG} a=1"), line
    assert "gpus=0,1,2,3: launch --num_machines 1 --num_processes 4" in eval_log
    assert f"--multi_gpu -m cityseg evaluate --config {CONFIG} --checkpoint m" in eval_log


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, synth_data, tmp_path_factory):
    """`sbatch --wait --nodes=2 slurm/train.sh ...`: (sbatch result, job log, output_dir)."""
    log_dir = tmp_path_factory.mktemp("two_nodes")
    out = log_dir / "run"
    result = sbatch(slurm_cluster, log_dir, ["--wait", "--nodes=2"], "slurm/train.sh",
                    ["--config", CONFIG, *tiny(synth_data, out, max_steps=16)])
    return result, job_log(log_dir, result.stdout.strip().split(";")[0]), out


def test_two_nodes_train_one_run(two_node_run):
    result, log, out = two_node_run
    assert result.returncode == 0, log  # sbatch --wait returns the job's exit code
    assert "machine rank 0 of 2" in log and "machine rank 1 of 2" in log
    assert re.search(r"2 process\(es\)\s+on\s+cpu", log)  # world size 2: one gloo process per node
    assert len(list(out.rglob("metrics.jsonl"))) == 1
    assert final_step(out) == 16
    assert (out / "model.safetensors").is_file()


def test_eval_script_evaluates_saved_weights(slurm_cluster, synth_data, two_node_run, tmp_path):
    trained = two_node_run[2]
    report = tmp_path / "eval.json"
    result = sbatch(slurm_cluster, tmp_path, [], "slurm/eval.sh",
                    ["--config", CONFIG, "--checkpoint", str(trained / "model.safetensors"), "--json", str(report),
                     *tiny(synth_data, trained, max_steps=16)])
    info = slurm_cluster.wait_job(result.stdout.strip())
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, result.stdout.strip())
    assert 0.0 <= json.loads(report.read_text())["mIoU"] <= 1.0


def test_failed_training_is_not_requeued(slurm_cluster, synth_data, tmp_path):
    result = sbatch(slurm_cluster, tmp_path, ["--nodes=2"], "slurm/train.sh",
                    ["--config", CONFIG, *tiny(synth_data, tmp_path / "run", 8), "data.root=/nonexistent"])
    info = slurm_cluster.wait_job(result.stdout.strip())
    log = job_log(tmp_path, result.stdout.strip())
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "/nonexistent" in log and "requeueing" not in log


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, synth_data, two_node_run, tmp_path):
    # --time=1 with --signal=B:USR1@40: slurmctld checks time limits every 30 s, so the signal comes at its
    # first check after the start, 0-30 s in. The run must still be training then, on a fast machine too:
    # size it to 25 s of steps at the speed the two-node run measured (2 images x 2 processes per step),
    # ~40 s with the evaluation and checkpoint after every 16-step epoch.
    images_per_s = json.loads((two_node_run[2] / "train_log.jsonl").read_text().splitlines()[-1])["images_per_s"]
    out, max_steps = tmp_path / "run", max(100, round(25 * images_per_s / 4))
    print(f"time-limit run: {max_steps} steps ({images_per_s:.1f} images/s measured)")
    result = sbatch(slurm_cluster, tmp_path, ["--nodes=2", "--time=1", "--signal=B:USR1@40"], "slurm/train.sh",
                    ["--config", CONFIG, *tiny(synth_data, out, max_steps)])
    job_id = result.stdout.strip()
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 120
    while slurm_cluster.job(job_id)["Restarts"] == "0":
        assert slurm_cluster.job(job_id)["JobState"] in {"PENDING", "RUNNING", "COMPLETING"}, job_log(tmp_path, job_id)
        assert time.monotonic() < deadline, job_log(tmp_path, job_id)
        time.sleep(0.25)
    # The restarted job would get the same early signal; give it room to finish, as a longer limit would.
    slurm_cluster.scontrol("update", f"JobId={job_id}", "TimeLimit=10")
    info = slurm_cluster.wait_job(job_id)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "USR1 received" in log and f"requeueing job {job_id}" in log
    assert f"job {job_id} restart 1" in log  # SLURM_RESTART_COUNT=1 in the requeued run
    saved = re.search(r"preempted: checkpoint\s+(\S+)\s+written at step\s+(\d+)", log)
    assert saved and 0 < int(saved.group(2)) < max_steps, log
    assert re.search(rf"resume: from\s+{re.escape(saved.group(1))}", log)
    assert final_step(out) == max_steps  # where the uninterrupted run ends too
    assert not list(tmp_path.glob("requeue-*"))


def test_submit_helper_submits_a_job_that_runs(slurm_cluster, synth_data, tmp_path):
    cmd = [sys.executable, "launch/submit.py", "--config", CONFIG, "--nodes", "1", "--gpus-per-node", "0",
           "--time", "00:10:00", "--log-dir", str(tmp_path), *tiny(synth_data, tmp_path / "run", max_steps=2)]
    result = subprocess.run(cmd, cwd=REPO, env=job_env(slurm_cluster, tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert f"log: {tmp_path}/demo-{job_id}.out" in result.stdout
    info = slurm_cluster.wait_job(job_id)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job_id)
    assert final_step(tmp_path / "run") == 2
