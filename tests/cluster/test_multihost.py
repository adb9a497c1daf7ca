"""Training across two hosts with their own network stacks: ranks, interfaces, connections, scripts, eval."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers.cluster import REPO, final_step, job_log, tiny

pytestmark = pytest.mark.slow  # every test here runs jobs on the namespace cluster


def test_rank_1_trains_on_another_host_over_the_cluster_network(reference_run, netcluster):
    evidence, log = reference_run["evidence"], reference_run["log"]
    assert evidence["h1"]["ranks"] == [0] and evidence["h2"]["ranks"] == [1], evidence
    # each rank chose the interface that routes to rank 0's host, not the default route's (mgmt0) or loopback
    assert evidence["h1"]["ifname"] == {0: "eth0"} and evidence["h2"]["ifname"] == {1: "eth0"}, evidence
    # rank 1 (10.77.0.12) talks to rank 0's host (10.77.0.11) and to nothing on loopback or the management net
    peers = evidence["h2"]["tcp"]
    assert ("10.77.0.12", "10.77.0.11") in peers, peers
    assert not [p for p in peers if p[1].startswith(("127.", "10.78."))], peers
    assert f"rank 1 of 2 on {netcluster.host('h2')}, interface eth0" in log
    assert final_step(reference_run["out"]) == 12 and (reference_run["out"] / "model.safetensors").is_file()


def test_interface_choice_ignores_default_route_and_honours_override(netcluster):
    def netif(host: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{netcluster.host(host)}", sys.executable, "-m",
                               "cityseg.distributed.netif", netcluster.host("h1")], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env={**os.environ, **env})
    routes = subprocess.run(["ip", "-n", netcluster.host("h2"), "route"], capture_output=True, text=True,
                            timeout=30).stdout
    assert "default via 10.78.0.1 dev mgmt0" in routes  # the trap: the default route is the management net
    assert netif("h2").stdout.strip() == "eth0" and netif("h1").stdout.strip() == "eth0"
    assert netif("h2", CITYSEG_SOCKET_IFNAME="mgmt0").stdout.strip() == "mgmt0"
    bad = netif("h2", CITYSEG_SOCKET_IFNAME="ib9")
    assert bad.returncode == 2 and "CITYSEG_SOCKET_IFNAME=ib9" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_gpu_nodes_get_one_srun_task_per_gpu_with_ranks_from_slurm(cluster, tmp_path):
    """2 nodes x 4 (fake) GPUs as train.sh's header asks: 8 tasks, read from a stand-in `python` that prints
    what each process would train with (the interface choice still runs the real cityseg.distributed.netif)."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\nif [[ $1 == -m ]]; then exec {sys.executable} "$@"; fi\n'
                    'echo "task host=$SLURMD_NODENAME rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE '
                    'master=$MASTER_ADDR:$MASTER_PORT gloo=$GLOO_SOCKET_IFNAME nccl=$NCCL_SOCKET_IFNAME '
                    'gpus=$CUDA_VISIBLE_DEVICES args=$*"\n')
    stub.chmod(0o755)
    env = cluster.job_env(tmp_path, PATH=f"{stub.parent}{os.pathsep}{cluster.job_env(tmp_path)['PATH']}")
    del env["ACCELERATE_USE_CPU"]
    job = cluster.sbatch(tmp_path, ["--nodes=2"], "slurm/train.sh", ["--config", "configs/demo.yaml", "a=1"], env=env)
    info = cluster.wait_job(job, tmp_path, timeout=120)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    tasks = sorted(line for line in log.splitlines() if line.startswith("task "))
    assert len(tasks) == 8, log
    port = re.search(r"master=\S+:(\d+)", tasks[0]).group(1)
    for line in tasks:
        rank = int(re.search(r"rank=(\d+)", line).group(1))
        host = cluster.host("h1" if rank < 4 else "h2")
        assert line == (f"task host={host} rank={rank} local={rank % 4} world=8 master={cluster.host('h1')}:{port} "
                        f"gloo=eth0 nccl=eth0 gpus=0,1,2,3 args=train.py --config configs/demo.yaml a=1"), line


def test_a_fresh_checkout_logs_to_logs_dir(cluster, tmp_path):
    """sbatch slurm/train.sh from a checkout without logs/ written by hand: the #SBATCH --output path exists.
    A typo in the config fails before the first step: one line, no retry."""
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True, timeout=60).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    env = cluster.job_env(tmp_path)
    del env["CITYSEG_LOG_DIR"]
    job = cluster.sbatch(tmp_path, [], "slurm/train.sh", ["--config", "configs/demo.yaml", "train.max_stepz=1"],
                         env=env, cwd=checkout, logs=False)
    info = cluster.wait_job(job, checkout / "logs", timeout=120)
    out, err = (checkout / "logs" / f"cityseg-{job}.{ext}" for ext in ("out", "err"))
    assert out.is_file() and err.is_file(), list((checkout / "logs").iterdir())
    log = out.read_text() + err.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "train.max_stepz" in log and "not retried" in log and log.count("rank 0 of") == 1, log


def test_eval_script_reproduces_the_runs_validation_miou(cluster, cluster_data, reference_run, tmp_path):
    out = reference_run["out"]
    report = tmp_path / "eval.json"
    job = cluster.sbatch(tmp_path, [], "slurm/eval.sh",
                         ["--checkpoint", str(out / "model.safetensors"), "--json", str(report),
                          *tiny(cluster_data, out)])
    info = cluster.wait_job(job, tmp_path, timeout=120)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 12
    assert abs(json.loads(report.read_text())["mIoU"] - logged["mIoU"]) < 1e-6, (report.read_text(), logged)


def test_importing_cityseg_keeps_albumentations_off_the_network(netcluster):
    """albumentations asks PyPI for its version at import unless NO_ALBUMENTATIONS_UPDATE is set; `import cityseg`
    sets it. Run with the variable unset, on the controller host (no route out), and any attempt is blocked by an
    audit hook before a socket is made."""
    code = ("import sys\n"
            "def hook(event, args):\n"
            "    if event.startswith(('urllib.Request', 'socket.getaddrinfo', 'socket.connect')):\n"
            "        print('NETWORK', event, flush=True)\n"
            "        raise RuntimeError('blocked by the test')\n"
            "sys.addaudithook(hook)\n"
            "import cityseg.data.transforms\n"
            "print('imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(["nsenter", f"--net=/run/netns/{netcluster.host('ctl')}", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert "imported" in result.stdout and "NETWORK" not in result.stdout, result.stdout + result.stderr
