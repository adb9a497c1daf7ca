"""The stop vote: every rank learns at the same step whether any rank received a stop signal."""
from __future__ import annotations

import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

CALIBRATION_STEPS = 6  # synchronous votes at a run's start; their step times set the asynchronous cadence


class StopVote:
    """Whether any rank has received a stop signal, agreed over a CPU (gloo) group of its own: a host-side
    collective of one number, so a GPU run neither copies a flag to the device nor waits for the device to read it.

    The first CALIBRATION_STEPS steps vote synchronously (an all-reduce per step) and time the steps; the last of
    those votes also agrees on k, the steps in about `interval_s` (the largest of the ranks' proposals, so the same
    k everywhere). From then on every k-th step reads the asynchronous all-reduce launched k steps before and
    launches the next one: the steps between wait for nothing, every rank reads the same vote at the same step and
    all stop there, at most 2k steps (about 2 x interval_s) after the signal. interval_s 0: every step synchronous."""

    def __init__(self, accelerator, timeout_minutes: float, interval_s: float = 1.0, say=None):
        self.world, self.interval_s, self.say = accelerator.num_processes, interval_s, say
        self.timeout = timedelta(minutes=timeout_minutes)
        self.calls, self.k, self.pending, self.times = 0, None, None, []
        self.group = dist.new_group(backend="gloo", timeout=self.timeout) if self.world > 1 else None

    def any(self, requested: bool) -> bool:
        """Called once per optimizer step on every rank; True on all ranks at the same step."""
        if self.world == 1:
            return requested
        self.calls += 1
        if self.k is None:
            return self.calibrating(requested)
        if self.calls % self.k:
            return False  # between votes: nothing to wait for
        what = f"the stop vote launched {self.k} steps before this pass's step {self.calls}"
        stop = self.pending is not None and bool(self.wait(self.pending, what)[0])
        self.pending = None if stop else self.launch(requested)
        return stop

    def calibrating(self, requested: bool) -> bool:
        self.times.append(time.perf_counter())
        deciding = self.interval_s > 0 and self.calls == CALIBRATION_STEPS
        proposal = 0
        if deciding:
            step_s = statistics.median(later - earlier for earlier, later in zip(self.times, self.times[1:]))
            proposal = max(1, round(self.interval_s / step_s)) if step_s > 0 else 1
        flag = self.wait(self.launch(requested, proposal), f"the stop vote of this pass's step {self.calls}")
        if deciding:
            self.k, self.calls = int(flag[1]), 0  # counted from here: the votes fall on the same calls everywhere
            if self.say:
                self.say(f"stop vote: asynchronous, read every {self.k} steps (about {self.interval_s:g} s at this "
                         "run's step time; train.stop_vote_s)")
        return bool(flag[0])

    def launch(self, requested: bool, proposal: int = 0):
        flag = torch.tensor([1 if requested else 0, proposal], dtype=torch.int64)  # CPU: no device involved
        return flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def wait(self, pending, what: str) -> torch.Tensor:
        """The reduced [stop flag, k proposal] of a launched vote, waited for at most dist.timeout_minutes."""
        flag, work = pending
        try:
            work.wait(self.timeout)
        except RuntimeError as err:  # a DistError: the command reports it as the collective failure it is
            raise dist.DistError(f"stop vote: waited {self.timeout.total_seconds() / 60:g} min (dist.timeout_minutes) "
                               f"for the other ranks' answer to {what}; a rank is stuck or gone "
                               f"({str(err).splitlines()[0][:200]})") from None
        return flag
