"""Test helper run under torchrun / accelerate launch (or python): what each rank's training loader yields, as JSON.

It builds the loader exactly as cityseg.train.setup.setup does (make_accelerator, set_seed, train_stream, set_epoch) and writes <out>/rank<R>.json with, per batch size and epoch, the sample indices in the order this rank
saw them and a checksum of each augmented image; plus one random draw per loader worker (per-rank worker seeding).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset, get_worker_info

from cityseg.config.load import load_config
from cityseg.data.loaders import train_dataset, train_stream
from cityseg.distributed.runtime import make_accelerator


class WorkerDraws(Dataset):
    """Each sample is one numpy and one python random draw made inside a loader worker, and that worker's id."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index):
        draws = torch.tensor([np.random.random(), random.random()], dtype=torch.float64)
        return draws, torch.tensor(get_worker_info().id), index


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    rank = accelerator.process_index
    record = {"rank": rank, "world": accelerator.num_processes, "orders": {}, "checksums": {}}

    dataset = train_dataset(cfg.data, cfg.seed)
    first_batch_size = cfg.data.batch_size
    for batch_size in (first_batch_size, first_batch_size - 1):  # the second leaves a remainder
        cfg.data.batch_size = batch_size
        loader = train_stream(cfg.data, dataset, accelerator, seed=cfg.seed, epochs=cfg.train.epochs,
                              preempt_signals=cfg.train.preempt_signals)
        orders = []
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            order = []
            for images, _, indices in loader:
                order += indices.tolist()
                for image, index in zip(images, indices.tolist() if batch_size == first_batch_size else []):
                    ramp = torch.linspace(0, 1, image.shape[-1], dtype=torch.float64)  # a flip changes the sum
                    record["checksums"][f"{epoch}/{index}"] = float((image.double() * ramp).sum())
            orders.append(order)
        record["orders"][str(batch_size)] = orders

    cfg.data.num_workers, cfg.data.batch_size = 2, 4
    draws = {}
    for values, worker_ids, _ in train_stream(cfg.data, WorkerDraws(), accelerator, seed=cfg.seed,
                                                  epochs=cfg.train.epochs, preempt_signals=cfg.train.preempt_signals):
        for row, worker in zip(values.tolist(), worker_ids.tolist()):
            draws.setdefault(str(worker), row)
    record["worker_draws"] = draws

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
