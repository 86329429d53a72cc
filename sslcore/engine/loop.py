"""The training loop: one function, run by every Ray Train worker or in-process.

``train_loop_per_worker(spec)`` receives a plain dict (see :func:`make_spec`): the resolved experiment,
the plugin modules to load and the run folder. Each worker rebuilds the registry, the data pipeline and
the method from it, resumes from the latest checkpoint when there is one, and trains.

Reproducibility: checkpoints are taken at epoch boundaries, and every epoch seeds torch, numpy, Python
and the augmentation from ``(seed, epoch, rank)``, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sslcore.api.errors import ConfigError, TrainingError, UserError
from sslcore.engine.context import EvalContext, MethodContext
from sslcore.engine.data import MultiViewDataset, seed_worker
from sslcore.engine.session import CHECKPOINT_FILE, LocalSession, RaySession, Session
from sslcore.engine.tracking import Tracker, progress_bar
from sslcore.registry import SLOT_KINDS, Registry
from sslcore.toolkit.lars import build_optimizer

ERROR_FILE = "error.json"
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_spec(experiment: dict[str, Any], run_dir: Path, plugins: list[str], autoload: bool,
              source: str = "", launched_at: float | None = None, interactive: bool = False) -> dict[str, Any]:
    """The plain, picklable dict that every worker gets."""
    return {"experiment": experiment, "run_dir": str(run_dir), "plugins": plugins, "autoload": autoload,
            "source": source, "cwd": os.getcwd(), "launched_at": launched_at, "interactive": interactive}


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


def build_method(experiment: dict[str, Any], registry: Registry, context: MethodContext) -> torch.nn.Module:
    """Build the method of a resolved experiment with the components of its slots.

    A factory's ``ValueError`` (e.g. a queue size that does not fit the batch) becomes a config error
    naming the block.
    """
    method_block = experiment["method"]
    component = registry.get("method", method_block["name"])
    built: dict[str, Any] = {}
    for slot in component.extra.get("slots", {}):
        if slot == "augmentation":
            continue
        block = experiment[slot]
        kwargs: dict[str, Any] = {}
        if SLOT_KINDS[slot] == "negative_source":
            kwargs = {"dim": experiment["method"].get("dim", 128), "global_batch_size": context.global_batch_size,
                      "dataset_size": context.dataset_size}
        built[slot] = _build(registry, SLOT_KINDS[slot], slot, block, **kwargs)
    return _build(registry, "method", "method", method_block, context=context, **built)


def _build(registry: Registry, kind: str, slot: str, block: dict[str, Any], **kwargs: Any) -> Any:
    try:
        return registry.build(kind, block, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{slot}: {exc}") from None


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine decay to 0 (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def compile_submodules(method: torch.nn.Module) -> None:
    """``torch.compile`` each child of the method that holds parameters (encoders, heads), in place, so
    parameter names and checkpoints are unchanged. The method's own forward (queues, shuffles, gathers:
    data-dependent Python) stays eager."""
    for child in method.children():
        if next(child.parameters(), None) is not None:
            child.compile()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class Trainer:
    def __init__(self, spec: dict[str, Any], session: Session) -> None:
        self.spec, self.session = spec, session
        self.cfg: dict[str, Any] = spec["experiment"]
        self.train_cfg: dict[str, Any] = self.cfg["train"]
        self.run_dir = Path(spec["run_dir"])
        self.registry = Registry(autoload=spec["autoload"], modules=spec["plugins"])
        self.is_main = session.rank == 0
        self.device = session.device
        self.autocast_dtype = AUTOCAST_DTYPES[resolve_precision(self.train_cfg["precision"], self.device)]
        self.channels_last = self.train_cfg["channels_last"]
        self.bar = None  # a progress bar, made by fit() for a person at a terminal

    # -- set-up --------------------------------------------------------------------------------------

    def _threads(self) -> tuple[int, int]:
        cpus = self.cfg["scaling"]["cpus_per_worker"] or max(1, (os.cpu_count() or 1) //
                                                             self.cfg["scaling"]["num_workers"])
        threads = max(1, int(cpus))
        loader_workers = self.train_cfg["loader_workers"]
        if loader_workers is None:
            loader_workers = min(4, threads) if self.device.type == "cuda" else 0
        return threads, loader_workers

    def setup(self) -> None:
        threads, self.loader_workers = self._threads()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        seed_everything(epoch_seed(self.cfg["seed"], -1, self.session.rank))
        augmentation = _build(self.registry, "augmentation", "augmentation", self.cfg["augmentation"])
        self.augmentation = augmentation
        dataset = self.registry.build("dataset", self.cfg["data"])
        self.dataset = MultiViewDataset(dataset, augmentation)
        self.batch_size = self.train_cfg["batch_size"] // self.session.world_size
        self.generator = torch.Generator()
        # Each worker reads its own shard in an order set by (seed, epoch): the sampler is made here rather
        # than by Ray, whose default sampler ignores the experiment's seed.
        self.sampler = None
        if self.session.world_size > 1:
            self.sampler = DistributedSampler(self.dataset, num_replicas=self.session.world_size,
                                              rank=self.session.rank, shuffle=True, seed=self.cfg["seed"],
                                              drop_last=True)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.sampler is None,
                            sampler=self.sampler,
                            drop_last=True, num_workers=self.loader_workers, worker_init_fn=seed_worker,
                            generator=self.generator, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        self.loader = self.session.prepare_loader(loader)
        steps = len(self.loader)
        if steps == 0:
            raise TrainingError(f"data: {len(dataset)} images are fewer than one batch of {self.batch_size} per "
                                f"worker: lower train.batch_size or add images")
        cap = self.train_cfg["max_steps_per_epoch"]
        self.steps_per_epoch = min(steps, cap) if cap else steps
        self.epochs = self.train_cfg["epochs"]
        self.total_steps = self.steps_per_epoch * self.epochs
        self.eval_context = EvalContext(
            registry=self.registry, eval_transform=augmentation.eval, train_data=self.cfg["data"],
            device=self.device, batch_size=max(self.batch_size, 256), num_workers=self.loader_workers,
            channels_last=self.channels_last, autocast_dtype=self.autocast_dtype, run_dir=self.run_dir,
            labelled_transform=getattr(augmentation, "labelled", None))
        self.method_context = MethodContext(
            world_size=self.session.world_size, rank=self.session.rank,
            global_batch_size=self.train_cfg["batch_size"], steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs, device=self.device, run_dir=self.run_dir, registry=self.registry,
            eval_context=self.eval_context, dataset_size=len(self.dataset))
        try:
            method = build_method(self.cfg, self.registry, self.method_context)
        except ConfigError as exc:
            raise ConfigError(*(f"{self.spec['source'] or 'experiment'}: {line}" for line in exc.lines)) from None
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.train_cfg["compile"]:
            compile_submodules(method)
        self.model = self.session.prepare_model(method)
        self.method = unwrap(self.model)
        # methods with per-sample state (PCL) take the batch's dataset indices
        self.pass_index = "index" in inspect.signature(self.method.forward).parameters
        self.optimizer = build_optimizer(self.method, self.train_cfg["optimizer"])
        warmup_steps = round(self.train_cfg["warmup_epochs"] * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, self.total_steps, self.train_cfg["schedule"]))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.evaluators = [_build(self.registry, "evaluator", f"evaluators[{i}]", block)
                           for i, block in enumerate(self.cfg["evaluators"])]
        self.start_epoch, self.step, aim_hash = 0, 0, None
        with self.session.latest_checkpoint() as folder:
            if folder is not None:
                aim_hash = self.load_checkpoint(folder / CHECKPOINT_FILE)
        self.tracker = None
        if self.is_main:
            aim_cfg = self.cfg["tracking"]["aim"]
            repo = None
            if aim_cfg is not None:
                repo = aim_cfg["repo"] or str(Path(self.cfg["output_dir"]).resolve() / ".aim")
            self.tracker = Tracker(self.run_dir, self.cfg["name"], repo,
                                   aim_cfg["experiment"] if aim_cfg else None, self.cfg, run_hash=aim_hash)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "step": self.step,
                "aim_run_hash": self.tracker.run_hash if self.tracker else None}

    def load_checkpoint(self, path: Path) -> str | None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): "
                                f"delete {path.parent} to resume from the checkpoint before it") from None
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        return state.get("aim_run_hash")

    def save_checkpoint(self, epoch: int, metrics: dict[str, Any]) -> None:
        folder = None
        if self.is_main:
            folder = self.session.temp_checkpoint_dir()
            torch.save(self.state(epoch), folder / CHECKPOINT_FILE)
        self.session.report(metrics, folder)

    # -- training ------------------------------------------------------------------------------------

    def _images(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return [v.to(self.device, non_blocking=True, memory_format=memory_format) for v in views]

    def train_step(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of views already on the device; returns the method's outputs.
        ``index``: the images' dataset indices, passed on to methods whose ``forward`` takes ``index``."""
        kwargs = {"index": index.to(self.device, non_blocking=True)} if self.pass_index and index is not None else {}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.model(views, **kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return out

    def train_epoch(self, epoch: int) -> dict[str, float]:
        seed = epoch_seed(self.cfg["seed"], epoch, self.session.rank)
        seed_everything(seed)
        self.generator.manual_seed(seed)
        self.dataset.set_seed(seed)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        start_metrics = self.epoch_start(epoch)
        self.model.train()
        bar = self.bar  # None unless a person watches at a terminal
        log_every = self.train_cfg["log_every_steps"]
        # losses are summed on the device and read once per log window: no sync per step
        epoch_sum, window_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        window_steps = images = window_images = 0
        epoch_start = window_start = time.perf_counter()
        for i, (views, _, index) in enumerate(itertools.islice(self.loader, self.steps_per_epoch)):
            out = self.train_step(self._images(views), index)
            loss = out["loss"]
            if self.step == 1 and self.is_main and self.spec.get("launched_at"):
                startup = time.time() - self.spec["launched_at"]
                print(f"sslcore: first step {startup:.1f} s after start", flush=True)
                self._write_summary({"startup_seconds": startup})
            window_sum += loss.detach()
            window_steps += 1
            n = views[0].shape[0] * self.session.world_size
            images += n
            window_images += n
            if window_steps == log_every or i + 1 == self.steps_per_epoch:
                window_loss = (window_sum / window_steps).item()
                self._check_finite(window_loss, epoch)
                now = time.perf_counter()
                metrics = {"loss": window_loss, "lr": self.scheduler.get_last_lr()[0],
                           "img_per_s": window_images / (now - window_start)}
                metrics.update({k: float(v) for k, v in out.items() if k != "loss"})
                epoch_sum += window_sum
                window_sum.zero_()
                window_start, window_steps, window_images = now, 0, 0
                if self.tracker is not None:
                    self.tracker.log(metrics, step=self.step, epoch=epoch, subset="train")
                if bar is not None:
                    bar.set_description(f"epoch {epoch + 1}/{self.epochs} loss {window_loss:.4f} "
                                        f"{metrics['img_per_s']:.0f} img/s")
            if bar is not None:
                bar.update(1)
        elapsed = time.perf_counter() - epoch_start
        return {"epoch": epoch, "step": self.step, "loss": float(epoch_sum) / (i + 1),
                "img_per_s": images / elapsed, "epoch_seconds": elapsed, **start_metrics}

    def epoch_start(self, epoch: int) -> dict[str, float]:
        """The method's ``on_epoch_start`` (an E-step); its scalar metrics are returned for the epoch's line,
        and all it returns (distributions too) goes to the tracker."""
        if not hasattr(self.method, "on_epoch_start"):
            return {}
        metrics = self.method.on_epoch_start(epoch, self.method_context) or {}
        if self.tracker is not None and metrics:
            self.tracker.log(metrics, step=self.step, epoch=epoch, subset="epoch_start")
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def train_end(self) -> None:
        """The method's ``on_train_end`` (final pictures), on every worker; what it returns is tracked."""
        if not hasattr(self.method, "on_train_end"):
            return
        metrics = self.method.on_train_end(self.method_context) or {}
        if self.tracker is not None and metrics:
            self.tracker.log(metrics, step=self.step, epoch=self.epochs - 1, subset="train_end")

    def _check_finite(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at epoch {epoch + 1}, step {self.step} of {self.spec['source'] or 'the run'}: "
                f"lower train.optimizer.lr or use train.precision: fp32; checkpoints up to the previous epoch "
                f"are kept in {self.run_dir} and --resume continues from them")

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
        # one bar for the whole run, for a person at a terminal; logs get the per-epoch lines only
        self.bar = None
        if self.is_main and self.cfg["tracking"]["progress_bar"] and self.spec.get("interactive"):
            self.bar = progress_bar(self.total_steps, under_ray=isinstance(self.session, RaySession))
            self.bar.update(self.start_epoch * self.steps_per_epoch)
        if self.is_main and self.start_epoch > 0:
            print(f"sslcore: resuming {self.run_dir} at epoch {self.start_epoch + 1}", flush=True)
        last: dict[str, Any] = {}
        if self.train_cfg["eval_at_start"] and self.start_epoch == 0:
            initial = self.evaluate(-1, final=True)
            if self.is_main and initial:
                print("sslcore: before training (random-init floor): " + _fmt(initial), flush=True)
                self._write_summary({"initial": initial})
        every = self.cfg["checkpoint"]["every_epochs"]
        for epoch in range(self.start_epoch, self.epochs):
            metrics = self.train_epoch(epoch)
            final = epoch + 1 == self.epochs
            metrics.update(self.evaluate(epoch, final=final))
            if self.is_main:
                print(f"sslcore: epoch {epoch + 1}/{self.epochs} " + _fmt(metrics), flush=True)
            if final or (epoch + 1) % every == 0:
                self.save_checkpoint(epoch, metrics)
            else:
                self.session.report(metrics, None)
            last = metrics
        if self.bar is not None:
            self.bar.close()
        self.train_end()
        if self.is_main:
            torch.save(self.method.backbone.state_dict(), self.run_dir / "backbone.pt")
            self._write_summary({"final": last})
            if self.tracker is not None:
                self.tracker.close()
        return last

    def _write_summary(self, update: dict[str, Any]) -> None:
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(update)
        path.write_text(json.dumps(summary, indent=2))


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                    if k not in ("epoch",))


def train_loop_per_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The loop each Ray Train worker runs (also called in-process for ``scaling.backend: local``)."""
    backend = spec["experiment"]["scaling"]["backend"]
    run_dir = Path(spec["run_dir"])
    if os.path.isdir(spec.get("cwd", "")):
        os.chdir(spec["cwd"])  # Ray starts workers elsewhere; relative paths in the file mean the user's folder
    if backend == "ray":
        session: Session = RaySession()
    else:
        session = LocalSession(run_dir, keep=spec["experiment"]["checkpoint"]["keep"],
                               use_gpu=spec["experiment"]["scaling"]["use_gpu"])
    try:
        return Trainer(spec, session).fit()
    except UserError as exc:
        # Ray wraps worker exceptions; the driver reads this file to print the user's error plainly.
        (run_dir / ERROR_FILE).write_text(json.dumps({"rank": session.rank, "lines": exc.lines}))
        raise
