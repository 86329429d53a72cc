"""Negative sources: the MoCo queue (FIFO, checkpointing, size check) and in-batch negatives, on one
process and on two real gloo processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslcore.components.negatives import InBatchConfig, InBatchNegatives, QueueConfig, QueueNegatives

DIM = 4


def make_queue(size: int, global_batch_size: int) -> QueueNegatives:
    return QueueNegatives(QueueConfig(size=size), dim=DIM, global_batch_size=global_batch_size, dataset_size=0)


def batch(first: int, n: int) -> torch.Tensor:
    """Keys whose first coordinate numbers them: first, first + 1, ..."""
    keys = torch.zeros(n, DIM)
    keys[:, 0] = torch.arange(first, first + n, dtype=torch.float32)
    return keys


def test_queue_starts_with_random_unit_rows():
    queue = make_queue(8, 2)
    negatives, exclude = queue.negatives(torch.randn(2, DIM), torch.randn(2, DIM))
    assert negatives.shape == (8, DIM) and exclude is None
    assert torch.allclose(negatives.norm(dim=1), torch.ones(8))
    assert int(queue.ptr) == 0


def test_queue_is_fifo_and_wraps_around():
    queue = make_queue(6, 2)
    for step in range(4):  # 8 keys through a queue of 6: keys 0 and 1 are overwritten by 6 and 7
        queue.update(batch(2 * step, 2))
    assert queue.queue[:, 0].tolist() == [6, 7, 2, 3, 4, 5]
    assert int(queue.ptr) == 2


def test_negatives_are_a_copy_that_update_does_not_change():
    queue = make_queue(4, 2)
    negatives, _ = queue.negatives(torch.randn(2, DIM), torch.randn(2, DIM))
    before = negatives.clone()
    queue.update(batch(10, 2))
    assert torch.equal(negatives, before)
    assert not negatives.requires_grad


def test_keys_are_stored_in_float32():
    queue = make_queue(4, 2)
    queue.update(batch(0, 2).bfloat16())
    assert queue.queue.dtype == torch.float32


def test_state_dict_carries_queue_and_pointer():
    queue = make_queue(6, 2)
    queue.update(batch(0, 2))
    restored = make_queue(6, 2)
    restored.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"queue", "ptr"}
    assert torch.equal(restored.queue, queue.queue) and int(restored.ptr) == 2
    restored.update(batch(2, 2))
    assert restored.queue[:4, 0].tolist() == [0, 1, 2, 3]


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ValueError) as excinfo:
        make_queue(4000, 256)
    assert str(excinfo.value) == ("queue size 4000 is not a multiple of the global batch size 256 "
                                  "(train.batch_size): use 3840 or 4096")
    with pytest.raises(ValueError, match=r"use 256$"):
        make_queue(100, 256)


def test_in_batch_excludes_each_query_own_key():
    source = InBatchNegatives(InBatchConfig(), dim=DIM, global_batch_size=3, dataset_size=0)
    k = torch.randn(3, DIM, requires_grad=True)
    negatives, exclude = source.negatives(torch.randn(3, DIM), k)
    assert torch.equal(negatives, k) and not negatives.requires_grad
    assert torch.equal(exclude, torch.eye(3, dtype=torch.bool))
    source.update(k)
    assert list(source.state_dict()) == []


# -- two real processes over gloo ------------------------------------------------------------------------

def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial queue on both ranks, as after DDP's broadcast
        queue = make_queue(8, 4)
        in_batch = InBatchNegatives(InBatchConfig(), dim=DIM, global_batch_size=4, dataset_size=0)
        k = batch(100 * (rank + 1), 2)  # rank 0: 100, 101; rank 1: 200, 201
        negatives, exclude = in_batch.negatives(F.normalize(torch.randn(2, DIM)), k)
        queue.update(k)
        queue.update(k + 10)
        torch.save({"queue": queue.queue, "ptr": queue.ptr, "negatives": negatives, "exclude": exclude},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_share_the_queue_and_the_batch(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["queue"], rank1["queue"])
    assert rank0["queue"][:, 0].tolist() == [100, 101, 200, 201, 110, 111, 210, 211]
    assert int(rank0["ptr"]) == int(rank1["ptr"]) == 0
    assert rank1["negatives"][:, 0].tolist() == [100, 101, 200, 201]
    expected = torch.tensor([[False, False, True, False], [False, False, False, True]])
    assert torch.equal(rank1["exclude"], expected)
    assert torch.equal(rank0["exclude"], expected.roll(-2, dims=1))
