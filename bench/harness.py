"""Shared by the benchmarks that run in sslcore's venv: the benchmark experiment, a Trainer built from it,
timing and result files. Not a test: nothing here asserts a time."""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CIFAR = Path(os.environ.get("SSLCORE_CIFAR10", "~/.cache/sslcore/cifar10")).expanduser()


def experiment(**overrides: Any) -> dict[str, Any]:
    """MoCo v2 as bare_moco.py and lightly_moco.py do it: ResNet-18 (CIFAR stem), MLP head 512-2048-128,
    momentum 0.99, queue 4096, InfoNCE tau 0.2, SGD lr 0.06, batch 256, 32 px views. ``overrides`` are
    merged key by key (``train={"precision": "bf16"}`` changes only that key)."""
    base: dict[str, Any] = {
        "name": "bench", "seed": 0,
        "method": {"name": "moco", "momentum": 0.99, "head_hidden_dim": 2048, "dim": 128, "shuffle_bn": "off"},
        "encoder": {"name": "resnet18", "cifar_stem": True},
        "augmentation": {"name": "moco_v2", "size": 32, "mean": [0.4914, 0.4822, 0.4465],
                         "std": [0.2470, 0.2435, 0.2616]},
        "negatives": {"name": "queue", "size": 4096},
        "loss": {"name": "info_nce", "temperature": 0.2},
        "data": {"name": "image_folder", "root": str(CIFAR / "train")},
        "train": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0,
                  "optimizer": {"name": "sgd", "lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}},
        "scaling": {"backend": "local", "num_workers": 1},
        "tracking": {"aim": None, "progress_bar": False},
    }
    return merge(base, overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_trainer(data: dict[str, Any], device: str = "cpu", run_root: Path | None = None):
    """sslcore's own Trainer for ``data`` (an experiment dict), set up in this process (local backend) on
    ``device`` ("cpu" or "cuda"), its run folder in a new temporary folder (under ``run_root`` if given)."""
    from sslcore.config import resolve
    from sslcore.engine.console import Console
    from sslcore.engine.loop import Trainer, WorkerSpec
    from sslcore.engine.rundir import RunDir
    from sslcore.engine.session import LocalSession
    from sslcore.registry import Registry

    registry = Registry()
    run_dir = Path(tempfile.mkdtemp(prefix="sslcore-bench-", dir=run_root))
    data = merge(data, {"output_dir": str(run_dir), "scaling": {"use_gpu": device == "cuda"}})
    resolved = resolve(data, registry, source="bench")
    run = RunDir(run_dir / data["name"])
    run.path.mkdir(parents=True, exist_ok=True)
    spec = WorkerSpec(experiment=resolved.as_dict(), run_dir=str(run.path), source="bench")
    trainer = Trainer(spec, LocalSession(use_gpu=device == "cuda"), Console(interactive=False))
    trainer.setup()
    return trainer


def train_step(trainer: Any, views: list[Any]) -> Any:
    """One of the Trainer's optimisation steps on pre-made views (image indices 0..N-1), moved to its device
    in its memory format."""
    import torch

    memory_format = torch.channels_last if trainer.channels_last else torch.contiguous_format
    views = [v.to(trainer.device, memory_format=memory_format) for v in views]
    return trainer.train_step(views, torch.arange(views[0].shape[0]), epoch=0)


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> float:
    """Seconds per step: ``warmup`` steps untimed, then the mean of ``steps``."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    """The processor, and its native bf16 support: absolute numbers and bf16 gains depend on both."""
    model, flags = "unknown CPU", []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split()
    native = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {os.cpu_count()} vCPU" + (f", {' '.join(native)}" if native else "")


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": os.environ.get("BENCH_COMMAND", ""), "measured_at": time.strftime("%Y-%m-%d %H:%M"),
               "cpu": cpu_name(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
