"""The shared skip machinery (datamodules/corrupt.py, used by datamodules/base.py): the append-only log
written from several processes, dropping skipped samples, and all-skipped batches."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import pytest
import torch
from torch.utils.data import Dataset

from datamodules import CorruptFileError
from datamodules.corrupt import CorruptFileLog, SkippingDataLoader, drop_skipped, skip_or_raise
from datamodules.datasets import collate_classification


def _record_many(args: tuple[str, int]) -> None:
    path, worker = args
    log = CorruptFileLog(path)
    for i in range(200):
        log.record(f"/data/file{i % 4}.jpg", f"worker {worker} read {i}: " + "x" * 300)


def test_log_collects_concurrent_records_from_processes(tmp_path) -> None:
    log = CorruptFileLog(tmp_path / "skipped.jsonl")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_record_many, [(log.path, w) for w in range(4)])
    entries = log.entries()  # every line is a whole JSON record: no interleaved writes
    assert len(entries) == 800
    assert log.counts() == {f"/data/file{k}.jpg": 200 for k in range(4)}
    assert pickle.loads(pickle.dumps(log)).path == log.path  # what travels to a worker is the path


def test_log_keeps_one_line_per_record(tmp_path) -> None:
    log = CorruptFileLog(tmp_path / "skipped.jsonl")
    assert log.entries() == [] and log.counts() == {}
    log.record("/data/we\tird\nname.png", "Cannot decode\nsecond line")
    assert log.entries() == [("/data/we\tird\nname.png", "Cannot decode")]


def test_log_in_temp_dir_is_removed_with_its_owner() -> None:
    class Owner:
        pass

    owner = Owner()
    log = CorruptFileLog.in_temp_dir(owner)
    log.record("a.png", "bad")
    folder = os.path.dirname(log.path)
    assert os.path.isdir(folder)
    del owner
    assert not os.path.exists(folder)


def test_skip_or_raise_and_drop_skipped(tmp_path) -> None:
    err = CorruptFileError("Cannot decode image file 'x.png'.", "x.png")
    with pytest.raises(CorruptFileError, match="x.png"):
        skip_or_raise(err, None)
    log = CorruptFileLog(tmp_path / "log.jsonl")
    assert skip_or_raise(err, log) is None and log.counts() == {"x.png": 1}
    assert drop_skipped([None, 2, None]) == [2] and collate_classification([None, None]) is None


class _EveryThirdUnreadable(Dataset):
    def __init__(self, n: int, log: CorruptFileLog) -> None:
        self.n, self.skip_log = n, log

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if index % 3 == 1:
            return skip_or_raise(CorruptFileError("bad", f"f{index}"), self.skip_log)
        return torch.full((1,), float(index)), index


def test_skipping_loader_leaves_out_empty_batches(tmp_path) -> None:
    dataset = _EveryThirdUnreadable(6, CorruptFileLog(tmp_path / "log.jsonl"))
    loader = SkippingDataLoader(dataset, batch_size=1, collate_fn=collate_classification)
    assert [labels.tolist() for _, labels in loader] == [[0], [2], [3], [5]]


def test_skipping_loader_refuses_to_leave_out_a_batch_under_ddp(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("datamodules.corrupt._distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dataset = _EveryThirdUnreadable(3, CorruptFileLog(tmp_path / "log.jsonl"))
    loader = SkippingDataLoader(dataset, batch_size=1, collate_fn=collate_classification)
    with pytest.raises(RuntimeError, match=r"(?s)distributed training.*log\.jsonl.*larger batch_size"):
        list(loader)
    two_per_batch = SkippingDataLoader(dataset, batch_size=2, collate_fn=collate_classification)
    assert [labels.tolist() for _, labels in two_per_batch] == [[0], [2]]  # partial batches are fine


def test_skipping_loader_refills_an_empty_training_batch(tmp_path) -> None:
    dataset = _EveryThirdUnreadable(6, CorruptFileLog(tmp_path / "log.jsonl"))
    torch.manual_seed(0)
    loader = SkippingDataLoader(dataset, batch_size=1, collate_fn=collate_classification, refill_empty=True)
    labels = [batch_labels.tolist() for _, batch_labels in loader]
    assert len(labels) == len(loader) == 6  # the epoch keeps its number of steps
    assert all(len(batch) == 1 and batch[0] % 3 != 1 for batch in labels)  # refilled with readable samples
    assert [labels[i] for i in (0, 2, 3, 5)] == [[0], [2], [3], [5]]
    unreadable = SkippingDataLoader(
        _AllUnreadable(3, CorruptFileLog(tmp_path / "all.jsonl")),
        batch_size=2,
        collate_fn=collate_classification,
        refill_empty=True,
    )
    with pytest.raises(RuntimeError, match=r"No sample of the 3 in this split is readable"):
        list(unreadable)


class _AllUnreadable(_EveryThirdUnreadable):
    def __getitem__(self, index: int):
        return skip_or_raise(CorruptFileError("bad", f"f{index}"), self.skip_log)
