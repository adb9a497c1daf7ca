"""Read TensorBoard event files back: their records, the scalars per tag and step (a resumed writer's purge
honoured), and the text summaries."""
from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event


def read_events(path: Path) -> list[Event]:
    """Records of a TensorBoard event file: u64 length, u32 crc, the Event protobuf, u32 crc."""
    events, data = [], path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        events.append(Event.FromString(data[offset + 12: offset + 12 + length]))
        offset += 12 + length + 4
    return events


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file, honouring a resumed writer's purge (SessionLog START)."""
    found = defaultdict(dict)
    for path in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for values in found.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found[value.tag][event.step] = value.simple_value
    return found


def texts(log_dir: Path) -> list[str]:
    return [value.tensor.string_val[0].decode() for path in log_dir.rglob("events.out.tfevents.*")
            for event in read_events(path) for value in event.summary.value if value.HasField("tensor")]
