"""Stop signals: a flag set by the handler, DataLoader workers shielded from them, the exit codes of a stop."""
from __future__ import annotations

import os
import signal
import time

from cityseg.config.schema import ConfigError

EXIT_REQUEUE = 75  # "checkpointed, please requeue" (EX_TEMPFAIL); slurm/train.sh also reads CITYSEG_REQUEUE_FILE
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): checkpointed, stopped on purpose (the shell's 128 + SIGINT)
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
