"""The driver side of ``sslcore run``: prepare the run folder, then train in-process or on Ray Train."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sslcore.api.errors import UserError
from sslcore.api.hookspecs import Method
from sslcore.config import BlockError, Resolved
from sslcore.engine.build import build, build_method, check_input_size
from sslcore.engine.context import MethodContext
from sslcore.engine.loop import WorkerSpec, train_loop_per_worker
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry

logger = logging.getLogger(__name__)


def run_dir_of(resolved: Resolved) -> RunDir:
    return RunDir(Path(resolved.experiment.output_dir).expanduser().resolve() / resolved.experiment.name)


def dry_build(resolved: Resolved, registry: Registry, dataset_size: int | None = None) -> Method:
    """Build the method once on the driver, so that settings that cannot work fail before Ray starts (and to
    load a checkpoint into: ``sslcore export``, ``sslcore eval``). Per-image state (PCL's cluster
    assignments, a memory bank) is sized by ``dataset_size`` (a checkpoint's), else by the training data."""
    experiment = resolved.as_dict()
    if dataset_size is None:
        dataset_size = len(registry.build("dataset", resolved.blocks["data"]))
    context = MethodContext(world_size=resolved.experiment.scaling.num_workers, rank=0,
                            global_batch_size=resolved.experiment.train.batch_size, steps_per_epoch=1,
                            epochs=resolved.experiment.train.epochs, device=torch.device("cpu"),
                            dataset_size=dataset_size, registry=registry)
    try:
        method = build_method(experiment, registry, context)
        check_input_size(method, build(registry, "augmentation", ("augmentation",), experiment["augmentation"]))
    except BlockError as exc:
        raise resolved.error(exc.loc, exc.message) from None
    return method


def check_data(resolved: Resolved, registry: Registry) -> int:
    """Open the training and evaluation datasets once here (a folder scan), so a wrong path fails before Ray
    starts; returns the number of training images. Skipped for a remote cluster (``--address``), whose workers
    may see other files than this machine."""
    size = len(registry.build("dataset", resolved.blocks["data"]))
    for evaluator in resolved.evaluators:
        for block in [v for v in evaluator.values() if isinstance(v, dict) and "name" in v]:
            registry.build("dataset", block)
    return size


def prepare_run_dir(resolved: Resolved, resume: Path | None) -> RunDir:
    run = RunDir(resume.resolve()) if resume else run_dir_of(resolved)
    if resume is None and run.checkpoints():
        raise UserError(f"{run.path} already holds a run: pass --resume {run.path} to continue it, "
                        f"or set a new name (--set name=...)")
    if resume is not None and not run.has_config():
        raise UserError(f"--resume {resume}: no {RunDir.CONFIG} there; give the folder of an earlier run")
    run.write_config(resolved.as_dict())
    run.clear_error()
    return run


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
    run = prepare_run_dir(resolved, resume)
    modules = (*plugin_modules, *resolved.experiment.plugins)
    spec = WorkerSpec(experiment=resolved.as_dict(), run_dir=str(run.path), plugins=modules,
                      autoload=registry.autoload, source=resolved.source, lines=resolved.lines, cwd=os.getcwd(),
                      cpus_per_worker=resolved.experiment.scaling.cpus_per_worker, launched_at=started,
                      interactive=sys.stdout.isatty())
    if resolved.experiment.scaling.backend == "local":
        return train_loop_per_worker(spec)
    return _fit_on_ray(spec, resolved, run, address)


def _fit_on_ray(spec: WorkerSpec, resolved: Resolved, run: RunDir, address: str | None) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = resolved.experiment.scaling
    # Plugin modules the workers cannot import (not installed) travel with the job; Ray takes local
    # py_modules only at the job level, in ray.init.
    # The hook runs in every process of the job, Ray's own actors too: its module imports no torch
    # (this module's import of torch cost ~2.5 s of start-up on 2 cores; bench/results.md).
    job_env: dict[str, Any] = {"worker_process_setup_hook": "sslcore.engine.ray_worker.quiet_ray_worker"}
    local_modules = _uninstalled_module_paths(list(spec.plugins))
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
    spec = dataclasses.replace(spec, cpus_per_worker=cpus)
    # Ray Train's print patch sends each worker print to the console twice (logger and tee)
    worker_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"spec": spec},  # Ray takes a dict
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=run.path.name, storage_path=str(run.path.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=resolved.experiment.checkpoint.keep),
            failure_config=FailureConfig(max_failures=0), worker_runtime_env=worker_env),
    )
    try:
        result = trainer.fit()
    except Exception:
        lines = run.read_error()
        if lines:
            raise UserError(*lines) from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    return dict(result.metrics or {})


def ray_train_loop(config: dict[str, WorkerSpec]) -> dict[str, Any]:
    """What each Ray Train worker runs: the loop, on the spec the driver put in Ray's config dict."""
    return train_loop_per_worker(config["spec"])


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
