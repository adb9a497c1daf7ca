"""`cityseg bench`'s stop vote at 2 gloo ranks: host time per step of the synchronous vote vs the asynchronous one."""
from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import time

from cityseg.distributed.stop_vote import CALIBRATION_STEPS, StopVote


def spin(seconds: float) -> None:
    """A step's host work: busy, as a Python loop launching kernels is (a sleep would lend the vote idle time)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _vote_child(rank, world, port, step_s, steps, repeats, interval_s, results):
    os.environ.update(ACCELERATE_USE_CPU="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate import PartialState

    state = PartialState(cpu=True)  # the default gloo group; each StopVote makes its own, as in training
    votes = {"sync": StopVote(state, 5.0, interval_s=0.0), "async": StopVote(state, 5.0, interval_s)}

    def seconds_in_vote(vote) -> float:
        """Mean time a step spends inside the vote: what it adds to the step's critical path."""
        inside = 0.0
        for _ in range(steps):
            spin(step_s)
            start = time.perf_counter()
            vote.any(False)
            inside += time.perf_counter() - start
        return inside / steps

    for vote in votes.values():  # warm-up; the asynchronous vote agrees on k from these steps
        for _ in range(CALIBRATION_STEPS + 1):
            spin(step_s)
            vote.any(False)
    samples = {name: [] for name in votes}
    for repeat in range(repeats):  # both ranks run the same calls in the same order
        for name in (list(votes) if repeat % 2 == 0 else list(reversed(votes))):
            samples[name].append(seconds_in_vote(votes[name]))
    if rank == 0:
        results.put({name: statistics.median(values) for name, values in samples.items()}
                    | {"k": votes["async"].k, "samples": samples})
    state.destroy_process_group()


def start_votes(step_s: float, steps: int, repeats: int, interval_s: float):
    """Start _vote_child in 2 fresh processes; bench.collect_steps reads rank 0's timings."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    children = [context.Process(target=_vote_child, args=(rank, 2, port, step_s, steps, repeats, interval_s, results))
                for rank in range(2)]
    for child in children:
        child.start()
    return children, results


def vote_report(timed: dict, step_s: float, interval_s: float) -> dict:
    """Host time per step inside each vote (2 ranks, the same busy host step between votes)."""
    sync_us, async_us = 1e6 * timed["sync"], 1e6 * timed["async"]
    return {"sync_us_per_step": sync_us, "async_us_per_step": async_us, "sync_vs_async": sync_us / async_us,
            "k": timed["k"], "interval_s": interval_s, "step_ms": 1e3 * step_s, "samples_s": timed["samples"],
            "note": "2 gloo ranks, a busy host step of step_ms between votes; time inside StopVote.any per step; "
                    "sync: an all-reduce every step; async: one read and one launch every k steps"}
