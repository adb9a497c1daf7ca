"""A rank that never answers the stop vote: the others give up after dist.timeout_minutes with the error the
command reports in one line as a failed collective (real gloo, 2 processes)."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cityseg.cli import _is_collective_failure
from cityseg.distributed.stop_vote import StopVote

TIMEOUT_MINUTES = 0.05  # 3 s


def vote_alone(rank: int, store_path: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    vote = StopVote(SimpleNamespace(num_processes=2), TIMEOUT_MINUTES, interval_s=0)
    if rank == 1:  # stuck: never votes, stays alive past the other's limit
        time.sleep(4 * TIMEOUT_MINUTES * 60)
        results.put(("stuck", None, None))
        return
    started = time.monotonic()
    try:
        vote.any(False)
        results.put(("answered", None, time.monotonic() - started))
    except Exception as err:  # noqa: BLE001 - the test looks at what was raised
        results.put((type(err).__name__, (str(err), _is_collective_failure(err), isinstance(err, RuntimeError)),
                     time.monotonic() - started))


@pytest.mark.slow
def test_a_rank_silent_at_the_vote_fails_the_others_as_a_collective_within_the_timeout(tmp_path):
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=vote_alone, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode is not None, "a vote process did not end within 120 s"
    outcomes = [results.get(timeout=10) for _ in procs]
    failed = [outcome for outcome in outcomes if outcome[0] not in ("stuck",)]
    assert len(failed) == 1, outcomes
    kind, details, seconds = failed[0]
    assert kind != "answered", outcomes
    message, reported_as_collective, is_runtime_error = details
    assert "stop vote: waited 0.05 min (dist.timeout_minutes)" in message
    assert reported_as_collective and is_runtime_error  # cli: "[rank 0] error: a collective failed: ..."
    assert seconds < TIMEOUT_MINUTES * 60 + 10
