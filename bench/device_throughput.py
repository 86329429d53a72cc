"""Throughput of MoCo v2 training with the views made on the CPU or on the training device, against the model
alone and lightly 1.6 at its defaults: images/s, GPU memory and GPU utilisation per row. Not a test: it prints
ratios measured side by side in one run (medians of --reps reps) and asserts no time.

Rows of each model, run in this order in every rep:
- model_only: sslcore's Trainer.train_step on pre-made tensors of the views' shapes, already on the device;
- cpu_aug: end to end, Trainer.train_epoch over its loader with augmentation.device false (the loader workers
  decode and make the views with albumentations);
- device_aug: the same with augmentation.device true (the workers only decode; sslcore.toolkit.device_views
  makes the views batched on the training device);
- lightly: bench/lightly_moco.py at lightly's defaults (fp32, contiguous, MoCoV2Transform in the loader
  workers) in lightly's venv, with as many loader workers as sslcore's rows.

Models:
- resnet18_cifar32: ResNet-18 with the CIFAR stem, 32 px views of the CIFAR-10 train JPEGs (harness.experiment:
  head 512-2048-128, queue 4096, tau 0.2, SGD; shuffle_bn auto, as end_to_end.py);
- vit_s16_224: ViT-S/16 (encoder vit_small, image_size 224, patch_size 16; shuffle_bn off: it has no BatchNorm),
  224 px views of data_pipeline.jpeg_folder's JPEGs (CIFAR-10 train images upscaled once to 256-500 px a side);
  lightly's side is lightly_moco.py --model vit_s16 (timm's ViT-S/16 when timm is installed, else torchvision's);
- resnet18_224: ResNet-18 with the standard stem, 224 px views of the same JPEGs: the cheaper 224 px model for
  the CPU (1.8 GFLOPs a forward, ViT-S/16 4.6); no lightly row.

sslcore runs at its defaults for the device (train.precision auto, channels_last; loader workers from the CPUs:
all but one on a GPU, none on a CPU) unless --workers. GPU memory: torch.cuda.max_memory_allocated over the
timed steps (of the timed epoch, end to end), of this process: the weights and optimizer state of the model's
other sslcore trainer (a few hundred MB) are included; lightly's is its own process's. GPU utilisation: the mean
of nvidia-smi's utilization.gpu, polled in a thread, over the samples taken inside the timed windows. An
end-to-end epoch starts its loader workers afresh (Trainer.train_epoch), and the timed epoch includes that start,
as end_to_end.py's does.

    python bench/device_throughput.py --device cuda --out bench/results/device_check
    python bench/device_throughput.py --device cpu --models resnet18_cifar32 resnet18_224 \\
        --rows model_only cpu_aug device_aug --batch resnet18_cifar32=256 resnet18_224=64 --steps 3 --reps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import CIFAR, HERE, cpu_name, experiment, make_trainer, merge

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
ROWS = {"model_only": "model only", "cpu_aug": "end to end, CPU augmentation",
        "device_aug": "end to end, device augmentation", "lightly": "lightly 1.6 at its defaults"}


@dataclass(frozen=True)
class Model:
    title: str
    size: int  #: side of the views
    encoder: dict[str, Any]  #: the encoder block, in place of harness.experiment()'s
    overrides: dict[str, Any]  #: merged into harness.experiment()
    jpegs: bool  #: data_pipeline.jpeg_folder's 256-500 px JPEGs (else the CIFAR-10 train JPEGs)
    lightly: tuple[str, ...] | None  #: lightly_moco.py's model arguments; None: no lightly row


MODELS = {
    "resnet18_cifar32": Model(
        "ResNet-18, CIFAR stem, 32 px", 32, {"name": "resnet18", "cifar_stem": True},
        {"method": {"shuffle_bn": "auto"}},
        jpegs=False, lightly=("--model", "resnet18", "--stem", "cifar")),
    "vit_s16_224": Model(
        "ViT-S/16, 224 px", 224, {"name": "vit_small", "image_size": 224, "patch_size": 16},
        {"method": {"shuffle_bn": "off"}, "augmentation": {"size": 224, **IMAGENET}},
        jpegs=True, lightly=("--model", "vit_s16")),
    "resnet18_224": Model(
        "ResNet-18, standard stem, 224 px", 224, {"name": "resnet18", "cifar_stem": False},
        {"method": {"shuffle_bn": "auto"}, "augmentation": {"size": 224, **IMAGENET}},
        jpegs=True, lightly=None),
}
#: per device: reps, and per model (batch, timed steps, warm-up steps); the timed end-to-end epoch of a GPU row
#: should last long enough that its loader workers' start (~1 s) weighs little
DEFAULTS = {"cuda": {"reps": 3, "resnet18_cifar32": (512, 60, 10), "vit_s16_224": (256, 24, 6),
                     "resnet18_224": (256, 24, 6)},
            "cpu": {"reps": 1, "resnet18_cifar32": (16, 2, 1), "vit_s16_224": (8, 2, 1), "resnet18_224": (16, 2, 1)}}


@dataclass
class Row:
    model: str
    row: str
    img_s: list[float] = field(default_factory=list)  #: per rep
    memory_gib: list[float] = field(default_factory=list)  #: per rep
    windows: list[tuple[float, float]] = field(default_factory=list)  #: time.time() of each timed window
    status: str = "ok"  #: ok, skipped or failed
    reason: str = ""
    gpu_util: float | None = None

    def add(self, img_s: float, window: tuple[float, float], memory_gib: float | None) -> None:
        self.img_s.append(img_s)
        self.windows.append(window)
        if memory_gib is not None:
            self.memory_gib.append(memory_gib)


class GpuUtilisation:
    """nvidia-smi's utilization.gpu of one GPU, polled in a background thread as (time.time(), percent)."""

    def __init__(self, gpu: str) -> None:
        self.gpu, self.samples = gpu, []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        if self.available:
            threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        query = ["nvidia-smi", "-i", self.gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True).stdout.strip()
            if out.replace(".", "", 1).isdigit():  # "[N/A]" on a MIG slice
                self.samples.append((time.time(), float(out)))
            self._stop.wait(0.1)

    def mean(self, windows: list[tuple[float, float]]) -> float | None:
        values = [value for when, value in self.samples if any(start <= when <= end for start, end in windows)]
        return statistics.mean(values) if values else None

    def close(self) -> None:
        self._stop.set()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_experiment(model: Model, on_device: bool, root: Path, train: dict[str, Any]) -> dict[str, Any]:
    """harness.experiment() with the model's encoder and settings, the views made on the device or not."""
    data = experiment(**merge(model.overrides, {"augmentation": {"device": on_device}, "data": {"root": str(root)},
                                                "train": train}))
    data["encoder"] = dict(model.encoder)
    return data


def model_only(trainer, batch: int, size: int, warmup: int, steps: int) -> tuple[float, tuple, float | None]:
    """img/s of the Trainer's train_step on pre-made views on the device, its timed window and peak memory."""
    device = trainer.device
    memory_format = torch.channels_last if trainer.channels_last else torch.contiguous_format
    views = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
             for _ in range(2)]
    index = torch.arange(batch)
    for _ in range(warmup):
        trainer.train_step(views, index, epoch=0)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, start = time.time(), time.perf_counter()
    for _ in range(steps):
        trainer.train_step(views, index, epoch=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return batch * steps / seconds, (wall, time.time()), memory


def end_to_end(trainer, rep: int, warmup: int, steps: int) -> tuple[float, tuple, float | None]:
    """img/s of Trainer.train_epoch over ``steps`` batches of its loader, after an epoch of ``warmup`` ones."""
    trainer.steps_per_epoch = warmup
    trainer.train_epoch(2 * rep)
    trainer.steps_per_epoch = steps
    wall = time.time()
    metrics = trainer.train_epoch(2 * rep + 1)
    return metrics["img_per_s"], (wall, time.time()), metrics.get("gpu_memory_gib")


def lightly(python: str, model: Model, root: Path, batch: int, warmup: int, steps: int, workers: int,
            device: str) -> tuple[float, tuple, float | None, str]:
    """One rep of lightly_moco.py throughput: img/s, timed window, peak memory, its backbone's source."""
    cmd = [python, str(HERE / "lightly_moco.py"), "throughput", "--root", str(root), *model.lightly,
           "--batch", str(batch), "--workers", str(workers), "--threads", str(os.cpu_count()), "--reps", "1",
           "--steps", str(steps), "--warmup", str(warmup), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"lightly_moco.py exited {done.returncode}: {last}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["lightly_img_s"][0], tuple(out["timed_windows"][0]), out["max_memory_gib"], out["backbone"]


def lightly_python(requested: str | None) -> tuple[str | None, str]:
    """The python that has lightly (``--lightly-python``, else bench/.venv-lightly's), or None and why not."""
    python = requested or str(HERE / ".venv-lightly" / "bin" / "python")
    if not Path(python).exists() and not shutil.which(python):
        return None, (f"--lightly-python {python}: no such python" if requested
                      else f"no lightly venv at {python} (bash bench/setup_lightly.sh makes it)")
    probe = subprocess.run([python, "-c", "import lightly, torch; print(lightly.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        return None, f"{python} cannot import lightly: {(probe.stderr.strip().splitlines() or [''])[-1]}"
    return python, f"lightly {probe.stdout.strip()} ({python})"


def data_root(model: Model, batch: int, steps: int) -> Path:
    """The ImageFolder a model trains on: CIFAR-10 train, or jpeg_folder with a batch per timed step."""
    if not model.jpegs:
        if not (CIFAR / "train").is_dir():
            sys.exit(f"device_throughput.py: no CIFAR-10 at {CIFAR / 'train'}: set SSLCORE_CIFAR10 or run "
                     "scripts/setup.sh")
        return CIFAR / "train"
    from data_pipeline import jpeg_folder

    return jpeg_folder(per_class=math.ceil(batch * steps / 10))


def sizes(args: argparse.Namespace, name: str) -> tuple[int, int, int]:
    """The batch, timed steps and warm-up steps of model ``name``: DEFAULTS unless given."""
    batch, steps, warmup = DEFAULTS[args.device][name]
    return (args.batch.get(name, args.batch.get("all", batch)), steps if args.steps is None else args.steps,
            warmup if args.warmup is None else args.warmup)


def measure(args: argparse.Namespace, name: str, root: Path, gpu: GpuUtilisation | None, run_root: Path,
            notes: dict[str, Any]) -> list[Row]:
    model = MODELS[name]
    batch, steps, warmup = sizes(args, name)
    rows = {row: Row(name, row) for row in args.rows}
    train = {"batch_size": batch, **({"loader_workers": args.workers} if args.workers is not None else {})}
    # the CPU path's trainer also runs model_only and sets the loader workers of every row
    trainers = {row: make_trainer(model_experiment(model, on_device, root, train), args.device, run_root)
                for row, on_device in (("cpu_aug", False), ("device_aug", True)) if row == "cpu_aug" or row in rows}
    first = trainers["cpu_aug"]
    workers = first.loader_workers
    notes[name] = {"batch": batch, "timed_steps": steps, "warmup_steps": warmup, "data": str(root),
                   "loader_workers": workers,
                   "precision": str(first.autocast_dtype), "channels_last": first.channels_last}
    print(f"{model.title}: batch {batch}, {steps} timed steps after {warmup}, loader workers {workers}, "
          f"precision {first.autocast_dtype}, channels_last {first.channels_last}, data {root}", flush=True)
    if "lightly" in rows:
        if model.lightly is None:
            rows["lightly"].status, rows["lightly"].reason = "skipped", "no lightly counterpart of this model"
        elif args.lightly is None:
            rows["lightly"].status, rows["lightly"].reason = "skipped", args.lightly_reason
    for rep in range(args.reps):
        for key, row in rows.items():
            if row.status != "ok":
                continue
            try:
                if key == "model_only":
                    row.add(*model_only(trainers["cpu_aug"], batch, model.size, warmup, steps))
                elif key == "lightly":
                    *measured, source = lightly(args.lightly, model, root, batch, warmup, steps, workers,
                                                args.device)
                    row.add(*measured)
                    notes[name]["lightly_backbone"] = source
                else:
                    row.add(*end_to_end(trainers[key], rep, warmup, steps))
            except Exception as exc:  # recorded in the table; the run exits non-zero at the end
                row.status, row.reason = "failed", " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                continue
            print(f"  rep {rep + 1} {ROWS[key]}: {row.img_s[-1]:,.1f} img/s", flush=True)
    for row in rows.values():
        row.gpu_util = gpu.mean(row.windows) if gpu is not None else None
    del trainers, first
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def ratio(numerator: Row, denominator: Row) -> float | None:
    """The median of the per-rep ratios (reps ran side by side)."""
    pairs = list(zip(numerator.img_s, denominator.img_s))
    if numerator.status != "ok" or denominator.status != "ok" or not pairs:
        return None
    return statistics.median(a / b for a, b in pairs)


def table(rows: list[Row], header: dict[str, Any], notes: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The markdown table and the JSON payload."""
    def number(value: float | None, digits: int = 1) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    lines = [f"# MoCo v2 training throughput on {header['device']}", "",
             f"{header['measured_at']}; CPU {header['cpu']}; torch {header['torch']}; median of {header['reps']} "
             "reps, each of a model's timed steps after its warm-up ones (below); images/s of source images (two "
             "views each).", "",
             "| model | row | img/s | GPU memory (GiB) | GPU util (%) | / model only | sslcore / lightly |",
             "|---|---|---|---|---|---|---|"]
    payload_rows = []
    for row in rows:
        same = {r.row: r for r in rows if r.model == row.model}
        end_to_end_row = row.row in ("cpu_aug", "device_aug")
        over_model = ratio(row, same["model_only"]) if end_to_end_row and "model_only" in same else None
        over_lightly = ratio(row, same["lightly"]) if end_to_end_row and "lightly" in same else None
        rate = statistics.median(row.img_s) if row.status == "ok" and row.img_s else None
        memory = max(row.memory_gib) if row.memory_gib else None
        shown = number(rate) if row.status == "ok" else f"{row.status}: {row.reason}"
        lines.append(f"| {MODELS[row.model].title} | {ROWS[row.row]} | {shown} | {number(memory, 2)} | "
                     f"{number(row.gpu_util, 0)} | {number(over_model, 3)} | {number(over_lightly, 2)} |")
        payload_rows.append({"model": row.model, "row": row.row, "status": row.status, "reason": row.reason,
                             "img_s": rate, "img_s_per_rep": row.img_s, "gpu_memory_gib": memory,
                             "gpu_util_pct": row.gpu_util, "over_model_only": over_model,
                             "sslcore_over_lightly": over_lightly, "timed_windows": row.windows})
    lines += ["", "Settings and data per model:", ""]
    lines += [f"- {MODELS[name].title}: " + ", ".join(f"{key} {value}" for key, value in note.items())
              for name, note in notes.items()]
    lines += ["", f"224 px data: data_pipeline.jpeg_folder, CIFAR-10 train images upscaled (bicubic) once to "
                  f"256-500 px a side, JPEG quality 90. {header['gpu_util_source']}"]
    return "\n".join(lines) + "\n", {**header, "notes": notes, "rows": payload_rows}


def write(out: Path, markdown: str, payload: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text(markdown)
    (out / "throughput.json").write_text(json.dumps(payload, indent=2))
    return markdown


def batches(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """--batch's ``N`` (key "all") and ``MODEL=N`` items as a dict."""
    out = {}
    for item in items:
        name, _, value = item.rpartition("=")
        if (name and name not in MODELS) or not value.isdigit() or int(value) < 1:
            parser.error(f"--batch {item}: expected N or MODEL=N with MODEL one of {', '.join(MODELS)}")
        out[name or "all"] = int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar32", "vit_s16_224"], choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--batch", nargs="+", default=[], metavar="[MODEL=]N",
                        help="the batch of every model, or of MODEL (default: per device and model, see DEFAULTS)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row and rep (default: DEFAULTS)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default: DEFAULTS)")
    parser.add_argument("--reps", type=int, default=None, help="default: cuda 3, cpu 1")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: sslcore's for the device)")
    parser.add_argument("--lightly-python", default=None, help="a python with lightly (default bench/.venv-lightly)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for throughput.md and throughput.json (default bench/results/device_throughput_"
                             "DEVICE)")
    args = parser.parse_args()
    args.batch = batches(parser, args.batch)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("device_throughput.py: --device cuda and torch sees no CUDA device")
    if any(value is not None and value < 1 for value in (args.steps, args.warmup, args.reps)):
        sys.exit("device_throughput.py: --steps, --warmup and --reps must be at least 1")
    args.reps = args.reps or DEFAULTS[args.device]["reps"]
    args.lightly, args.lightly_reason = (lightly_python(args.lightly_python) if "lightly" in args.rows
                                         else (None, "not asked for"))
    print(f"lightly: {args.lightly_reason}", flush=True)
    out = args.out or HERE / "results" / f"device_throughput_{args.device}"
    # the JPEGs are made (once, by a process pool) before this process starts CUDA
    roots = {name: data_root(MODELS[name], sizes(args, name)[0], max(sizes(args, name)[1:])) for name in args.models}
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    gpu = None
    util_source = "No GPU: no utilisation."
    if args.device == "cuda":
        gpu = GpuUtilisation(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
        util_source = ("GPU util: nvidia-smi utilization.gpu polled every ~0.1 s, mean over the timed windows."
                       if gpu.available else "GPU util: n/a, no nvidia-smi on this machine.")
    header = {"command": " ".join(sys.argv), "measured_at": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(),
              "device": device_name, "torch": torch.__version__, "reps": args.reps, "lightly": args.lightly_reason,
              "gpu_util_source": util_source}
    notes: dict[str, Any] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sslcore-device-throughput-") as run_root:
        try:
            for name in args.models:
                try:
                    rows += measure(args, name, roots[name], gpu, Path(run_root), notes)
                except Exception as exc:  # its trainers could not be built: its rows fail, the others go on
                    traceback.print_exc()
                    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                    rows += [Row(name, row, status="failed", reason=reason) for row in args.rows]
                markdown = write(out, *table(rows, header, notes))  # after each model: a time limit keeps them
        finally:
            if gpu is not None:
                gpu.close()
    print(markdown + f"\nwritten: {out / 'throughput.md'}, {out / 'throughput.json'}")
    failed = [f"{row.model} {row.row}" for row in rows if row.status == "failed"]
    if failed:
        sys.exit(f"device_throughput.py: {len(failed)} row(s) failed: {', '.join(failed)} (reasons in the table)")


if __name__ == "__main__":
    main()
