"""Read what an offline W&B run really wrote: the records of its ``run-<id>.wandb`` file.

wandb 0.31 no longer ships a reader. The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks
of records, each with a 7-byte header (u32 checksum, u16 length little-endian, u8 type: 1 full, 2 first,
3 middle, 4 last); a block tail shorter than 7 bytes is padding. Payloads are
``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # block tail padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind == 1:
            pending = payload
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + payload
            continue
        elif kind == 4:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def run_file(save_dir: Path, timeout: float = 60.0) -> Path:
    """The run's ``.wandb`` file, once W&B's background service has written its exit record.

    ``run.finish()`` returns before the service has flushed everything to disk, so wait for the end.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
        try:
            if files and any(r.HasField("exit") for r in read_records(files[-1])):
                return files[-1]
        except Exception:  # a record still being written does not parse yet
            pass
        assert time.monotonic() < deadline, f"no finished offline W&B run under {save_dir}"
        time.sleep(0.2)


def _keys(items) -> set[str]:
    return {item.key or "/".join(item.nested_key) for item in items}


def history_keys(records) -> set[str]:
    """Every metric name the run logged."""
    return _keys(item for r in records if r.HasField("history") for item in r.history.item)


def config_keys(records) -> set[str]:
    """Every top-level config key the run was given."""
    return _keys(item for r in records if r.HasField("config") for item in r.config.update)


def history_rows(records) -> list[dict[str, object]]:
    """The run's history rows in order, values decoded from JSON (``_step`` included)."""
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]


def branch_point(records) -> int | None:
    """The step a run was rewound to (``resume_from="<id>?_step=N"``), or None."""
    for r in records:
        if r.HasField("run"):
            for item in r.run.config.update:
                if item.key == "_wandb":
                    point = json.loads(item.value_json).get("branch_point")
                    return None if point is None else int(point["step"])
    return None


def rewound_history(files: list[Path]) -> list[dict[str, object]]:
    """The history W&B shows after syncing a run's offline parts in order: each part that was started with
    a rewind drops the earlier rows past its branch point (the rows the interrupted part logged again)."""
    rows: list[dict[str, object]] = []
    for path in files:
        records = read_records(path)
        point = branch_point(records)
        if point is not None:
            rows = [row for row in rows if int(row["_step"]) <= point]  # type: ignore[call-overload]
        rows += history_rows(records)
    return rows
