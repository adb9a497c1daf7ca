"""Test helper run under `accelerate launch`: rank 1 stalls, rank 0 waits in a collective until dist.timeout_minutes.

usage: stall_rank.py READY_DIR <config overrides>. Rank 0 prints the collective's error and exits 3; with the
timeout not applied it would wait for the stalled rank. The ranks first meet at a file barrier in READY_DIR (its own,
generous limit), so that the short collective timeout, which also bounds gloo's connection setup, is not spent
waiting for a rank that is slow to start on a loaded machine.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from cityseg.config.load import load_config
from cityseg.distributed.runtime import make_accelerator

START_LIMIT_S = 300


def wait_for_all_ranks(ready_dir: Path, rank: int, world: int) -> None:
    ready_dir.mkdir(parents=True, exist_ok=True)
    (ready_dir / f"rank{rank}").touch()
    deadline = time.monotonic() + START_LIMIT_S
    while len(list(ready_dir.glob("rank*"))) < world:
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: the other ranks did not start within {START_LIMIT_S} s ({ready_dir})")
        time.sleep(0.01)


def main() -> int:
    ready_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(None, overrides)
    wait_for_all_ranks(ready_dir, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    accelerator = make_accelerator(cfg)  # gloo connects now: both ranks are here, well within the timeout
    if accelerator.process_index == 1:
        time.sleep(120)  # far past the timeout; the launcher ends this process once rank 0 has failed
        return 0
    try:
        accelerator.reduce(torch.ones(1), reduction="sum")
    except Exception as err:  # noqa: BLE001 - whatever the backend raises on a timeout is what we report
        print(f"collective failed: {err}".splitlines()[0], flush=True)
        return 3
    print("collective completed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
