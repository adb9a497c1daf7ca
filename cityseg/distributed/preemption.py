"""Preemption: signals set a flag, ranks agree through a collective, the run checkpoints and asks to be requeued."""
from __future__ import annotations

import os
import signal
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cityseg.config.schema import ConfigError

EXIT_REQUEUE = 75  # "checkpointed, please requeue" (EX_TEMPFAIL); slurm/train.sh also reads CITYSEG_REQUEUE_FILE
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): checkpointed, stopped on purpose (the shell's 128 + SIGINT)
REQUEUE_FILE_ENV = "CITYSEG_REQUEUE_FILE"
STEP_FILE_ENV = "CITYSEG_STEP_FILE"
SECOND_CTRL_C_AFTER_S = 2.0  # a second SIGINT sooner than this is the launcher forwarding the first one


class StopFlag:
    """Set by a signal handler in this process; StopVote makes every rank see it at the same step."""

    def __init__(self):
        self.received: str | None = None
        self.owner = os.getpid()
        self.first_sigint = 0.0
        self.previous: dict[signal.Signals, object] = {}  # the handlers install() replaced

    def install(self, signal_names: list[str]) -> None:
        """Handle the preemption signals and Ctrl-C: finish the step, checkpoint, exit. A second Ctrl-C aborts."""
        for name in {*signal_names, "SIGINT"}:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals) or signum in (signal.SIGKILL, signal.SIGSTOP):
                raise ConfigError(f"train.preempt_signals: {name!r} is not a signal a process can catch "
                                  "(e.g. SIGUSR1, SIGTERM)")
            self.previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers install() replaced: an in-process caller (a notebook, the tests) keeps its own."""
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        # DataLoader workers are forked after install and inherit this handler: there it does nothing, so a
        # signal sent to every process of the job (scancel --signal) neither kills a worker nor reaches the loop
        if os.getpid() != self.owner:
            return
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            # a terminal's Ctrl-C reaches a worker twice: from the terminal and forwarded by the launcher
            if time.monotonic() - self.first_sigint > SECOND_CTRL_C_AFTER_S:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt  # impatient second Ctrl-C: stop now, the last checkpoint stays
            return
        if name == "SIGINT":
            self.first_sigint = time.monotonic()
        self.received = name


def _ignore(signum, frame) -> None:
    pass


def shield_worker(signal_names: list[str]) -> None:
    """In a DataLoader worker (its init function): torch installs a C handler there that lets SIGTERM kill the
    worker, and with it the run, when `scancel --signal` signals every process of the job. The main process
    decides; workers stop when it tells them."""
    for name in {*signal_names, "SIGINT"}:
        signal.signal(getattr(signal, name), _ignore)


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
        except RuntimeError as err:
            raise RuntimeError(f"stop vote: waited {self.timeout.total_seconds() / 60:g} min (dist.timeout_minutes) "
                               f"for the other ranks' answer to {what}; a rank is stuck or gone "
                               f"({str(err).splitlines()[0][:200]})") from None
        return flag


def write_requeue_marker(checkpoint: Path) -> None:
    """Tell a batch script (which cannot see our exit code through `accelerate launch`) to requeue."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if marker:
        marker = Path(marker)
        marker.parent.mkdir(parents=True, exist_ok=True)
        staging = marker.with_name(f".{marker.name}.tmp")
        staging.write_text(f"{checkpoint}\n")
        staging.replace(marker)  # appears whole: the script may read the checkpoint path from it


def mark_step(step: int) -> None:
    """Write the number of the last finished step to $CITYSEG_STEP_FILE (main process, every step): slurm/train.sh
    restarts only an attempt that got past its first step, and tests send signals when step k is reached."""
    path = os.environ.get(STEP_FILE_ENV)
    if path:
        staging = f"{path}.tmp"
        with open(staging, "w") as out:
            out.write(f"{step}\n")
        os.replace(staging, path)  # whole or absent: a reader never sees a half-written number
