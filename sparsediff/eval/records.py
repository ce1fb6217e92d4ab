"""Crash-safe per-sample JSONL: one JSON object per line, appended, flushed and fsynced line by line,
so an interrupted run loses at most the line being written. Readers skip a truncated last line (the
only kind of damage an append can leave) and refuse corruption anywhere else."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def strict_json(value):
    """``value`` with every non-finite float replaced by None and a sibling ``<key>_note`` saying why
    (JSON has no Infinity or NaN; PSNR is infinite for identical frames)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key] = None
                out[f"{key}_note"] = ("identical to the reference (no difference)" if item == math.inf
                                      else f"not finite ({item})")
            else:
                out[key] = strict_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(x, float) and not math.isfinite(x) else strict_json(x) for x in value]
    return value


def read_records(path) -> list[dict]:
    """All complete records of ``path`` ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # A file written by append_record always ends with "\n": a non-empty last piece is a partial line.
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: ignoring a truncated last line (an interrupted write)", path)
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON; the file is damaged") from None
    return records


def repair_tail(path) -> None:
    """Cut a truncated last line so that the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    logger.warning("%s: dropped %d bytes of a truncated last line", path, len(data) - keep)


class RecordWriter:
    """Appends records to a JSONL file; ``done`` holds the ids already there (resuming)."""

    def __init__(self, path, id_key: str = "id"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self.id_key = id_key
        self.records = read_records(self.path)
        self.done = {str(r[id_key]) for r in self.records}
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        key = str(record[self.id_key])
        if key in self.done:  # never write an id twice, even if a caller asks
            return
        self._file.write(json.dumps(strict_json(record), ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(key)
        self.records.append(record)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
