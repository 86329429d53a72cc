"""The driver side of ``sslcore run``: prepare the run folder, then train in-process or on Ray Train."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sslcore.api.errors import ConfigError, UserError
from sslcore.config import Resolved
from sslcore.engine.context import MethodContext
from sslcore.engine.loop import ERROR_FILE, build_method, make_spec, train_loop_per_worker
from sslcore.engine.session import CHECKPOINT_FILE
from sslcore.registry import Registry

CONFIG_FILE = "config.yaml"
logger = logging.getLogger(__name__)


def run_dir_of(resolved: Resolved) -> Path:
    return Path(resolved.experiment.output_dir).expanduser().resolve() / resolved.experiment.name


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (local and Ray Train checkpoints alike)."""
    return sorted(run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)


def dry_build(resolved: Resolved, registry: Registry) -> torch.nn.Module:
    """Build the method once on the driver, so a component that rejects its settings fails before Ray starts
    (and to load a checkpoint into: ``sslcore export``, ``sslcore eval``). Per-sample state (PCL's cluster
    assignments) is sized by the training data when it is readable here, else left empty."""
    experiment = resolved.as_dict()
    try:
        dataset_size = len(registry.build("dataset", resolved.blocks["data"]))
    except UserError:
        dataset_size = 0
    context = MethodContext(world_size=resolved.experiment.scaling.num_workers, rank=0,
                            global_batch_size=resolved.experiment.train.batch_size, steps_per_epoch=1,
                            epochs=resolved.experiment.train.epochs, device=torch.device("cpu"),
                            registry=registry, dataset_size=dataset_size)
    try:
        return build_method(experiment, registry, context)
    except ConfigError as exc:
        raise ConfigError(*(f"{resolved.source}: {line}" for line in exc.lines)) from None


def check_data(resolved: Resolved, registry: Registry) -> None:
    """Open the training and evaluation datasets once here (a folder scan), so a wrong path fails before Ray
    starts. Skipped for a remote cluster (``--address``), whose workers may see other files than this machine."""
    blocks = [resolved.blocks["data"]]
    for evaluator in resolved.evaluators:
        blocks += [v for v in evaluator.values() if isinstance(v, dict) and "name" in v]
    for block in blocks:
        registry.build("dataset", block)


def prepare_run_dir(resolved: Resolved, resume: Path | None) -> Path:
    run_dir = resume.resolve() if resume else run_dir_of(resolved)
    if resume is None and checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                        f"or set a new name (--set name=...)")
    if resume is not None and not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"--resume {resume}: no {CONFIG_FILE} there; give the folder of an earlier run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    with open(run_dir / CONFIG_FILE, "w") as f:
        yaml.safe_dump(resolved.as_dict(), f, sort_keys=False)
    return run_dir


def launch(resolved: Resolved, registry: Registry, plugin_modules: list[str], resume: Path | None = None,
           address: str | None = None, started: float | None = None) -> dict[str, Any]:
    """Train a validated experiment; returns the last epoch's metrics.

    ``started`` (a ``time.time()``) is when the command began; the first step reports the time since.
    """
    started = started or time.time()
    # No dry build here: the workers build the method first thing and report a factory's error the same
    # way, one line, exit 2. Building it here too would import torchvision and cost ~2.5 s of every start
    # (bench/results.md); `sslcore validate` still runs every check on this machine.
    if address is None:
        check_data(resolved, registry)
    run_dir = prepare_run_dir(resolved, resume)
    modules = [*plugin_modules, *resolved.experiment.plugins]
    spec = make_spec(resolved.as_dict(), run_dir, modules, registry.autoload, source=resolved.source,
                     launched_at=started, interactive=sys.stdout.isatty())
    if resolved.experiment.scaling.backend == "local":
        return train_loop_per_worker(spec)
    return _fit_on_ray(spec, resolved, run_dir, modules, address)


def _fit_on_ray(spec: dict[str, Any], resolved: Resolved, run_dir: Path, modules: list[str],
                address: str | None) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = resolved.experiment.scaling
    # Plugin modules the workers cannot import (not installed) travel with the job; Ray takes local
    # py_modules only at the job level, in ray.init.
    # The hook runs in every process of the job, Ray's own actors too: its module imports no torch
    # (this module's import of torch cost ~2.5 s of start-up on 2 cores; bench/results.md).
    job_env: dict[str, Any] = {"worker_process_setup_hook": "sslcore.engine.ray_worker.quiet_ray_worker"}
    local_modules = _uninstalled_module_paths(modules)
    if local_modules:
        job_env["py_modules"] = local_modules
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            # Ray starts its workers at niceness 15, below its own processes (nice 0): on a machine whose
            # cores the training worker is meant to fill, every wake-up of raylet, GCS or an idle actor then
            # stalls one of its compute threads, and the whole parallel op waits for it. Measured on 2 cores:
            # a bf16 ResNet step at 0.6-0.85x of in-process speed at nice 15, ~0.9x at nice 0 (bench/results.md).
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False,
                     runtime_env=job_env)
        except ConnectionError as exc:
            raise UserError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[-1]}); "
                            f"check the address (ray status) or leave --address out to start a local one") from None
    elif local_modules:
        logger.warning("Ray was initialised before sslcore; plugin modules %s reach the workers only if they are "
                       "importable there", local_modules)
    resources = ray.cluster_resources()
    print(f"sslcore: Ray cluster at {ray.get_runtime_context().gcs_address} ({resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs); {scaling.num_workers} worker(s)", flush=True)
    cpus = scaling.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // scaling.num_workers)
    spec["experiment"]["scaling"]["cpus_per_worker"] = cpus
    # Ray Train's print patch sends each worker print to the console twice (logger and tee)
    worker_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=resolved.experiment.checkpoint.keep),
            failure_config=FailureConfig(max_failures=0), worker_runtime_env=worker_env),
    )
    try:
        result = trainer.fit()
    except Exception:
        error = run_dir / ERROR_FILE
        if error.exists():
            raise UserError(*json.loads(error.read_text())["lines"]) from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    return dict(result.metrics or {})


def _uninstalled_module_paths(modules: list[str]) -> list[str]:
    """Folders or files of plugin modules that are importable here but not installed, for Ray's py_modules."""
    installed = importlib.metadata.packages_distributions()
    paths = []
    for name in modules:
        top = name.split(".")[0]
        spec = importlib.util.find_spec(top)
        if top in installed or spec is None or spec.origin is None:
            continue
        paths.append(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
    return paths
