"""Read the records of an offline W&B run (its .wandb transaction log) with wandb's own protobuf schema."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")  # ident ':W&B', magic 0xBEE1, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type (leveldb log format)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    ident, magic, _ = FILE_HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B transaction log"
    records, pending, offset = [], b"", FILE_HEADER.size
    while offset + RECORD_HEADER.size <= len(data):
        if BLOCK - offset % BLOCK < RECORD_HEADER.size:  # block trailer padding
            offset += BLOCK - offset % BLOCK
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, offset)
        chunk = data[offset + RECORD_HEADER.size: offset + RECORD_HEADER.size + length]
        offset += RECORD_HEADER.size + length
        if kind == 0 and length == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: checksum mismatch at {offset}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(records: list) -> list[dict]:
    """One dict per logged W&B step: {'_step': ..., 'val/mIoU': ..., 'val/samples/all_masks': [...], ...}."""
    return [{_key(item): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def summary(records: list) -> dict:
    merged = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            merged.update({_key(item): json.loads(item.value_json) for item in r.summary.update})
    return merged


def config(records: list) -> dict:
    """The run's config as W&B received it (the run record's config, then later updates)."""
    merged = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        merged.update({_key(item): json.loads(item.value_json) for item in updates})
    return merged


def run_id(records: list) -> str:
    return next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
