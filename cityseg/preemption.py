"""Preemption: signals set a flag, ranks agree through a collective, the run checkpoints and asks to be requeued."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

EXIT_REQUEUE = 75  # "checkpointed, please requeue" (EX_TEMPFAIL); slurm/train.sh also reads CITYSEG_REQUEUE_FILE
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): checkpointed, stopped on purpose (the shell's 128 + SIGINT)
REQUEUE_FILE_ENV = "CITYSEG_REQUEUE_FILE"


class StopFlag:
    """Set by a signal handler in this process; `agreed` makes every rank see the same answer at the same step."""

    def __init__(self):
        self.received: str | None = None

    def install(self, signal_names: list[str]) -> None:
        for name in signal_names:
            try:
                signum = getattr(signal, name)
            except AttributeError:
                raise ValueError(f"train.preempt_signals: unknown signal {name!r}") from None
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name



def sum_across_ranks(accelerator, values: list) -> list[float]:
    """One small all-reduce carrying everything the ranks must agree on each step (stop flag, NaN, loss)."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=accelerator.device).reshape(())
                          for v in values])
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, reduction="sum")
    return packed.tolist()


def write_requeue_marker(checkpoint: Path) -> None:
    """Tell a batch script (which cannot see our exit code through `accelerate launch`) to requeue."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"{checkpoint}\n")
