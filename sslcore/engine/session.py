"""Where the training loop runs: a Ray Train worker, or this process alone (``scaling.backend: local``).

The loop talks only to a :class:`Session`; the two kinds differ in how they wrap the model and the
DataLoader, where checkpoints go and how metrics are reported.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sslcore.engine.rundir import CHECKPOINT_FILE, RunDir


class Session:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The state.pt file of the run's latest checkpoint, readable inside the context; None: a new run."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def temp_checkpoint_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="sslcore-ckpt-"))


class LocalSession(Session):
    """One process, no process group: checkpoints go straight to the run folder's ``checkpoint_<epoch>``."""

    def __init__(self, run: RunDir, keep: int, use_gpu: bool) -> None:
        self.run, self.keep = run, keep
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def temp_checkpoint_dir(self) -> Path:
        # in the run folder, so that moving it into place is an atomic rename: a crash leaves no half checkpoint
        return Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.run.path))

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.run.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        target = self.run.checkpoint_folder(int(metrics["epoch"]))
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(checkpoint_dir), target)
        for old in self.run.checkpoints()[:-self.keep]:
            shutil.rmtree(old.parent)


class RaySession(Session):
    """A Ray Train worker: DDP through ``prepare_model``, distributed sampling through
    ``prepare_data_loader``, checkpoints handed to ``ray.train.report`` (Ray keeps ``num_to_keep``)."""

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
        # keys, and BatchNorm statistics stay per worker (the official multi-GPU recipes of MoCo and PCL;
        # SimCLR, BYOL, SimSiam, Barlow Twins and VICReg share them with SyncBatchNorm, which sslcore does
        # not use yet).
        return self._torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return self._torch.prepare_data_loader(loader, add_dist_sampler=False)  # the loop brings its sampler

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder) / CHECKPOINT_FILE

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
