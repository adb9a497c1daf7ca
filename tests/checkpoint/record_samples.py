"""Test helper: run train.py unchanged (also under accelerate launch), recording which training samples it loads.

Each rank appends "<epoch> <index>" to $CITYSEG_RECORD_SAMPLES/rank<RANK>.txt for every sample its training
dataset loads, in order (data.num_workers=0: loaded in the training process itself). Validation samples are not
recorded. The training runs exactly as `python train.py ...` would: this only observes the dataset.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import cityseg.train.setup
from cityseg.data.cityscapes import CityscapesPairs

RECORD_ENV = "CITYSEG_RECORD_SAMPLES"


def main() -> None:
    out = Path(os.environ[RECORD_ENV])
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"rank{os.environ.get('RANK', '0')}.txt", "a")  # noqa: SIM115 - open for the whole run
    real_dataset, real_getitem = cityseg.train.setup.train_dataset, CityscapesPairs.__getitem__

    def train_dataset(*args, **kwargs):
        dataset = real_dataset(*args, **kwargs)
        dataset.record_samples = True
        return dataset

    def getitem(self, key):
        if getattr(self, "record_samples", False):
            epoch, index = self.epoch_and_index(key)  # the training stream's samples carry their epoch
            log.write(f"{epoch} {index}\n")
            log.flush()
        return real_getitem(self, key)

    cityseg.train.setup.train_dataset, CityscapesPairs.__getitem__ = train_dataset, getitem
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
