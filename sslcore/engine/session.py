"""Where the training loop runs: a Ray Train worker, this process alone (``scaling.backend: local``), or a
trial of ``sslcore sweep`` (one process, its epochs reported to Ray Tune).

The loop talks only to a :class:`Session`; the two kinds differ in how they wrap the model and the
DataLoader, how workers agree and how metrics are reported. Checkpoints are not a session's business: rank 0
writes them to the run folder on both (``RunDir.write_checkpoint``), and every worker resumes from there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader


class Session:
    """One process, no process group (``scaling.backend: local``)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def report(self, metrics: dict[str, Any]) -> None:
        """An epoch's metrics (or the last word of a stopped run)."""

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the workers."""
        return value

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every worker when it is true on any (a collective: every rank calls it)."""
        return flags

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every worker, by rank (a collective)."""
        return [value]


class LocalSession(Session):
    def __init__(self, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class TuneSession(LocalSession):
    """A trial of ``sslcore sweep``: one process, as ``LocalSession``, whose epochs are reported to Ray Tune
    for its scheduler to prune on. An epoch is reported only when it carries ``metric`` (an evaluator that runs
    every few epochs is pruned on at those epochs), and the last epoch always is. ``epochs`` (epochs done) is
    the scheduler's clock, so a trial resumed from its run folder keeps its place. Each report made just
    after sslcore wrote a checkpoint carries a Tune checkpoint naming it (a few bytes: the weights stay in the
    run folder), which is what Tune's restore of an interrupted sweep keeps."""

    def __init__(self, use_gpu: bool, run_dir: str, metric: str, epochs: int) -> None:
        super().__init__(use_gpu)
        from ray import tune

        from sslcore.engine.rundir import RunDir

        self._tune, self._run, self.metric, self.epochs = tune, RunDir(run_dir), metric, epochs
        self._reported = self._run.latest_checkpoint()

    #: the reported epochs, one JSON line each, in the trial's run folder (an epoch trained again after a resume
    #: is there twice: the later line counts)
    EPOCHS_FILE = "sweep_epochs.jsonl"

    def report(self, metrics: dict[str, Any]) -> None:
        import tempfile

        if "preempted" in metrics:
            return
        done = int(metrics["epoch"]) + 1
        if self.metric not in metrics and done < self.epochs:
            return
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
        result["epochs"] = done
        # the trial's own record, complete even when the sweep is interrupted between a report and its receipt
        with open(self._run / self.EPOCHS_FILE, "a") as file:
            file.write(json.dumps(result) + "\n")
        latest = self._run.latest_checkpoint()
        if latest is None or latest == self._reported:
            self._tune.report(result)
            return
        self._reported = latest
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "sslcore.json").write_text(json.dumps({"run_dir": str(self._run.path),
                                                                   "checkpoint": str(latest), "epochs": done}))
            self._tune.report(result, checkpoint=self._tune.Checkpoint.from_directory(folder))


class RaySession(Session):
    """A Ray Train worker: DDP through ``prepare_model``, the loop's own sampler through
    ``prepare_data_loader``, metrics to ``ray.train.report``; collectives over Ray Train's process group."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Buffers need no broadcast each step: queues and memory banks are kept identical by gathering
        # keys. BatchNorm statistics are per worker unless train.sync_batchnorm (the recipes of SimCLR,
        # BYOL, SimSiam, Barlow Twins, VICReg, SwAV, DeepCluster v2, DINO) made the layers SyncBatchNorm
        # before this, on GPU workers (MoCo and PCL keep them per worker, as their official multi-GPU code
        # does; CPU workers always do, torch's SyncBatchNorm running on GPUs only).
        # Buffers are synced once, from rank 0, as DDP wraps the model: every worker starts from the same
        # queue, as the official code's identically seeded processes do (an older torch has only
        # broadcast_buffers, whose False also skips that first sync).
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        per_step = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers")
        return self._torch.prepare_model(model, parallel_strategy_kwargs={per_step: False})

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return self._torch.prepare_data_loader(loader, add_dist_sampler=False)  # the loop brings its sampler

    def report(self, metrics: dict[str, Any]) -> None:
        self._train.report(metrics)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total / self.world_size

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        if self.world_size == 1:
            return flags
        votes = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in votes.tolist())

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values
