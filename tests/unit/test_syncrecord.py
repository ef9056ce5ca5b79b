"""The record of what a mirror last synced (job/syncrecord.py), without a bucket: what survives a restart, and
what makes the bucket decide instead."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from job.syncrecord import STATE_SUFFIX, SyncRecord

REMOTE = "gs://bucket/run/"


def test_a_saved_record_is_what_the_next_process_loads(tmp_path: Path) -> None:
    path = tmp_path / f"mirror{STATE_SUFFIX}"
    record = SyncRecord.load(path, REMOTE)
    assert (record.synced, record.generations) == ({}, {})  # none yet: the bucket decides
    record.record("a.txt", (3, 1_000), 7)
    record.record("ckpt/checkpoint", (5, 2_000), None)
    record.record("old.txt", (1, 3_000), 9)
    record.forget("old.txt", remote=True)
    record.forget("ckpt/checkpoint", remote=False)  # changed here: the bucket still holds what was seen
    record.save()

    loaded = SyncRecord.load(path, REMOTE)
    assert loaded.synced == {"a.txt": (3, 1_000)}
    assert loaded.generations == {"a.txt": 7, "ckpt/checkpoint": None}


def test_another_outputs_record_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / f"mirror{STATE_SUFFIX}"
    record = SyncRecord(path, "gs://bucket/other/", {"a.txt": (3, 1_000)}, {"a.txt": 7})
    record.save()
    loaded = SyncRecord.load(path, REMOTE)
    assert (loaded.synced, loaded.generations) == ({}, {})


@pytest.mark.parametrize("text", [
    "not json",
    json.dumps([REMOTE]),
    json.dumps({"remote": REMOTE, "synced": {"a.txt": [3]}, "generations": {}}),
    json.dumps({"remote": REMOTE, "synced": {"a.txt": [3, 1_000]}}),
])
def test_an_unreadable_record_is_ignored_with_a_warning(tmp_path: Path, text: str, caplog) -> None:
    path = tmp_path / f"mirror{STATE_SUFFIX}"
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="job.syncrecord"):
        loaded = SyncRecord.load(path, REMOTE)
    assert (loaded.synced, loaded.generations) == ({}, {})
    assert f"Ignoring {path} (unreadable)" in caplog.text
