"""Read back an offline W&B run: the records of its `run-<id>.wandb` file (W&B's LevelDB-style log: a
7-byte header, then 32 KiB blocks of chunks, each `crc32c:4 length:2 type:1` + data, a record split over
FIRST / MIDDLE / LAST chunks), decoded with W&B's own protobuf `Record`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, part = HEADER, [], b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        part = chunk if kind in (FULL, FIRST) else part + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def summary(path: Path) -> dict:
    """The run summary's top-level values (the last update of each key)."""
    found = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                if u.key:
                    found[u.key] = json.loads(u.value_json)
    return found
