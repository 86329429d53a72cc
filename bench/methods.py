"""The method plugins side by side at equal budget: kNN top-1, training img/s and peak memory of MoCo,
PCL, SimCLR, BYOL, SimSiam, Barlow Twins, VICReg, MAE, SwAV, DeepCluster v2, DINO, NNCLR, RotNet and Jigsaw.

Each method runs its own CIFAR-10 example (examples/<method>_cifar10.yaml: its head, loss, augmentation
and optimizer as the recipe has them) with the same budget put over it: the quality benchmark's network
(ResNet-18 with torchvision's stem at 32 px; MAE, which needs a ViT, keeps its example's ViT-Tiny), the
same subset of the training images, the same epochs, batch size and warm-up, the recipe's base learning
rate scaled to the batch size by its rule, in-process (backend local). A method's own epoch counts (PCL's
warm-up before the first E-step, SwAV's epoch the queue starts at, DINO's teacher-temperature warm-up)
keep their share of the example's epochs.
Scored at the end by kNN (k 200, tau 0.1) on the 10,000 test images.
A quality run whose folder holds a finished run is not repeated (delete bench/runs/NAME to redo it).

Speed is measured apart, on a quiet machine, in short runs of the same configurations interleaved
method by method (``--speed-reps`` rounds): img/s is the median of the logged 10-step windows after the
first; peak memory is the run's maximum resident set size (the CPU's RAM: no GPU here).

    python bench/methods.py [--epochs 15] [--per-class 500] [--batch-size 128] [--methods moco simclr ...]
                            [--speed-reps 3] [--skip quality speed floor]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import CIFAR, HERE, RESULTS, median, save

REPO = HERE.parent
METHODS = ["moco", "pcl", "simclr", "byol", "simsiam", "barlowtwins", "vicreg", "mae", "swav", "deepclusterv2", "dino",
           "nnclr", "rotnet", "jigsaw"]
#: method keys counted in epochs, scaled with the budget's epochs
EPOCH_KEYS = ("warmup_epochs", "epoch_queue_starts", "warmup_teacher_temp_epochs", "freeze_last_layer")
#: method keys counted in optimizer steps (SwAV's frozen prototypes), scaled with the budget's steps
STEP_KEYS = ("freeze_prototypes_niters", "freeze_prototypes_steps")
CIFAR_TRAIN_IMAGES = 50_000  # what the examples train on
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+  loss [\d.e+-]+  ([\d.e+-]+) img/s", re.M)
KNN = {"name": "knn", "k": 200, "temperature": 0.1, "every_epochs": 0,
       "data": {"name": "image_folder", "root": str(CIFAR / "test")}}


def budget_config(method: str, args: argparse.Namespace) -> Path:
    """The method's example with the common budget put over it, written to bench/runs/."""
    config = yaml.safe_load((REPO / "examples" / f"{method}_cifar10.yaml").read_text())
    train = config["train"]  # its base lr is scaled to the budget's batch by the recipe's lr_scaling (linear)
    share = args.epochs / train["epochs"]
    for key in EPOCH_KEYS:  # PCL's InfoNCE-only epochs, SwAV's queue start...: the same share of the run
        if key in config["method"]:
            config["method"][key] = round(config["method"][key] * share)
    steps = args.epochs * (args.per_class * 10 // args.batch_size)
    example_steps = train["epochs"] * (CIFAR_TRAIN_IMAGES // train["batch_size"])
    for key in STEP_KEYS:
        if key in config["method"]:
            config["method"][key] = round(config["method"][key] * steps / example_steps)
    if train.get("milestones"):  # a step schedule's epochs (RotNet, Jigsaw): the same shares of the run
        train["milestones"] = [m * share for m in train["milestones"]]
    if not config["encoder"]["name"].startswith("vit"):
        config["encoder"] = {"name": "resnet18", "cifar_stem": False}
    config.update(name=f"methods_{method}", seed=args.seed, output_dir="bench/runs", evaluators=[KNN],
                  scaling={"backend": "local", "num_workers": 1},
                  checkpoint={"every_epochs": args.epochs, "keep": 1},
                  tracking={"aim": None, "progress_bar": False})
    config["data"] = {"name": "image_folder", "root": str(CIFAR / "train"), "max_per_class": args.per_class}
    train.update(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                 eval_at_start=False)
    path = HERE / "runs" / f"methods_{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sslcore_run(config: Path, log: Path, *overrides: str) -> dict[str, float]:
    """``sslcore run config`` in a child process; its peak RSS and wall time."""
    cmd = [str(Path(sys.executable).parent / "sslcore"), "run", str(config)]
    for override in overrides:
        cmd += ["--set", override]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, rusage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: see {log}")
    return {"peak_rss_mib": rusage.ru_maxrss / 1024, "wall_minutes": (time.perf_counter() - start) / 60}


def quality(method: str, config: Path) -> dict:
    """Train the whole budget (unless already done); kNN top-1, median epoch img/s, wall time."""
    run_dir, log = HERE / "runs" / f"methods_{method}", HERE / "runs" / f"methods_{method}.log"
    summary, usage = run_dir / "summary.json", HERE / "runs" / f"methods_{method}.usage.json"
    if not (summary.exists() and "final" in json.loads(summary.read_text()) and usage.exists()):
        usage.write_text(json.dumps(sslcore_run(config, log)))
    epochs = [float(m[2]) for m in EPOCH_LINE.finditer(log.read_text())]
    final = json.loads(summary.read_text())["final"]
    return {"knn_top1": final["knn_top1"], "quality_median_epoch_img_s": median(epochs),
            "quality_wall_minutes": json.loads(usage.read_text())["wall_minutes"]}


def speed(method: str, config: Path, rep: int, steps: int) -> dict[str, float]:
    """One short run of ``steps`` steps, no evaluators: img/s (median 10-step window after the first), RSS."""
    name = f"methods_speed_{method}_{rep}"
    shutil.rmtree(HERE / "runs" / name, ignore_errors=True)  # a finished run of that name would only resume
    usage = sslcore_run(config, HERE / "runs" / f"{name}.log", f"name={name}", "evaluators=[]", "train.epochs=1",
                        f"train.max_steps_per_epoch={steps}", "train.log_every_steps=10")
    records = [json.loads(line) for line in (HERE / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    windows = [r["img_per_s"] for r in records if r["subset"] == "train"][1:]
    return {"img_s": median(windows), "peak_rss_mib": usage["peak_rss_mib"]}


def network(config: Path) -> str:
    """What sets a method's floor: its encoder block and the side its evaluators see (Jigsaw's 96 px)."""
    from sslcore.registry import Registry

    experiment = yaml.safe_load(config.read_text())
    registry = Registry(autoload=True)
    eval_size = registry.build("augmentation", experiment["augmentation"]).eval_size
    return json.dumps({"encoder": experiment["encoder"], "eval_size": eval_size}, sort_keys=True)


def floor(config: Path, tag: int) -> float:
    """kNN top-1 of the randomly initialised encoder at the method's eval size: the floor."""
    name = f"methods_floor_{tag}"
    summary = HERE / "runs" / name / "summary.json"
    done, wanted = (yaml.safe_load(path.read_text()) if path.exists() else {}
                    for path in (HERE / "runs" / name / "config.yaml", config))
    if summary.exists() and "initial" in json.loads(summary.read_text()) and \
            all(done.get(key, {}).get(k) == v for key in ("encoder", "augmentation") for k, v in wanted[key].items()):
        return json.loads(summary.read_text())["initial"]["knn_top1"]  # measured already (quality runs' rule)
    shutil.rmtree(HERE / "runs" / name, ignore_errors=True)
    sslcore_run(config, HERE / "runs" / f"{name}.log", f"name={name}", "train.epochs=1",
                "train.max_steps_per_epoch=1", "train.eval_at_start=true")
    return json.loads((HERE / "runs" / name / "summary.json").read_text())["initial"]["knn_top1"]


def parameters(method: str, config: Path) -> float:
    """Trainable parameters of the method as built for this budget, in millions."""
    from sslcore.config import load_experiment
    from sslcore.engine.launch import dry_build
    from sslcore.registry import Registry

    registry = Registry()
    model = dry_build(load_experiment(config, registry), registry)
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=float, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-reps", type=int, default=3)
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "speed", "floor"])
    args = parser.parse_args()
    (HERE / "runs").mkdir(exist_ok=True)
    configs = {method: budget_config(method, args) for method in args.methods}
    budget = {k: getattr(args, k) for k in ("epochs", "per_class", "batch_size", "warmup_epochs", "seed")}
    # results of earlier invocations with the same budget are kept (e.g. quality and speed measured apart)
    previous = RESULTS / "methods.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {}
    same = all(earlier.get("budget", {}).get(k) == v for k, v in budget.items())
    rows: dict[str, dict] = {m: {**(earlier["runs"].get(m, {}) if same else {}),
                                 "trainable_params_m": parameters(m, c)} for m, c in configs.items()}
    if "floor" not in args.skip:  # one floor per network and eval size (ResNet-18 at 32 px; MAE's ViT; Jigsaw)
        networks = {method: network(config) for method, config in configs.items()}
        floors: dict[str, float] = {}
        for method, key in networks.items():
            if key not in floors:
                floors[key] = floor(configs[method], len(floors))
            rows[method]["knn_floor"] = floors[key]
    knn_floor = rows[args.methods[0]].get("knn_floor")
    if "quality" not in args.skip:
        for method, config in configs.items():
            rows[method].update(quality(method, config))
            print(f"{method}: " + json.dumps(rows[method]), flush=True)
    if "speed" not in args.skip:
        reps: dict[str, list[dict[str, float]]] = {m: [] for m in configs}
        for rep in range(args.speed_reps):  # interleaved: every method in each round
            for method, config in configs.items():
                reps[method].append(speed(method, config, rep, args.speed_steps))
        for method, runs in reps.items():
            rows[method].update(img_s=median([r["img_s"] for r in runs]), img_s_reps=[r["img_s"] for r in runs],
                                peak_rss_mib=max(r["peak_rss_mib"] for r in runs))
    print(f"\n{args.per_class * 10} CIFAR-10 images, {args.epochs} epochs, batch {args.batch_size}, "
          f"ResNet-18 at 32 px, kNN on the 10,000 test images; random-init floor of ResNet-18 at 32 px {knn_floor}\n")
    print("| method | kNN top-1 | its floor | img/s | peak memory (RSS) | trainable params |")
    print("|---|---|---|---|---|---|")
    for method, row in rows.items():
        knn = f"{row['knn_top1']:.4f}" if "knn_top1" in row else "-"
        knn += f" | {row['knn_floor']:.4f}" if "knn_floor" in row else " | -"
        img_s = f"{row['img_s']:.0f}" if "img_s" in row else "-"
        rss = f"{row['peak_rss_mib'] / 1024:.2f} GiB" if "peak_rss_mib" in row else "-"
        print(f"| {method} | {knn} | {img_s} | {rss} | {row['trainable_params_m']:.1f} M |")
    save("methods", {"runs": rows, "budget": budget, "knn_floor": knn_floor})


if __name__ == "__main__":
    main()
