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

CHECKPOINT_FILE = "state.pt"


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
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def temp_checkpoint_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="sslcore-ckpt-"))


class LocalSession(Session):
    """One process, no process group: checkpoints go straight to ``run_dir/checkpoint_<epoch>``."""

    def __init__(self, run_dir: Path, keep: int, use_gpu: bool) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def temp_checkpoint_dir(self) -> Path:
        # in the run folder, so that moving it into place is an atomic rename: a crash leaves no half checkpoint
        return Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.run_dir))

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        target = self.run_dir / f"checkpoint_{int(metrics['epoch']):06d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(checkpoint_dir), target)
        for old in self._checkpoints()[:-self.keep]:
            shutil.rmtree(old)


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
        # keys, and BatchNorm statistics stay per worker as in the official multi-GPU recipes.
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
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
