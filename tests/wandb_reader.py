"""Read an offline wandb run back: the `run-<id>.wandb` transaction log and its media files.

The log is a sequence of 32 KiB blocks after a 7-byte header (":W&B", a 2-byte magic, a version byte); each block
holds records of [crc32 (4 bytes) | length (2, little endian) | type (1: full, 2: first, 3: middle, 4: last)]
followed by that many bytes of a serialized `wandb_internal_pb2.Record` (the LevelDB log layout wandb uses).
wandb 0.31 ships no reader for it, so tests use this one; it reads only what the tests check.
"""

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos - HEADER) % BLOCK
        if block_left < 7:  # the block's tail is padding
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: Path) -> dict:
    """{"history": {step: {key: value}}, "images": [paths], "config": {...}} of one offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    for payload in _payloads(log.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                items[key] = json.loads(item.value_json) if item.value_json else None
            step = int(items.get("_step", record.history.step.num))
            history.setdefault(step, {}).update(items)
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    images = sorted(str(p) for p in (Path(run_dir) / "files" / "media" / "images").rglob("*.png"))
    return dict(history=history, images=images, config=config)


def offline_runs(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "wandb").glob("offline-run-*"))
