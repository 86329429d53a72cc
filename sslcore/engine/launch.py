"""The driver side of ``sslcore run``: prepare the run folder, then train in-process or on Ray Train."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sslcore.api.errors import UserError
from sslcore.api.hookspecs import Method
from sslcore.config import BlockError, Resolved
from sslcore.engine.build import build, build_method, check_input_size
from sslcore.engine.console import Console, ConsoleTail
from sslcore.engine.context import MethodContext
from sslcore.engine.loop import WorkerSpec, train_loop_per_worker
from sslcore.engine.ray_worker import VERBOSE_ENV
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
    try:  # a factory's ValueError (settings that cannot work) is one line naming the block, as everywhere
        size = len(build(registry, "dataset", ("data",), resolved.blocks["data"]))
        for i, evaluator in enumerate(resolved.evaluators):
            for key, block in evaluator.items():
                if isinstance(block, dict) and "name" in block:
                    build(registry, "dataset", ("evaluators", i, key), block)
    except BlockError as exc:
        raise resolved.error(exc.loc, exc.message) from None
    return size


def prepare_run_dir(resolved: Resolved, resume: Path | None) -> RunDir:
    """The run folder, checked; nothing in it changes here (rank 0 writes config.yaml once the run is set up
    and its checkpoint read, so a resume that fails leaves the folder as it was)."""
    run = RunDir(resume.resolve()) if resume else run_dir_of(resolved)
    if resume is None and run.checkpoints():
        raise UserError(f"{run.path} already holds a run: pass --resume {run.path} to continue it, "
                        f"or set a new name (--set name=...)")
    if resume is not None and not run.has_config():
        raise UserError(f"--resume {resume}: no {RunDir.CONFIG} there; give the folder of an earlier run")
    run.path.mkdir(parents=True, exist_ok=True)
    run.clear_error()
    run.clear_stop()
    return run


# The exit code of a run stopped by SIGTERM after writing its checkpoint (EX_TEMPFAIL: "try again later").
EXIT_PREEMPTED = 75


@contextlib.contextmanager
def stop_on_sigterm(run: RunDir) -> Iterator[None]:
    """While training: SIGTERM (the preemption signal of SLURM, Kubernetes and spot machines) asks the
    workers to checkpoint at the next step and return; a second SIGTERM stops at once, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        if run.stop_requested():
            raise KeyboardInterrupt
        print("sslcore: SIGTERM: checkpointing at the next step, then stopping (again to stop at once)",
              file=sys.stderr, flush=True)
        run.request_stop("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.clear_stop()


def choose_backend(resolved: Resolved, address: str | None) -> tuple[str, str]:
    """``scaling.backend`` with ``auto`` decided, and why: in this process for one worker on this machine
    (Ray Train's start-up, ~20 s, and its idle actors, ~13% of a 2-core machine, buy one worker nothing:
    bench/results.md), Ray Train for several workers or a cluster (``--address``, ``RAY_ADDRESS``)."""
    scaling = resolved.experiment.scaling
    cluster = address or os.environ.get("RAY_ADDRESS")
    if scaling.backend == "ray":
        return "ray", "scaling.backend: ray"
    if scaling.backend == "local":
        return "local", "scaling.backend: local"
    if cluster:
        return "ray", f"scaling.backend auto: the Ray cluster at {cluster}"
    if scaling.num_workers > 1:
        return "ray", f"scaling.backend auto: {scaling.num_workers} workers"
    return "local", "scaling.backend auto: one worker on this machine; scaling.backend: ray for Ray Train"


def launch(resolved: Resolved, registry: Registry, plugin_modules: list[str], resume: Path | None = None,
           address: str | None = None, started: float | None = None, verbose: bool = False) -> dict[str, Any]:
    """Train a validated experiment; returns the last epoch's metrics, or ``{"preempted": 1.0, "step": N}``
    for a run stopped by SIGTERM after its checkpoint.

    ``started`` (a ``time.time()``) is when the command began; the first step reports the time since.
    ``verbose``: Ray's and Ray Train's own output on the console too (it always goes to the run's ray.log).
    """
    started = started or time.time()
    # No dry build here: the workers build the method first thing and report a factory's error the same
    # way, one line, exit 2. Building it here too would import torchvision and cost ~2.5 s of every start
    # (bench/results.md); `sslcore validate` still runs every check on this machine.
    if address is None:
        check_data(resolved, registry)
    run = prepare_run_dir(resolved, resume)
    backend, why = choose_backend(resolved, address)
    where = "in this process" if backend == "local" else "on Ray Train"
    print(f"sslcore: training {where} ({why}); run folder {run.path}", flush=True)
    modules = (*plugin_modules, *resolved.experiment.plugins)
    spec = WorkerSpec(experiment=resolved.as_dict(), run_dir=str(run.path), plugins=modules,
                      autoload=registry.autoload, source=resolved.source, lines=resolved.lines, cwd=os.getcwd(),
                      cpus_per_worker=resolved.experiment.scaling.cpus_per_worker, launched_at=started,
                      interactive=sys.stdout.isatty(), verbose=verbose, backend=backend)
    if backend == "local":
        with stop_on_sigterm(run):
            return train_loop_per_worker(spec)
    return _fit_on_ray(spec, resolved, run, address)


def init_ray(address: str | None, verbose: bool, plugins: list[str]) -> bool:
    """Start Ray for sslcore's jobs (``sslcore run`` on Ray Train, ``sslcore sweep``), or join the cluster at
    ``address`` (or ``RAY_ADDRESS``); returns whether it was started here (then the caller shuts it down).
    ``verbose``: the workers' own output on this console too. ``plugins``: the modules to load as plugins."""
    import ray

    # Plugin modules the workers cannot import (not installed) travel with the job; Ray takes local
    # py_modules only at the job level, in ray.init.
    # The hook runs in every process of the job, Ray's own actors too: its module imports no torch
    # (this module's import of torch cost ~2.5 s of start-up on 2 cores; bench/results.md).
    job_env: dict[str, Any] = {"worker_process_setup_hook": "sslcore.engine.ray_worker.quiet_ray_worker",
                               "env_vars": {VERBOSE_ENV: "1" if verbose else "0"}}
    local_modules = _uninstalled_module_paths(plugins)
    if local_modules:
        job_env["py_modules"] = local_modules
    started_here = not ray.is_initialized()
    if not verbose:  # a notice on every start of a local cluster
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if started_here:
        if address is None:
            # Ray starts its workers at niceness 15, below its own processes (nice 0): on a machine whose
            # cores the training worker is meant to fill, every wake-up of raylet, GCS or an idle actor then
            # stalls one of its compute threads, and the whole parallel op waits for it. Measured on 2 cores:
            # a bf16 ResNet step at 0.6-0.85x of in-process speed at nice 15, ~0.9x at nice 0 (bench/results.md).
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            # "local": without --address (or RAY_ADDRESS) a cluster of this run's own, never one that another
            # `ray start` on the machine left running
            # the workers' own output (Ray's and aim's lines) stays in Ray's log files, copied to the run's
            # ray.log at the end; sslcore's lines reach this console through the run's console.jsonl
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     log_to_driver=verbose, configure_logging=False, runtime_env=job_env)
        except ConnectionError as exc:
            raise UserError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[-1]}); "
                            f"check the address (ray status) or leave --address out to start a local one") from None
    elif local_modules:
        logger.warning("Ray was initialised before sslcore; plugin modules %s reach the workers only if they are "
                       "importable there", local_modules)
    return started_here


def _fit_on_ray(spec: WorkerSpec, resolved: Resolved, run: RunDir, address: str | None) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    scaling = resolved.experiment.scaling
    started_here = init_ray(address, spec.verbose, list(spec.plugins))
    resources = ray.cluster_resources()
    print(f"sslcore: Ray cluster at {ray.get_runtime_context().gcs_address} ({resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs); {scaling.num_workers} worker(s)", flush=True)
    cpus = scaling.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // scaling.num_workers)
    spec = dataclasses.replace(spec, cpus_per_worker=cpus)
    # Ray Train's print patch sends each worker print to the console twice (logger and tee)
    worker_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    # Ray Train's bookkeeping (it holds no checkpoint: sslcore's own are in the run folder), for this launch only
    storage = run / RunDir.RAY
    shutil.rmtree(storage, ignore_errors=True)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"spec": spec},  # Ray takes a dict
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name="train", storage_path=str(storage),
            # a failed worker group is restarted and every worker resumes from the run's last checkpoint
            failure_config=FailureConfig(max_failures=scaling.max_failures), worker_runtime_env=worker_env,
            # Ray Train's tracebacks of a user error (printed as one line below) go to ray.log only
            logging_config=LoggingConfig(log_level="INFO" if spec.verbose else "CRITICAL")),
    )
    tail = ConsoleTail(run.console_file, Console(interactive=spec.interactive))
    tail.start()
    try:
        with stop_on_sigterm(run):  # after ray.init, which installs a SIGTERM handler of its own
            result = _fit_off_main_thread(trainer)
    except Exception as exc:
        lines = _take_error(run)
        if lines:
            raise UserError(*lines) from None
        if isinstance(exc, TrainingFailedError):
            raise TrainingFailedError(f"{exc}\n(Ray Train's log: {run / RunDir.RAY_LOG})") from None
        raise
    finally:
        tail.stop()
        shutil.rmtree(storage, ignore_errors=True)
        _copy_ray_train_logs(run)
        if started_here:
            _copy_worker_output(run)
            ray.shutdown()
    lines = _take_error(run)
    if lines:
        raise UserError(*lines)
    return dict(result.return_value or {})  # rank 0's


def _copy_ray_train_logs(run: RunDir) -> None:
    """Append Ray Train's own log files of this session (every level, as JSON lines; those of this machine's
    processes) to the run's ray.log, where a traceback kept off the console can be read."""
    from ray.train.v2._internal.logging.logging import LoggingManager

    folder = LoggingManager.get_log_directory()
    files = sorted(Path(folder).glob("ray-train-sys-*.log")) if folder else []
    if not files:
        return
    with open(run / RunDir.RAY_LOG, "a") as log:
        log.write(f"# Ray Train's logs of the launch at {time.strftime('%Y-%m-%dT%H:%M:%S')} ({folder})\n")
        for file in files:
            log.write(file.read_text(errors="replace"))


def _copy_worker_output(run: RunDir) -> None:
    """Append the stdout and stderr of this job's Ray processes (the training workers, Ray Train's controller:
    what ``--verbose`` shows on the console) to the run's ray.log."""
    import ray

    try:
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        job = ray.get_runtime_context().get_job_id()
    except AttributeError:  # another Ray release: its log folder is named in ray.log's copy of Ray Train's logs
        return
    files = sorted(logs.glob(f"worker-*-{job}-*.out")) + sorted(logs.glob(f"worker-*-{job}-*.err"))
    with open(run / RunDir.RAY_LOG, "a") as log:
        for file in files:
            text = file.read_text(errors="replace")
            if text.strip():
                log.write(f"# {file}\n{text}")


def _fit_off_main_thread(trainer: Any) -> Any:
    """``trainer.fit()`` in a thread, while this (main) thread waits and takes the signals: Ctrl-C then raises
    KeyboardInterrupt here, and the caller's ``ray.shutdown()`` stops every process of the run at once. (On
    the main thread, Ray Train installs a SIGINT handler that aborts the run in the background and exits 1,
    with no word of what happened.)"""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="sslcore-fit", daemon=True)
    thread.start()
    thread.join()  # a signal interrupts the wait, and its handler runs here
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _take_error(run: RunDir) -> list[str] | None:
    """The one-line errors a worker left in the run folder, which is left as it was."""
    lines = run.read_error()
    run.clear_error()
    return lines


def ray_train_loop(config: dict[str, WorkerSpec]) -> dict[str, Any]:
    """What each Ray Train worker runs: the loop, on the spec the driver put in Ray's config dict."""
    return train_loop_per_worker(config["spec"])


def _uninstalled_module_paths(modules: list[str]) -> list[str]:
    """Folders or files of plugin modules that are importable here but not installed, for Ray's py_modules."""
    from sslcore.registry import installed_packages

    installed = installed_packages()
    paths = []
    for name in modules:
        top = name.split(".")[0]
        spec = importlib.util.find_spec(top)
        if top in installed or spec is None or spec.origin is None:
            continue
        paths.append(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
    return paths
