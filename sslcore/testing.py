"""pytest plugin for sslcore and for plugin authors: real CIFAR-10 images, a registry, and the checks the
plugins' tests share.

Installed with sslcore (entry point ``pytest11``), so a plugin's own tests get these fixtures:

- ``cifar10_dir: Path``, session-scoped: a folder with ``train/`` and ``test/``, the CIFAR-10 ImageFolders of
  JPEGs (50,000 and 10,000 images, one folder per class): ``$SSLCORE_CACHE/cifar10`` (default
  ``~/.cache/sslcore/cifar10``) where ``scripts/setup.sh`` put them, else unpacked there once from the shared
  archive (``$SSLCORE_CIFAR10_ARCHIVE``, or ``shared/data/cifar10-jpg.tar.gz`` beside an ancestor of the
  working directory). Tests never download; with neither, the fixture fails, naming both places.
- ``cifar10_subset: dict[str, Path]``, session-scoped: ``{"train": ..., "test": ...}``, two ImageFolders of
  symlinks to the first 20 (train) and 10 (test) images of each class of ``cifar10_dir``, 200 and 100 images.
- ``registry: sslcore.registry.Registry``, one per test: the built-in components only (no autoload of
  installed plugins); a test adds its plugin with ``registry.add_module(...)``.

Tests marked ``gpu`` are skipped, with the reason, where no CUDA GPU is visible. The helpers, one line each:

- :func:`check_component`: one component against its kind's contract (:mod:`sslcore.contract`) on tiny CPU inputs.
- :func:`check_plugin`: a plugin module's components, each through :func:`check_component`, then unregistered.
- :func:`check_entry_point`: the installed distribution's entry point loads and registers the components given.
- :func:`check_workers_match_one_process`: W real gloo workers give the loss and gradients of one process.
- :func:`run_distributed`: a module-level function in W processes of a real gloo group; their return values.
- :func:`run_cli`: ``sslcore ARGS`` in a child process, as a user runs it.
- :func:`run_example_briefly`: an example experiment through the CLI, two steps on CIFAR-10; its run folder.
- :func:`resume_repeats_the_run`: an example resumed at two steps repeats the uninterrupted run bit for bit.
- :func:`tiny_encoder`: an Encoder without BatchNorm, for method tests.
- :func:`built_slots`: the Slots a method's factory gets, from components the test built.
- :func:`build_for_training`: the method and optimization the engine builds for a resolved experiment.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import Tensor, nn

ARCHIVE_NAME = "cifar10-jpg.tar.gz"


def cache_dir() -> Path:
    return Path(os.environ.get("SSLCORE_CACHE", Path.home() / ".cache" / "sslcore")).expanduser()


def find_cifar10_archive(start: Path | None = None) -> Path | None:
    """The shared archive: ``$SSLCORE_CIFAR10_ARCHIVE``, else ``shared/data/`` beside an ancestor folder."""
    env = os.environ.get("SSLCORE_CIFAR10_ARCHIVE")
    if env:
        return Path(env) if Path(env).is_file() else None
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder.parent / "shared" / "data" / ARCHIVE_NAME
        if candidate.is_file():
            return candidate
    return None


def unpack_cifar10(archive: Path, target: Path | None = None) -> Path:
    """Unpack the shared CIFAR-10 ImageFolder archive once; returns the folder holding train/ and test/."""
    target = target or cache_dir() / "cifar10"
    done = target / ".unpacked"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        done.touch()
    return target


def make_subset(root: Path, target: Path, per_class: int) -> Path:
    """An ImageFolder of the first ``per_class`` files of each class of ``root`` (sorted), as symlinks."""
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        out = target / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(class_dir.iterdir())[:per_class]:
            link = out / file.name
            if not link.exists():
                link.symlink_to(file)
    return target


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason, where there is none)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, on a machine without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def find_cifar10_images() -> Path | None:
    """The folder with the CIFAR-10 ImageFolders train/ and test/: the cache that setup made, or the shared
    archive unpacked into it; None when neither exists."""
    cached = cache_dir() / "cifar10"
    if (cached / ".unpacked").exists() or ((cached / "train").is_dir() and (cached / "test").is_dir()):
        return cached
    archive = find_cifar10_archive()
    return unpack_cifar10(archive, cached) if archive is not None and archive.is_file() else None


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """A folder with train/ and test/, the CIFAR-10 ImageFolders of JPEGs; never downloaded."""
    images = find_cifar10_images()
    if images is None:
        pytest.fail(f"no CIFAR-10 images: neither {cache_dir() / 'cifar10'} (bash scripts/setup.sh makes it) nor "
                    f"the archive {ARCHIVE_NAME} (set SSLCORE_CIFAR10_ARCHIVE, or put it in ../shared/data) exists",
                    pytrace=False)
    return images


@pytest.fixture(scope="session")
def cifar10_subset(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"train": 20 images per class, "test": 10 per class}`` of the real CIFAR-10 JPEGs."""
    base = tmp_path_factory.mktemp("cifar10_subset")
    return {"train": make_subset(cifar10_dir / "train", base / "train", 20),
            "test": make_subset(cifar10_dir / "test", base / "test", 10)}


@pytest.fixture
def registry() -> Any:
    """A fresh :class:`sslcore.registry.Registry` with the built-in components only (no autoload)."""
    from sslcore.registry import Registry

    return Registry(autoload=False)


def check_component(registry: Any, kind: str, name: str) -> None:
    """The contract every registered component meets (:mod:`sslcore.contract`, per kind): it builds from its
    defaults and runs on tiny CPU tensors; an AssertionError names the component and what it broke."""
    from sslcore.contract import check

    check(registry, kind, name)


def check_entry_point(distribution: str, components: list[tuple[str, str]]) -> None:
    """The installed distribution's ``sslcore`` entry point loads without error (with ``Registry(autoload=True)``,
    as ``sslcore`` loads it) and registers every ``(kind, name)`` of ``components``, each from ``distribution``.

    ``distribution`` is the ``[project] name`` of the plugin's pyproject.toml (``"sslcore-simclr"``); ``kind``
    one of sslcore.registry.KIND_HOOKS (``"method"``, ``"loss"``, ...).
    """
    from sslcore.registry import KIND_HOOKS, Registry

    def canonical(name: str | None) -> str:  # PEP 503: sslcore-my_loss, sslcore_my.loss and SSLcore-My-Loss are one
        return re.sub(r"[-_.]+", "-", name or "").lower()

    registry = Registry(autoload=True)
    plugins = [p for p in registry.plugins
               if canonical(p.distribution) == canonical(distribution) and p.source == "entry_point"]
    assert plugins, (f"no sslcore entry point of the distribution '{distribution}' is installed: declare it under "
                     f"[project.entry-points.sslcore] in its pyproject.toml and `pip install -e` it")
    failed = [f"'{p.name}' ({p.module}): {p.error}" for p in plugins if p.error]
    assert not failed, f"the sslcore entry point of '{distribution}' failed to load: {'; '.join(failed)}"
    registered = sorted((kind, name) for p in plugins for kind, names in p.components.items() for name in names)
    for kind, name in components:
        assert kind in KIND_HOOKS, f"unknown kind '{kind}': one of {', '.join(KIND_HOOKS)}"
        component = registry.components[kind].get(name)
        assert component is not None, f"'{distribution}' registers no {kind} '{name}'; it registers {registered}"
        assert canonical(component.distribution) == canonical(distribution), \
            f"{kind} '{name}' is registered by '{component.distribution}', not by '{distribution}'"


def check_workers_match_one_process(build: Callable[[], nn.Module], inputs: Callable[[], list[Tensor]], *,
                                    world_size: int = 2,
                                    loss: Callable[[nn.Module, list[Tensor]], Tensor] | None = None,
                                    rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """``world_size`` real gloo workers, each on its ``chunk(world_size)[rank]`` of every tensor of the global
    batch ``inputs()``, compute what one process computes on the whole batch: the mean of the workers' losses
    is the one process's loss, and every gradient is the one process's (within ``rtol``, ``atol``).

    Every process seeds torch (``torch.manual_seed(0)``), then calls ``build()``; a module with trainable
    parameters is wrapped in DDP on the workers, which averages their gradients, and the gradients compared
    are the trainable parameters'. A module without any (a loss that gathers) gets inputs that require a
    gradient instead, and the gradients compared are the floating inputs', each worker's divided by
    ``world_size`` (DDP's mean, applied to the inputs: the gradient of the mean of the workers' losses).

    ``loss(module, inputs)`` returns the 0-dim loss of ``module`` (the DDP wrapper on the workers) on
    ``inputs``; by default a :class:`sslcore.api.hookspecs.Method`'s ``module(inputs)["loss"]`` (the inputs are
    its views) and any other module's ``module(*inputs)``. It runs in every process, so it may also assert
    what every worker must see. ``build``, ``inputs`` and ``loss`` must be module-level functions (or
    ``functools.partial`` of them): they are pickled by reference into the spawned processes. ``inputs()``
    must give the same tensors every call (its own seeded generator), its batch a multiple of ``world_size``.
    A statistic over the batch couples a worker's rows: build BatchNorm in eval mode, or without it (per-worker
    batch statistics are SyncBatchNorm's question, not the loss's).
    """
    batch = inputs()
    sizes = {len(x) for x in batch}
    assert all(size % world_size == 0 for size in sizes), \
        f"inputs(): batch sizes {sorted(sizes)} must be multiples of world_size={world_size}"
    expected = _loss_and_gradients(build, batch, loss, distributed=False)
    workers = run_distributed(_worker_loss_and_gradients, build, inputs, loss, world_size=world_size)
    _assert_workers_match(expected, workers, rtol, atol)


def run_distributed(fn: Any, *args: Any, world_size: int = 2) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes of a real gloo process group (one
    torch thread each) and return each rank's return value, in rank order.

    ``fn`` must be a module-level function (it is pickled to the spawned processes); its return value is
    passed back with ``torch.save`` (tensors, dicts, lists, numbers).
    """
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_distributed_entry, args=(fn, args, world_size, tmp), nprocs=world_size, join=True)
        except mp.ProcessExitedException:
            # A rank killed by a signal after rank 0 passed the final barrier (so after every rank saved its
            # result): gloo aborting in teardown ("terminate called without an active exception", SIGABRT)
            # when a peer's sockets close first. The results are complete; any earlier death is a failure.
            if not (Path(tmp) / "complete").exists():
                raise
        return [torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _distributed_entry(rank: int, fn: Any, args: tuple[Any, ...], world_size: int, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world_size)
    result = fn(rank, world_size, *args)
    torch.save(result, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()  # every rank's result is saved and no rank talks to the group any more
    if rank == 0:
        (Path(tmp) / "complete").touch()
    # Exit without tearing the group down: gloo's threads, destroyed by destroy_process_group or the
    # interpreter's teardown, abort a loaded machine's process now and then ("terminate called without an
    # active exception", SIGABRT) after its work is done and saved. The OS closes the sockets.
    os._exit(0)


def _worker_loss_and_gradients(rank: int, world_size: int, build: Callable[[], nn.Module],
                               inputs: Callable[[], list[Tensor]],
                               loss: Callable[[nn.Module, list[Tensor]], Tensor] | None) -> dict[str, Any]:
    shards = [x.chunk(world_size)[rank] for x in inputs()]  # this worker's rows of every input
    result = _loss_and_gradients(build, shards, loss, distributed=True)
    if result["of"] == "inputs":  # DDP's mean over the workers, as for parameters
        result["gradients"] = {name: None if g is None else g / world_size for name, g in result["gradients"].items()}
    return result


def _loss_and_gradients(build: Callable[[], nn.Module], inputs: list[Tensor],
                        loss: Callable[[nn.Module, list[Tensor]], Tensor] | None, *,
                        distributed: bool) -> dict[str, Any]:
    """The loss of ``build()`` on ``inputs`` and the gradients of its trainable parameters by name (of its
    floating inputs, "input i", when it has none)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from sslcore.api.hookspecs import Method

    torch.manual_seed(0)  # the same initial weights in every process, as the engine seeds them
    module = build()
    parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not parameters:
        inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    model = DistributedDataParallel(module) if distributed and parameters else module
    if loss is not None:
        value = loss(model, inputs)
    elif isinstance(module, Method):
        value = model(inputs)["loss"]
    else:
        value = model(*inputs)
    assert isinstance(value, torch.Tensor) and value.ndim == 0, f"the loss must be a 0-dim tensor, got {value!r}"
    value.backward()
    tensors = parameters or {f"input {i}": x for i, x in enumerate(inputs) if x.requires_grad}
    return {"loss": value.detach(), "of": "parameters" if parameters else "inputs",
            "gradients": {name: None if t.grad is None else t.grad.clone() for name, t in tensors.items()}}


def _assert_workers_match(expected: dict[str, Any], workers: list[dict[str, Any]], rtol: float, atol: float) -> None:
    import torch

    mean = torch.stack([w["loss"] for w in workers]).mean()
    torch.testing.assert_close(mean, expected["loss"], rtol=rtol, atol=atol, msg=lambda detail: (
        f"the mean of the {len(workers)} workers' losses {[float(w['loss']) for w in workers]} is not the loss of "
        f"one process on the global batch, {float(expected['loss'])}: {detail}"))
    for rank, worker in enumerate(workers):
        assert worker["gradients"].keys() == expected["gradients"].keys(), \
            f"rank {rank}: gradients of {sorted(worker['gradients'])}, one process: {sorted(expected['gradients'])}"
        for name, want in expected["gradients"].items():
            got = worker["gradients"][name]
            assert (got is None) == (want is None), \
                f"rank {rank}, {name}: gradient {'None' if got is None else 'set'}, one process's " \
                f"{'None' if want is None else 'set'}"
            if want is not None:
                if expected["of"] == "inputs":  # the worker's rows of the one process's input
                    want = want.chunk(len(workers))[rank]
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda detail, rank=rank, name=name: (
                    f"rank {rank}: the gradient of {name} is not one process's on the global batch: {detail}"))


#: shrink an example experiment to two steps of one epoch on 100 training images (10 per class)
BRIEF_RUN = ("scaling.backend=local", "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32",
             "data.max_per_class=10", "evaluators.0.data.max_per_class=5", "evaluators.0.every_epochs=0")


def run_cli(*args: str, cwd: Path, autoload: bool = True, timeout: float = 600) -> Any:
    """``sslcore ARGS`` in a child process, as a user runs it (installed plugins loaded unless ``autoload``
    is False); returns the ``subprocess.CompletedProcess`` with its output captured."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    if not autoload:
        env["SSLCORE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "sslcore", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_example_briefly(example: Path, cifar10_dir: Path, tmp_path: Path, *overrides: str) -> Path:
    """Run the experiment file ``example`` through the CLI on the CIFAR-10 images of ``cifar10_dir`` (it
    names ``~/.cache/sslcore/cifar10``), shrunk by :data:`BRIEF_RUN` and then ``overrides`` (``key=value``).
    Checks that it exits 0 with a final kNN top-1 in [0, 1] and a checkpoint; returns the run folder."""
    import yaml

    from sslcore.engine.rundir import RunDir

    config = tmp_path / example.name
    config.write_text(example.read_text().replace("~/.cache/sslcore/cifar10", str(cifar10_dir)))
    sets = [arg for override in (*BRIEF_RUN, *overrides) for arg in ("--set", override)]
    out = run_cli("run", str(config), *sets, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    experiment = yaml.safe_load(config.read_text())
    run = RunDir(tmp_path / experiment.get("output_dir", "runs") / experiment["name"])
    summary = run.read_summary()
    assert 0.0 <= summary["final"]["knn_top1"] <= 1.0, summary
    assert run.checkpoints(), f"no checkpoint in {run.path}"
    return run.path


def resume_repeats_the_run(example: Path, cifar10_dir: Path, tmp_path: Path, *overrides: str) -> None:
    """A method's state is all in its checkpoints: ``example`` run briefly (:func:`run_example_briefly`, then
    2 epochs of 3 steps with a checkpoint after every step, then ``overrides``), and two copies of the run
    resumed from its checkpoint at step 2 (inside epoch 1) and at step 3 (the end of epoch 1), log the same
    loss at every step and end with the same model state, bit for bit. To spare the disk (a ResNet-18 MoCo
    checkpoint is ~130 MB), the straight run keeps only the checkpoints at steps 2, 3 and its last, and each copy
    only its logs and summary once compared."""
    import json
    import shutil

    import torch

    from sslcore.engine.rundir import RunDir

    def train_losses(run: Path) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if r["subset"] == "train"]

    def final_model(run: Path) -> dict[str, torch.Tensor]:
        return torch.load(RunDir(run).checkpoints()[-1], weights_only=True)["model"]

    (tmp_path / "straight").mkdir()
    schedule = ("train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every_steps=1",
                "checkpoint.every_steps=1", "checkpoint.keep=10")
    straight = run_example_briefly(example, cifar10_dir, tmp_path / "straight", *schedule, *overrides)
    expected, model = train_losses(straight), final_model(straight)
    assert [step for step, _ in expected] == list(range(1, 7)), expected

    def step_of(folder_name: str) -> int:
        return int(folder_name.removeprefix("checkpoint_"))

    for checkpoint in RunDir(straight).checkpoints()[:-1]:
        if step_of(checkpoint.parent.name) not in (2, 3):
            shutil.rmtree(checkpoint.parent)
    for at in (2, 3):
        resumed = tmp_path / f"resumed_at_{at}" / straight.name
        shutil.copytree(straight, resumed, ignore=lambda folder, names, at=at: [
            name for name in names
            if Path(folder) == straight and name.startswith("checkpoint_") and step_of(name) > at])
        # from the first run's folder: its aim repository (the example's relative runs/.aim) holds the aim run
        out = run_cli("run", "--resume", str(resumed), cwd=tmp_path / "straight")
        assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
        assert f"(step {at})" in out.stdout, out.stdout[-2000:]
        assert train_losses(resumed) == expected, f"resumed at step {at}: {train_losses(resumed)} != {expected}"
        got = final_model(resumed)
        assert got.keys() == model.keys()
        different = [key for key in model if not torch.equal(got[key], model[key])]
        assert not different, f"resumed at step {at}, the final model differs in {different[:5]}"
        for checkpoint in RunDir(resumed).checkpoints():
            shutil.rmtree(checkpoint.parent)
    for checkpoint in RunDir(straight).checkpoints()[:-1]:
        shutil.rmtree(checkpoint.parent)


def tiny_encoder(feature_dim: int = 8) -> Any:
    """A conv, a ReLU and global pooling, with ``feature_dim`` and ``input_size`` None (an Encoder): an
    encoder without BatchNorm for method tests (no statistic couples the samples of a batch), fast on one
    thread."""
    from torch import nn

    encoder = nn.Sequential(nn.Conv2d(3, feature_dim, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.feature_dim = feature_dim
    encoder.input_size = None
    return encoder


def build_for_training(experiment: dict[str, Any], registry: Any, *, steps_per_epoch: int = 1,
                       epochs: int | None = None) -> tuple[Any, Any]:
    """The method and the optimization (optimizer over the recipe's groups, lr scheduler, schedules) that the
    engine builds for a resolved ``experiment`` on one CPU worker, for tests of recipes; ``epochs``: the
    experiment's by default, and as many images as ``steps_per_epoch`` batches."""
    import torch

    from sslcore.engine.build import build_method, build_optimization
    from sslcore.engine.context import MethodContext

    batch, epochs = experiment["train"]["batch_size"], epochs or experiment["train"]["epochs"]
    context = MethodContext(world_size=1, rank=0, global_batch_size=batch, steps_per_epoch=steps_per_epoch,
                            epochs=epochs, device=torch.device("cpu"), dataset_size=batch * steps_per_epoch,
                            registry=registry)
    method = build_method(experiment, registry, context)
    return method, build_optimization(method, experiment, registry, steps_per_epoch, steps_per_epoch * epochs)


def built_slots(**components: Any) -> Any:
    """A :class:`sslcore.api.hookspecs.Slots` that hands a method's factory the given, already built
    components (``encoder=tiny_encoder(), loss=...``), for tests that construct a method directly: the test
    builds each with the sizes the method would ask for (a negative source's ``dim``)."""
    return _BuiltSlots(components)


class _BuiltSlots:
    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components

    def build(self, slot: str, **sizes: Any) -> Any:
        return self.components[slot]


def check_plugin(registry: Any, module: str, components: list[tuple[str, str]]) -> None:
    """Register the plugin ``module`` on ``registry``, run the contract on each ``(kind, name)`` it
    registers, and unregister it again."""
    registry.add_module(module)
    try:
        for kind, name in components:
            check_component(registry, kind, name)
    finally:
        registry.remove_plugin(module)
