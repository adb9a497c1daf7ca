"""The run's JSONL logs (train_log.jsonl, metrics.jsonl, config_changes.jsonl): one record per line."""
from __future__ import annotations

import json
from pathlib import Path

TRAIN_LOG = "train_log.jsonl"  # one record per logged training step
METRICS_LOG = "metrics.jsonl"  # one record per validation
CONFIG_CHANGES = "config_changes.jsonl"  # one record per resume that changed allowed keys: config.yaml's history


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def drop_records_after(path: Path, step: int) -> None:
    """Remove records past `step` (and a line torn by a kill): a resumed run writes them again from there."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(f"{line}\n" for line in kept))
    staging.replace(path)
