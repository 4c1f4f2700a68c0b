"""Read an offline W&B run back from its ``.wandb`` transaction log, and test that reader.

wandb 0.31 writes every run (online or offline) as a ``run-<id>.wandb`` file: a LevelDB-style log of
``wandb.proto.wandb_internal_pb2.Record`` messages. The Python reader that older wandb shipped
(``wandb.sdk.internal.datastore``) moved into the Go core, so this module reads the format directly:

- a 7-byte file header: ``":W&B"``, magic ``0xBEE1`` (little endian), version ``0``;
- then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type byte + data, length,
  type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is zero padding.

The monitor tests use :func:`read_run` to assert what reached W&B, key by key, without an account.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    """Yield each record's payload bytes, reassembling chunks and checking their CRC."""
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"not a W&B transaction log (header {data[:HEADER]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # zero padding at a block's end
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if crc == length == kind == 0:  # zero trailer of a block, or space never written
            pos += room
            continue
        if pos + HEADER + length > len(data):  # a chunk still being written: its end is not on disk yet
            return
        payload = data[pos + HEADER : pos + HEADER + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC mismatch in the chunk at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:
            raise ValueError(f"unknown chunk type {kind} at byte {pos}")


def _set_item(target: dict, item) -> None:
    """wandb flattens nested values (media, summaries) into items keyed by a path; rebuild the dict."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class Run:
    """What an offline run recorded: history rows, the final summary, define_metric records."""

    dir: Path
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # name -> MetricRecord
    config: dict = field(default_factory=dict)  # the run's config (hyperparameters), key -> value

    def values(self, key: str) -> list:
        """The values logged for ``key``, in order, with the trainer step of each row."""
        return [(row.get("trainer/global_step"), row[key]) for row in self.history if key in row]

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def table_rows(self, key: str) -> list[tuple[int | None, list[dict]]]:
        """Each logged table of ``key`` read back as rows (dicts by column), with the trainer step: for an
        incremental table (``log_mode="INCREMENTAL"``), the rows each increment added."""
        out = []
        for step, value in self.values(key):
            assert value["_type"] in ("table-file", "incremental-table-file"), value["_type"]
            content = json.loads((self.dir / "files" / value["path"]).read_text())
            out.append((step, [dict(zip(content["columns"], row, strict=True)) for row in content["data"]]))
        return out


def _records(path: Path, timeout: float) -> list:
    """The run's records, once its ``exit`` record is on disk.

    ``run.finish()`` can return before wandb's core process has written the last records (seen with
    wandb 0.31 on a loaded machine: 4 of 14 history rows missing right after ``finish``), so wait for the
    exit record, which the core writes after everything the run logged.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        try:
            for payload in _chunks(path.read_bytes()):
                record = pb.Record()
                record.ParseFromString(payload)
                records.append(record)
        except ValueError:  # read while wandb's core was writing a chunk (seen once in CI): read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_run(save_dir: Path, timeout: float = 30.0) -> Run:
    """Parse the single ``offline-run-*/run-*.wandb`` under ``save_dir/wandb`` (after ``run.finish()``)."""
    files = sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline run under {save_dir}, found {files}")
    run = Run(dir=files[0].parent)
    for record in _records(files[0], timeout):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set_item(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_item(run.summary, item)
        elif kind == "metric" and record.metric.name:
            run.metrics[record.metric.name] = record.metric
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run


def test_reader_reads_back_what_wandb_logged(tmp_path):
    wandb = pytest.importorskip("wandb")
    run = wandb.init(project="reader", dir=str(tmp_path), mode="offline")
    run.define_metric("a", summary="max")
    for i in range(3):
        run.log({"a": 1.5 * i, "b": "x" * 40_000})  # 40 kB: a record split over two blocks
    run.log({"h": wandb.Histogram([1.0, 2.0, 3.0], num_bins=2)})
    run.finish()

    got = read_run(tmp_path)
    assert [row["a"] for row in got.history if "a" in row] == [0.0, 1.5, 3.0]
    assert all(len(row["b"]) == 40_000 for row in got.history if "b" in row)
    (hist,) = [row["h"] for row in got.history if "h" in row]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 3
    assert got.metrics["a"].summary.max
    assert got.summary["a"] == {"max": 3.0}


def test_reader_rejects_a_file_that_is_not_a_wandb_log(tmp_path):
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(_chunks(b"PK\x03\x04 zip, not wandb"))
