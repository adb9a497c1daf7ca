"""Test helper run under `accelerate launch`: rank 1 stalls, rank 0 waits in a collective until dist.timeout_minutes.

Rank 0 prints the collective's error and exits 3; with the timeout not applied it would wait for the stalled rank.
"""
from __future__ import annotations

import sys
import time

import torch

from cityseg.config import load_config
from cityseg.runtime import make_accelerator


def main() -> int:
    cfg = load_config(None, sys.argv[1:])
    accelerator = make_accelerator(cfg)
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
