"""The method plugins side by side at equal budget: kNN top-1, training img/s and peak memory of MoCo,
SimCLR, BYOL, SimSiam, Barlow Twins and VICReg.

Each method runs its own CIFAR-10 example (examples/<method>_cifar10.yaml: its head, loss, augmentation
and optimizer as the recipe has them) with the same budget put over it: the quality benchmark's network
(ResNet-18 with torchvision's stem at 32 px), the same subset of the training images, the same epochs,
batch size and warm-up, the recipe's learning rate scaled linearly to the batch size (the rule of the
papers), in-process (backend local). Scored at the end by kNN (k 200, tau 0.1) on the 10,000 test images.
img/s is the median over epochs; peak memory is the run's maximum resident set size (the CPU's RAM: no
GPU here). A run whose folder holds a finished run is not repeated (delete bench/runs/NAME to redo it).

    python bench/methods.py [--epochs 15] [--per-class 500] [--batch-size 128] [--methods moco simclr ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import CIFAR, HERE, median, save

REPO = HERE.parent
METHODS = ["moco", "simclr", "byol", "simsiam", "barlowtwins", "vicreg"]
EPOCH_LINE = re.compile(r"sslcore: epoch (\d+)/\d+ .*?img_per_s=([\d.e+-]+)")
KNN = {"name": "knn", "k": 200, "temperature": 0.1, "every_epochs": 0,
       "data": {"name": "image_folder", "root": str(CIFAR / "test")}}


def budget_config(method: str, args: argparse.Namespace) -> Path:
    """The method's example with the common budget put over it, written to bench/runs/."""
    config = yaml.safe_load((REPO / "examples" / f"{method}_cifar10.yaml").read_text())
    train = config["train"]
    optimizer = train["optimizer"]
    optimizer["lr"] = optimizer["lr"] * args.batch_size / train["batch_size"]  # linear scaling rule
    config.update(name=f"methods_{method}", seed=args.seed, output_dir="bench/runs", evaluators=[KNN],
                  encoder={"name": "resnet18", "cifar_stem": False},
                  scaling={"backend": "local", "num_workers": 1},
                  checkpoint={"every_epochs": args.epochs, "keep": 1},
                  tracking={"aim": None, "progress_bar": False})
    config["data"] = {"name": "image_folder", "root": str(CIFAR / "train"), "max_per_class": args.per_class}
    train.update(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                 eval_at_start=False)
    path = HERE / "runs" / f"methods_{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(method: str, config: Path) -> dict:
    """Train (unless already done) in a child process; kNN, median img/s and the child's peak RSS."""
    run_dir, log = HERE / "runs" / f"methods_{method}", HERE / "runs" / f"methods_{method}.log"
    summary, usage = run_dir / "summary.json", HERE / "runs" / f"methods_{method}.usage.json"
    if not (summary.exists() and "final" in json.loads(summary.read_text()) and usage.exists()):
        cmd = [str(Path(sys.executable).parent / "sslcore"), "run", str(config)]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            child = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            _, status, rusage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{method} failed: see {log}")
        usage.write_text(json.dumps({"peak_rss_mib": rusage.ru_maxrss / 1024,
                                     "wall_minutes": (time.perf_counter() - start) / 60}))
    epochs = [float(m[2]) for m in EPOCH_LINE.finditer(log.read_text())]
    final = json.loads(summary.read_text())["final"]
    return {"knn_top1": final["knn_top1"], "median_epoch_img_s": median(epochs), **json.loads(usage.read_text())}


def parameters(method: str, config: Path) -> float:
    """Trainable parameters of the method as built for this budget, in millions."""
    import torch

    from sslcore.config import load_experiment
    from sslcore.engine.context import MethodContext
    from sslcore.engine.loop import build_method
    from sslcore.registry import Registry

    registry = Registry()
    experiment = load_experiment(config, registry).as_dict()
    context = MethodContext(world_size=1, rank=0, global_batch_size=experiment["train"]["batch_size"],
                            steps_per_epoch=1, epochs=1, device=torch.device("cpu"))
    model = build_method(experiment, registry, context)
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=float, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (HERE / "runs").mkdir(exist_ok=True)
    rows = {}
    for method in args.methods:
        config = budget_config(method, args)
        rows[method] = {**run(method, config), "trainable_params_m": parameters(method, config)}
        print(f"{method}: " + json.dumps(rows[method]), flush=True)
    print(f"\n{args.per_class * 10} CIFAR-10 images, {args.epochs} epochs, batch {args.batch_size}, "
          f"ResNet-18 at 32 px, kNN on the 10,000 test images\n")
    print("| method | kNN top-1 | img/s (median epoch) | peak memory (RSS) | trainable params | wall |")
    print("|---|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method} | {row['knn_top1']:.4f} | {row['median_epoch_img_s']:.0f} | "
              f"{row['peak_rss_mib'] / 1024:.2f} GiB | {row['trainable_params_m']:.1f} M | "
              f"{row['wall_minutes']:.1f} min |")
    save("methods", {"runs": rows, "budget": vars(args)})


if __name__ == "__main__":
    main()
