"""Test helper: run train.py unchanged, but make a stop land at an exact place: a signal or a kill -9 at a step.

$CITYSEG_TEST_SIGNAL_STEP=N: this rank sends itself SIGUSR1 while it trains step N (the vote after step N stops
there; train.stop_vote_s=0 makes every vote synchronous). $CITYSEG_TEST_SIGNAL_SAVE=N: while it saves step N (the
stop lands on the next step). $CITYSEG_TEST_KILL_SAVE=N: SIGKILL right after the checkpoint of step N is sealed.
$CITYSEG_TEST_RANK (default 1) is the rank that does it; the others learn of a signal only through the vote.
$CITYSEG_TEST_DUMP_RESTORED=DIR: every rank writes its model's buffers, as the resume restored them before any
forward, to DIR/rank<RANK>.safetensors.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

import cityseg

try:  # the loop and where a run is set up (restore): cityseg/train/, or cityseg/engine.py in a tree from before
    import cityseg.train.loop as engine
    import cityseg.train.setup as builder
except ModuleNotFoundError:
    import cityseg.engine as engine
    builder = engine


def main() -> None:
    def at(name: str) -> int | None:
        value = os.environ.get(name)
        return int(value) if value and os.environ.get("RANK", "0") == os.environ.get("CITYSEG_TEST_RANK", "1") else None

    signal_step, signal_save, kill_save = at("CITYSEG_TEST_SIGNAL_STEP"), at("CITYSEG_TEST_SIGNAL_SAVE"), \
        at("CITYSEG_TEST_KILL_SAVE")
    real_step, real_save, real_restore = engine.train_step, engine.checkpoint.save, builder.restore
    dump = os.environ.get("CITYSEG_TEST_DUMP_RESTORED")

    def restore(run, *args, **kwargs):
        real_restore(run, *args, **kwargs)
        if dump:
            bare = engine.unwrap_for_eval(run.accelerator, run.model)
            Path(dump).mkdir(parents=True, exist_ok=True)
            save_file({name: tensor.detach().clone() for name, tensor in bare.named_buffers()},
                      str(Path(dump) / f"rank{run.accelerator.process_index}.safetensors"))

    def train_step(*args, **kwargs):
        if signal_step is not None and args[-1] + 1 == signal_step:  # args[-1]: the steps done before this one
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    def save(accelerator, output_dir, trainer_state, *args, **kwargs):
        if signal_save is not None and trainer_state["step"] == signal_save:
            os.kill(os.getpid(), signal.SIGUSR1)
        sealed = real_save(accelerator, output_dir, trainer_state, *args, **kwargs)
        if kill_save is not None and trainer_state["step"] == kill_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return sealed

    engine.train_step, engine.checkpoint.save, builder.restore = train_step, save, restore
    sys.argv = ["train.py", *sys.argv[1:]]
    # the train.py beside the cityseg package imported (PYTHONPATH may name an earlier tree of the code)
    runpy.run_path(str(Path(cityseg.__file__).resolve().parents[1] / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
