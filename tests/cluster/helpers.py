"""Assertions shared by the cluster tests: weights equal to the reference run, steps named in the job log."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_weights(out: Path, reference: Path) -> None:
    """Bit-exact: every tensor of model.safetensors equals the uninterrupted run's."""
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def final_step(out: Path) -> int:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def preempted_step(log: str) -> tuple[str, int]:
    saved = re.search(r"preempted: checkpoint\s+(\S+)\s+written at step\s+(\d+)", log)
    assert saved, log[-4000:]
    return saved.group(1), int(saved.group(2))
