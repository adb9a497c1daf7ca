"""Goodput of slurm/train.sh on the namespace cluster: one 2-host run, a fault every ~FAULT_EVERY_S seconds
(host loss, rank crash, preemption, in turn). Prints and writes JSON: the fraction of wall time spent on steps
that count, and the time from each fault to the first new step. Needs root (as tests/cluster).

    .venv/bin/python -m tests.cluster.goodput [--faults 3] [--every 120] [--json docs/goodput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.helpers.cluster import HOSTS, Cluster, job_log, tiny

FAULTS = ["host loss", "rank crash", "preemption"]


class Progress:
    """(time, step) each time the run's step file changes; follows in-job restarts and requeues."""

    def __init__(self, log_dir: Path, job: str):
        self.log_dir, self.job, self.seen = log_dir, job, []

    def current(self) -> int | None:
        files = sorted(self.log_dir.glob(f".cityseg-{self.job}-*.step"), key=lambda p: p.stat().st_mtime)
        try:
            return int(files[-1].read_text()) if files else None
        except (OSError, ValueError):
            return None

    def poll(self) -> None:
        step = self.current()
        if step is None:  # train.sh removed it: an attempt ended (restart or requeue); None marks the gap
            if self.seen and self.seen[-1][1] is not None:
                self.seen.append((time.monotonic(), None))
        elif not self.seen or self.seen[-1][1] != step:
            self.seen.append((time.monotonic(), step))


def inject(cluster: Cluster, kind: str, job: str) -> None:
    if kind == "host loss":  # power cycle of h2: everything there dies; slurmd back 3 s later
        cluster.script("kill-host", "h2", str(cluster.root))
        time.sleep(3)
        cluster.script("start-slurmd", "h2", str(cluster.root))
    elif kind == "rank crash":
        pid = cluster.rank_pids("h2").get(1)
        if pid:
            os.kill(pid, signal.SIGKILL)
    else:  # preemption as the batch script sees it
        cluster.client("scancel", "--signal=TERM", "--full", job)


def measure(cluster: Cluster, data: Path, work: Path, faults: int, every: float, max_steps: int) -> dict:
    out = work / "run"
    env = cluster.job_env(work, CITYSEG_MAX_RESTARTS=str(faults))
    job = cluster.sbatch(work, ["--nodes=2", "--ntasks-per-node=1"], "slurm/train.sh",
                         tiny(data, out, max_steps=max_steps, checkpoint__every_steps=10, train__eval_every_epochs=1000), env=env)
    progress, start, events = Progress(work, job), time.monotonic(), []
    next_fault, done = start + every, False
    while not done:
        progress.poll()
        now = time.monotonic()
        if len(events) < faults and now >= next_fault and progress.seen:
            kind = FAULTS[len(events) % len(FAULTS)]
            events.append({"kind": kind, "at": now, "step": progress.current()})
            inject(cluster, kind, job)
            next_fault = now + every
        done = cluster.job(job)["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"}
        if now - start > 3600:
            raise TimeoutError(f"job {job} not done after an hour:\n{job_log(work, job)[-3000:]}")
        time.sleep(0.2)
    wall = time.monotonic() - start
    info = cluster.job(job)
    if info["JobState"] != "COMPLETED":
        raise RuntimeError(f"job {job} {info['JobState']}:\n{job_log(work, job)[-3000:]}")
    # a step's time in steady training: steps over seconds between observations of one attempt that ran on
    # (the step number grew by a few); windows with a fault, restart, evaluation or save left out by the median
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(progress.seen, progress.seen[1:])
             if a[1] is not None and b[1] is not None and 0 < b[1] - a[1] <= 10 and b[0] > a[0]]
    step_s = 1.0 / statistics.median(rates)
    for event in events:  # first step of the next attempt: after the step file was gone, it appears again
        gap = next((t for t, s in progress.seen if t >= event["at"] and s is None), None)
        first_new = next((t for t, s in progress.seen if gap is not None and t > gap and s is not None), None)
        event["to_first_new_step_s"] = round(first_new - event["at"], 1) if first_new else None
        event["first_new_step"] = next((s for t, s in progress.seen if t == first_new), None)
        event.pop("at")
    return {"job": job, "max_steps": max_steps, "wall_s": round(wall, 1), "median_step_s": round(step_s, 3),
            "goodput": round(max_steps * step_s / wall, 3), "faults": events, "restarts": info["Restarts"],
            "note": "goodput = steps of the final run x median step time / wall time from submission to the end "
                    "(startup, evaluation and checkpoint time count as lost)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=3)
    parser.add_argument("--every", type=float, default=120.0, help="seconds between faults")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from cityseg.data.synthetic import write_synthetic

    work = Path(tempfile.mkdtemp(prefix="cityseg-goodput-"))
    work.chmod(0o755)  # munged (user munge) must reach its socket below
    write_synthetic(work / "data", n_train=32, n_val=4, height=32, width=64, seed=0)
    cluster = Cluster(work / "cluster", prefix=f"gp{os.getpid() % 100000}")
    cluster.script("up", str(len(HOSTS)), str(cluster.root))
    try:
        report = measure(cluster, work / "data", work, args.faults, args.every, args.max_steps)
    finally:
        cluster.script("down", str(cluster.root))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
