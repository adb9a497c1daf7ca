"""One SLURM cluster of network-namespace hosts (netcluster.sh) per test session, shared by every cluster test.
Its plain helpers (Cluster, job_log, tiny, ...) are in tests/helpers/cluster.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers.cluster import (
    HOSTS,
    Cluster,
    environ_of,
    install_reason,
    job_log,
    tcp_peers,
    tiny,
    unavailable,
)


@pytest.fixture(scope="session")
def netcluster():
    if os.geteuid() != 0:
        unavailable("network namespaces and slurmd need root")
    reason = install_reason()
    if reason:
        unavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="cityseg-netcluster-"))
    cluster = Cluster(root, prefix=f"ct{os.getpid() % 100000}")
    try:
        cluster.script("up", str(len(HOSTS)), str(root))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        cluster.script("down", str(root))
        unavailable(f"netcluster.sh up failed: {err}")
    try:
        yield cluster
    finally:
        cluster.script("down", str(root))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(netcluster):
    """The shared cluster, put back in order after the test (jobs cancelled, hosts back and idle)."""
    yield netcluster
    netcluster.restore()


@pytest.fixture(scope="session")
def cluster_data(tmp_path_factory) -> Path:
    """32 train / 4 val images of 32x64: 8 steps per epoch at 2 images x 2 ranks."""
    from cityseg.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("cluster_data")
    write_synthetic(root, n_train=32, n_val=4, height=32, width=64, seed=0)
    return root


@pytest.fixture(scope="session")
def reference_run(netcluster, cluster_data, tmp_path_factory) -> dict:
    """An uninterrupted 2-host run: the weights every interrupted run must end with, and what each host saw
    while it trained (its ranks, their interface setting, its TCP connections): {out, log, evidence}."""
    log_dir = tmp_path_factory.mktemp("reference")
    out = log_dir / "run"
    job_id = netcluster.sbatch(log_dir, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh",
                               tiny(cluster_data, out))
    netcluster.wait_step(log_dir, job_id, 2)
    evidence = {}
    for short in HOSTS:
        ranks = netcluster.rank_pids(short)
        evidence[short] = {"ranks": sorted(ranks),
                           "ifname": {r: environ_of(p).get("GLOO_SOCKET_IFNAME") for r, p in ranks.items()},
                           "tcp": set().union(*(tcp_peers(p) for p in ranks.values()))}
    info = netcluster.wait_job(job_id, log_dir)
    log = job_log(log_dir, job_id)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    return {"out": out, "log": log, "evidence": evidence, "job": job_id}
