"""The training loop: one function, run by every Ray Train worker or in-process.

``train_loop_per_worker(spec)`` receives a :class:`WorkerSpec`: the resolved experiment, the plugin modules
to load and the run folder. Each worker rebuilds the registry, then its parts (``sslcore.engine.build``:
data, method, optimizer and schedules), resumes from the latest checkpoint when there is one, and trains.

Reproducibility: every epoch seeds torch, numpy and Python from ``(seed, epoch, rank)``, each image's
augmentation from ``(epoch seed, index)``, and the sampler can start an epoch at any batch; a checkpoint
(at epoch ends, every ``checkpoint.every_steps`` / ``every_minutes``, or on a stop request) holds the
position and every worker's random states, so a run resumed from it repeats the uninterrupted one bit for
bit; every schedule is a function of the optimizer step, which the checkpoint restores.

Stopping: a stop request (``RunDir.request_stop``: the driver's SIGTERM handler) is polled at every step
boundary, agreed on by all workers, and answered by a checkpoint and a return with ``preempted`` set.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslcore.api.errors import TrainingError, UserError
from sslcore.api.hookspecs import PatchEncoder
from sslcore.api.recipe import TrainingStep
from sslcore.config import BlockError, Loc, located_error
from sslcore.engine.build import build, build_data, build_method, build_optimization, check_input_size
from sslcore.engine.console import Console, ConsoleFile, Lines, LinesHandler
from sslcore.engine.context import EvalContext, MethodContext
from sslcore.engine.data import item_seed
from sslcore.engine.rundir import RunDir
from sslcore.engine.session import LocalSession, RaySession, Session, TuneSession
from sslcore.engine.tracking import Tracker
from sslcore.registry import Registry

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker (picklable): the resolved experiment and where it comes from."""

    experiment: dict[str, Any]  # as in the run's config.yaml
    run_dir: str
    plugins: tuple[str, ...] = ()  # modules to load as plugins (-p and the file's plugins:)
    autoload: bool = True  # load installed plugins through their entry points
    source: str = ""  # the experiment file, for errors
    lines: dict[Loc, int] = field(default_factory=dict)  # the line of each key of the file, for errors
    cwd: str = ""  # the user's folder: relative paths in the file are relative to it
    cpus_per_worker: float | None = None  # default: the machine's CPUs / workers
    launched_at: float | None = None  # time.time() when the command started
    interactive: bool = False  # a person watches at a terminal: draw a progress bar
    verbose: bool = False  # show Ray's and Ray Train's own output on the console
    backend: str = "local"  # where the loop runs: "local" (this process), "ray" (a Ray Train worker) or "tune"
    sweep_metric: str = ""  # backend "tune": the metric the sweep prunes on (the epochs that carry it are reported)


class Stopped(Exception):
    """A stop request was answered with a checkpoint; the loop returns (``preempted``)."""


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); then bf16 autocast beats fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` with ``auto`` replaced by what is fastest on ``device`` (see bench/results.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**31


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python random states, in types a weights-only
    ``torch.load`` reads back."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def compile_submodules(method: torch.nn.Module) -> None:
    """``torch.compile`` each child of the method that holds parameters (encoders, heads), in place, so
    parameter names and checkpoints are unchanged; of a ViT also its ``blocks``, which a method may run
    without the ViT's forward (MAE runs the encoder's pieces on the visible patches). The method's own
    forward (queues, shuffles, gathers: data-dependent Python) stays eager."""
    for child in method.children():
        if next(child.parameters(), None) is not None:
            child.compile()
            if isinstance(child, PatchEncoder):
                child.blocks.compile()


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float, mode: str) -> None:
    """Clip the gradients' L2 norm to ``max_norm``: of all of them together (``total``, torch's
    ``clip_grad_norm_``) or of each parameter's on its own (``per_parameter``, DINO's ``utils.clip_gradients``:
    a gradient of norm n > max_norm is scaled by max_norm / (n + 1e-6))."""
    if mode == "total":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad, norm in zip(grads, torch._foreach_norm(grads)):
        grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class Trainer:
    def __init__(self, spec: WorkerSpec, session: Session, console: Lines) -> None:
        self.spec, self.session, self.console = spec, session, console
        self.cfg: dict[str, Any] = spec.experiment
        self.train_cfg: dict[str, Any] = self.cfg["train"]
        self.run = RunDir(spec.run_dir)
        self.registry = Registry(autoload=spec.autoload, modules=spec.plugins)
        self.is_main = session.rank == 0
        self.device = session.device
        self.autocast_dtype = AUTOCAST_DTYPES[resolve_precision(self.train_cfg["precision"], self.device)]
        self.channels_last = self.train_cfg["channels_last"]
        self.show_progress = False  # the bar's position goes to the console (rank 0, tracking.progress_bar)

    # -- set-up --------------------------------------------------------------------------------------

    def _threads(self) -> tuple[int, int]:
        """(torch threads, DataLoader workers) from the CPUs this worker has (Ray's ``resources_per_worker``, or
        the machine's share): on a GPU every CPU but the one feeding the device decodes (or augments); on a
        CPU the training step takes them all and the loader runs in the process."""
        cpus = self.spec.cpus_per_worker or max(1, (os.cpu_count() or 1) // self.cfg["scaling"]["num_workers"])
        threads = max(1, int(cpus))
        loader_workers = self.train_cfg["loader_workers"]
        if loader_workers is None:
            loader_workers = max(1, threads - 1) if self.device.type == "cuda" else 0
        return threads, loader_workers

    def setup(self) -> None:
        try:
            self._build()
        except BlockError as exc:
            raise located_error(self.spec.source or "experiment", self.spec.lines, exc.loc, exc.message) from None
        self.start_epoch, self.start_batch, self.step, aim_hash = 0, 0, 0, None
        self.resumed_state: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.metrics_records = 0  # the records metrics.jsonl holds at the checkpoint resumed from
        resumed = self.run.resume_state(report=self.is_main)
        if resumed is not None:
            aim_hash = self.load_checkpoint(*resumed)
        self.tracker = None
        if self.is_main:
            self.run.truncate_metrics(self.metrics_records)  # the steps after the checkpoint are trained again
            self.run.remove_partial_checkpoints()  # a writer killed mid-checkpoint leaves its temporary folder
            self.run.write_config(self.cfg)
            views_on = str(self.device) if self.data.on_device else "loader"
            group = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            self.run.update_summary({"views_made_on": views_on, "device": str(self.device), "process_group": group,
                                     "backend": self.spec.backend})
            if self.data.on_device:
                decoders = (f"{self.loader_workers} loader workers decode" if self.loader_workers
                            else "the loader decodes in this process")
                self.console.line(f"sslcore: augmentation '{self.cfg['augmentation']['name']}' runs batched on "
                                  f"{self.device}; {decoders}")
            aim_cfg = self.cfg["tracking"]["aim"]
            repo = None
            if aim_cfg is not None:
                repo = aim_cfg["repo"] or str(Path(self.cfg["output_dir"]).resolve() / ".aim")
            self.tracker = Tracker(self.run.metrics_file, self.cfg["name"], repo,
                                   aim_cfg["experiment"] if aim_cfg else None, self.cfg, run_hash=aim_hash)

    def _build(self) -> None:
        threads, self.loader_workers = self._threads()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        seed_everything(epoch_seed(self.cfg["seed"], -1, self.session.rank))
        self.data = build_data(self.cfg, self.registry, self.session.rank, self.session.world_size,
                               self.loader_workers, pin_memory=self.device.type == "cuda", device=self.device)
        self.view_generator = torch.Generator(device=self.device)  # the device path's draws, seeded per batch
        self.loader = self.session.prepare_loader(self.data.loader)
        steps = len(self.loader)
        if steps == 0:
            raise TrainingError(f"data: {len(self.data.dataset)} images are fewer than one batch of "
                                f"{self.data.batch_size} per worker: lower train.batch_size or add images")
        cap = self.train_cfg["max_steps_per_epoch"]
        self.steps_per_epoch = min(steps, cap) if cap else steps
        self.epochs = self.train_cfg["epochs"]
        self.total_steps = self.steps_per_epoch * self.epochs
        augmentation = self.data.augmentation
        self.eval_context = EvalContext(
            registry=self.registry, eval_transform=augmentation.eval, train_data=self.cfg["data"],
            device=self.device, batch_size=max(self.data.batch_size, 256), num_workers=self.loader_workers,
            channels_last=self.channels_last, autocast_dtype=self.autocast_dtype, run_dir=self.run.path,
            labelled_transform=augmentation.labelled)
        self.method_context = MethodContext(
            world_size=self.session.world_size, rank=self.session.rank,
            global_batch_size=self.train_cfg["batch_size"], steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs, device=self.device, dataset_size=len(self.data.dataset), run_dir=self.run.path,
            registry=self.registry, eval_context=self.eval_context)
        method = build_method(self.cfg, self.registry, self.method_context)
        check_input_size(method, augmentation)
        method = self._sync_batchnorm(method)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.train_cfg["compile"]:
            compile_submodules(method)
        self.model = self.session.prepare_model(method)
        self.method = unwrap(self.model)
        self.optimization = build_optimization(self.method, self.cfg, self.registry, self.steps_per_epoch,
                                               self.total_steps)
        self.optimizer, self.scheduler = self.optimization.optimizer, self.optimization.scheduler
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.schedules = self.method.schedules()
        self.values: dict[str, float] = {}  # the scheduled hyperparameters at the last step
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.evaluators = [build(self.registry, "evaluator", ("evaluators", i), block)
                           for i, block in enumerate(self.cfg["evaluators"])]

    def _sync_batchnorm(self, method: torch.nn.Module) -> torch.nn.Module:
        """``train.sync_batchnorm``: BatchNorm layers as SyncBatchNorm over the workers' process group, on GPU
        workers; CPU workers (where torch's SyncBatchNorm does not run) keep per-worker statistics, said once."""
        if not self.train_cfg["sync_batchnorm"] or self.session.world_size == 1:
            return method
        if self.device.type != "cuda":
            if self.is_main:
                self.console.line(f"sslcore: train.sync_batchnorm: BatchNorm statistics stay per worker on the "
                                  f"{self.session.world_size} CPU workers (torch's SyncBatchNorm runs on GPUs only)")
            return method
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state(self, epoch: int, batches: int, sums: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds: ``batches`` of ``epoch`` are done (all of them at an epoch end); ``sums``:
        the epoch's running totals; the random states are every worker's (a collective: all ranks call it)."""
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "batches": batches, "step": self.step, "sums": sums,
                "random_states": self.session.gather(random_states()), "world_size": self.session.world_size,
                "dataset_size": len(self.data.dataset),
                "metrics_records": self.tracker.records if self.tracker else 0,
                "aim_run_hash": self.tracker.run_hash if self.tracker else None}

    def load_checkpoint(self, path: Path, state: dict[str, Any]) -> str | None:
        if state["dataset_size"] != len(self.data.dataset):
            raise TrainingError(f"checkpoint {path} was trained on {state['dataset_size']} images and the data "
                                f"block now gives {len(self.data.dataset)}: resume with the run's data")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        batches = state.get("batches")  # absent in checkpoints of sslcore < 0.3: taken at epoch ends
        if batches is None or batches >= self.steps_per_epoch:
            self.start_epoch, self.start_batch = state["epoch"] + 1, 0
        else:
            self.start_epoch, self.start_batch = state["epoch"], batches
            self.resumed_state = {"sums": state["sums"], "random_states": state["random_states"]}
        self.metrics_records = state.get("metrics_records", 0)
        self.resumed_from = path
        return state.get("aim_run_hash")

    def save_checkpoint(self, epoch: int, batches: int, sums: dict[str, Any] | None = None) -> None:
        """A checkpoint after ``batches`` of ``epoch``, written by rank 0 (every rank takes part)."""
        state = self.state(epoch, batches, sums or {})
        if self.is_main:
            self.run.write_checkpoint(state, self.step, keep=self.cfg["checkpoint"]["keep"])
        self.last_checkpoint = time.monotonic()

    def _checkpoint_due(self) -> tuple[bool, bool]:
        """(stop, checkpoint) at this step boundary, the same on every worker: a stop request, every_steps,
        every_minutes (rank 0's clock)."""
        every = self.cfg["checkpoint"]
        stop = self.is_main and self.run.stop_requested()
        due = bool(every["every_steps"]) and self.step % every["every_steps"] == 0
        minutes = every["every_minutes"]
        due = due or (self.is_main and minutes is not None and time.monotonic() - self.last_checkpoint >= minutes * 60)
        if self.session.world_size > 1:
            stop, due = self.session.agree(stop, due)
        return stop, due or stop

    # -- training ------------------------------------------------------------------------------------

    def _images(self, views: Any, epoch: int, batch: int) -> list[torch.Tensor]:
        """The batch's views on the device: moved there, or (device path) made there from the decoded images,
        with draws seeded by ``(epoch seed, batch)`` so that a resumed epoch repeats them."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.data.on_device:
            images, sizes = views
            self.view_generator.manual_seed(item_seed(epoch_seed(self.cfg["seed"], epoch, self.session.rank), batch))
            views = self.data.augmentation.device_views(images.to(self.device, non_blocking=True),
                                                        sizes.to(self.device, non_blocking=True),
                                                        self.view_generator)
            return [v.contiguous(memory_format=memory_format) for v in views]
        return [v.to(self.device, non_blocking=True, memory_format=memory_format) for v in views]

    def train_step(self, views: list[torch.Tensor], index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of views already on the device; returns the method's outputs.
        ``index``: the images' dataset indices, passed on to methods that declare ``uses_index``."""
        step = TrainingStep(index=self.step, epoch=epoch, steps_per_epoch=self.steps_per_epoch,
                            total_steps=self.total_steps,
                            values={name: schedule.at(self.step, self.steps_per_epoch, self.total_steps)
                                    for name, schedule in self.schedules.items()})
        self.method.on_step_start(step)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if self.method.uses_index:
                out = self.model(views, index.to(self.device, non_blocking=True))
            else:
                out = self.model(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the hooks and the clipping see the true gradients
        if self.optimization.grad_clip is not None:
            clip_gradients(self.parameters, self.optimization.grad_clip, self.optimization.grad_clip_mode)
        self.method.before_optimizer_step(step)
        if self.optimization.weight_decay is not None:
            weight_decay = self.optimization.weight_decay.at(self.step, self.steps_per_epoch, self.total_steps)
            for group in self.optimizer.param_groups:
                if group["scheduled_weight_decay"]:
                    group["weight_decay"] = weight_decay
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_optimizer_step(step)
        self.step += 1
        self.values = dict(step.values)
        return out

    def _learning_rates(self) -> dict[str, float]:
        """The lr of the first group as ``lr``, of each other group as ``lr_<group>``."""
        rates = self.scheduler.get_last_lr()
        names = self.optimization.group_names
        return {"lr": rates[0], **{f"lr_{name}": rate for name, rate in zip(names[1:], rates[1:])}}

    def train_epoch(self, epoch: int, start: int = 0) -> dict[str, float]:
        """Train ``epoch`` from batch ``start`` (> 0: resumed inside it, from ``self.resumed_state``)."""
        seed = epoch_seed(self.cfg["seed"], epoch, self.session.rank)
        seed_everything(seed)
        self.data.generator.manual_seed(seed)
        self.data.dataset.set_seed(seed)
        self.data.sampler.set_epoch(epoch, start)
        # losses are summed on the device and read once per log window: no sync per step
        epoch_sum = torch.zeros((), device=self.device)
        images, elapsed = 0, 0.0
        if start == 0:
            start_metrics = self.epoch_start(epoch)
        else:  # the E-step's results are in the method's state; the random states are where they were
            sums = self.resumed_state["sums"]
            epoch_sum += sums["loss"].to(self.device)
            images, elapsed, start_metrics = sums["images"], sums["seconds"], sums["start_metrics"]
            states = self.resumed_state["random_states"]
            if len(states) == self.session.world_size:
                set_random_states(states[self.session.rank])
            elif self.is_main:
                self.console.line(f"sslcore: the checkpoint was taken with {len(states)} workers, this run has "
                                  f"{self.session.world_size}: the rest of epoch {epoch + 1} draws other random "
                                  "numbers than the uninterrupted run would")
            self.resumed_state = {}
        self.model.train()
        log_every = self.train_cfg["log_every_steps"]
        window_sum = torch.zeros((), device=self.device)
        window_steps = window_images = 0
        epoch_start = window_start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}

        def log_window(batches: int) -> None:
            nonlocal window_start, window_steps, window_images, description
            window_loss = self.session.mean(window_sum).item() / window_steps
            self._check_finite(window_loss, epoch)
            now = time.perf_counter()
            metrics = {"loss": window_loss, **self._learning_rates(),
                       "img_per_s": window_images / (now - window_start), **self.values}
            metrics.update({k: float(v) for k, v in out.items() if k != "loss"})
            window_sum.zero_()
            window_start, window_steps, window_images = now, 0, 0
            if self.tracker is not None:
                self.tracker.log(metrics, step=self.step, epoch=epoch, subset="train")
            description = f"epoch {epoch + 1}/{self.epochs} loss {window_loss:.4f} {metrics['img_per_s']:.0f} img/s"

        batches = start
        description = f"epoch {epoch + 1}/{self.epochs}"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for views, _, index in itertools.islice(self.loader, self.steps_per_epoch - start):
            out = self.train_step(self._images(views, epoch, batches), index, epoch)
            batches += 1
            if self.step == 1 and self.is_main and self.spec.launched_at:
                startup = time.time() - self.spec.launched_at
                evaluated = (f" ({self.initial_eval_seconds:.1f} s of it the evaluation before training)"
                             if self.initial_eval_seconds else "")
                self.console.line(f"sslcore: first step {startup:.1f} s after start{evaluated}")
                self.run.update_summary({"startup_seconds": startup})
            loss = out["loss"].detach()
            window_sum += loss
            epoch_sum += loss
            window_steps += 1
            n = index.shape[0] * self.session.world_size
            images += n
            window_images += n
            if batches % log_every == 0 or batches == self.steps_per_epoch:
                log_window(batches)
            if self.show_progress:
                self.console.progress(self.step, self.total_steps, description)
            if batches < self.steps_per_epoch:
                stop, due = self._checkpoint_due()
                if due:
                    if window_steps:
                        log_window(batches)  # metrics.jsonl is complete up to the checkpoint
                    seconds = elapsed + time.perf_counter() - epoch_start
                    self.save_checkpoint(epoch, batches, {"loss": epoch_sum.cpu(), "images": images,
                                                          "seconds": seconds, "start_metrics": start_metrics})
                if stop:
                    raise Stopped
        elapsed += time.perf_counter() - epoch_start
        epoch_loss = self.session.mean(epoch_sum).item() / (batches or 1)
        memory = {}
        if self.device.type == "cuda":  # this worker's peak in the epoch (of the part trained, when resumed)
            memory = {"gpu_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        return {"epoch": epoch, "step": self.step, "loss": epoch_loss,
                "img_per_s": images / elapsed, "epoch_seconds": elapsed, **memory, **start_metrics}

    def epoch_start(self, epoch: int) -> dict[str, float]:
        """The method's ``on_epoch_start`` (an E-step); its scalar metrics are returned for the epoch's line,
        and all it returns (distributions too) goes to the tracker."""
        metrics = self.method.on_epoch_start(epoch, self.method_context) or {}
        if self.tracker is not None and metrics:
            self.tracker.log(metrics, step=self.step, epoch=epoch, subset="epoch_start")
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def train_end(self) -> None:
        """The method's ``on_train_end`` (final pictures), on every worker; what it returns is tracked."""
        metrics = self.method.on_train_end(self.method_context) or {}
        if self.tracker is not None and metrics:
            self.tracker.log(metrics, step=self.step, epoch=self.epochs - 1, subset="train_end")

    def _check_finite(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at epoch {epoch + 1}, step {self.step} of {self.spec.source or 'the run'}: "
                f"lower train.optimizer.lr or use train.precision: fp32; the checkpoints taken before it are "
                f"kept in {self.run.path} and --resume continues from the last")

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        results: dict[str, float] = {}
        if not self.is_main:
            return results
        due = [(i, ev) for i, ev in enumerate(self.evaluators)
               if final or (ev.every_epochs and (epoch + 1) % ev.every_epochs == 0)]
        if not due:
            return results
        backbone = self.method.backbone
        was_training = backbone.training
        backbone.eval()
        self.eval_context.epoch = epoch
        for i, evaluator in due:
            for key, value in evaluator.evaluate(backbone, self.eval_context).items():
                # two evaluators with the same metric (knn on two test sets): the later is named by its index
                results[f"{key}@{i}" if key in results else key] = value
        backbone.train(was_training)
        if self.tracker is not None:
            self.tracker.log(results, step=self.step, epoch=epoch, subset="eval")
        return results

    def fit(self) -> dict[str, Any]:
        self.setup()
        self.last_checkpoint = time.monotonic()
        done = self.start_epoch * self.steps_per_epoch + self.start_batch
        # one bar for the whole run, for a person at a terminal; in a log no bar, so no positions sent either
        self.show_progress = self.is_main and self.cfg["tracking"]["progress_bar"] and self.spec.interactive
        if self.is_main and self.resumed_from is not None:
            where = f"epoch {self.start_epoch + 1}" + (f", batch {self.start_batch + 1}" if self.start_batch else "")
            self.console.line(f"sslcore: resuming {self.run.path} at {where} (step {self.step}) from "
                              f"{self.resumed_from}")
        last: dict[str, Any] = {}
        self.initial_eval_seconds = 0.0
        if self.train_cfg["eval_at_start"] and done == 0:
            began = time.perf_counter()
            initial = self.evaluate(-1, final=True)
            self.initial_eval_seconds = time.perf_counter() - began
            if self.is_main and initial:
                self.console.line("before training (random-init floor): " + _fmt(initial))
                self.run.update_summary({"initial": initial, "initial_eval_seconds": self.initial_eval_seconds})
        every = self.cfg["checkpoint"]["every_epochs"]
        try:
            for epoch in range(self.start_epoch, self.epochs):
                metrics = self.train_epoch(epoch, self.start_batch if epoch == self.start_epoch else 0)
                final = epoch + 1 == self.epochs
                metrics.update(self.evaluate(epoch, final=final))
                if self.is_main:
                    self.console.line(epoch_line(epoch, self.epochs, metrics))
                stop, due = self._checkpoint_due()
                stop = stop and not final
                if final or due or (epoch + 1) % every == 0:
                    self.save_checkpoint(epoch, self.steps_per_epoch)
                self.session.report(metrics)
                last = metrics
                if stop:
                    raise Stopped
        except Stopped:
            self.console.close()
            if self.tracker is not None:
                self.tracker.close()
            if self.is_main:
                self.console.line(f"sslcore: stopped at step {self.step} on request; checkpoint written")
            result = {"preempted": 1.0, "step": self.step}
            self.session.report(result)
            return result
        self.console.close()
        self.train_end()
        if self.is_main:
            torch.save(self.method.backbone.state_dict(), self.run.backbone_file)
            self.run.update_summary({"final": last})
            if self.tracker is not None:
                self.tracker.close()
        return last


def _fmt(metrics: dict[str, Any]) -> str:
    """``knn_top1 0.3 knn_top5 0.71``: each metric by its name, 4 significant digits."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any]) -> str:
    """An epoch's line: ``epoch 3/15  loss 4.8124  331 img/s  14.9 s  knn_top1 0.35``, then any other
    metric of the method or the evaluators by its name."""
    rest = {k: v for k, v in metrics.items() if k not in ("epoch", "step", "loss", "img_per_s", "epoch_seconds")}
    return (f"epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  {metrics['img_per_s']:.0f} img/s  "
            f"{metrics['epoch_seconds']:.1f} s" + (f"  {_fmt(rest)}" if rest else ""))


def train_loop_per_worker(spec: WorkerSpec) -> dict[str, Any]:
    """The loop each Ray Train worker runs (also called in-process for ``scaling.backend: local``).

    On Ray, a user error (a NaN loss, bad data) is written to the run folder for the driver to print as one
    line, and is not retried: a single worker returns; of several, the one that hit it raises (so that the
    others are not left waiting in a collective), and when Ray Train restarts the group every worker of the
    new attempt finds the error and returns at once."""
    run = RunDir(spec.run_dir)
    if os.path.isdir(spec.cwd):
        os.chdir(spec.cwd)  # Ray starts workers elsewhere; relative paths in the file mean the user's folder
    if spec.backend == "local":
        session: Session = LocalSession(use_gpu=spec.experiment["scaling"]["use_gpu"])
        console = Console(interactive=spec.interactive)
        try:
            return Trainer(spec, session, console).fit()
        finally:
            console.close()
    if spec.backend == "tune":  # a trial of sslcore sweep: its console is the run's console.jsonl, as on Ray
        session = TuneSession(spec.experiment["scaling"]["use_gpu"], spec.run_dir, spec.sweep_metric,
                              spec.experiment["train"]["epochs"])
        lines = ConsoleFile(run.console_file)
        warnings = LinesHandler(lines)
        logging.getLogger("sslcore").addHandler(warnings)
        try:
            return Trainer(spec, session, lines).fit()
        finally:
            logging.getLogger("sslcore").removeHandler(warnings)
    if run.read_error() is not None:
        return {"sslcore_error": 1.0}
    session = RaySession()
    # the driver draws this file (sslcore.engine.console); the worker's own stdout stays in Ray's logs
    lines = ConsoleFile(run.console_file)
    warnings = LinesHandler(lines)
    logging.getLogger("sslcore").addHandler(warnings)
    try:
        return Trainer(spec, session, lines).fit()
    except UserError as exc:
        run.write_error(session.rank, exc.lines)
        if session.world_size > 1:
            raise
        return {"sslcore_error": 1.0}
    finally:
        logging.getLogger("sslcore").removeHandler(warnings)
