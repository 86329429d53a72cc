"""Benchmarks 3, 4 and 5 from one set of runs of bench/configs/quality.yaml (MoCo v2, 10,000 CIFAR-10 images):

- sslcore through Ray Train, 1 worker        (quality; the Ray side of the Ray tax)
- sslcore in-process (scaling.backend local) (the other side of the Ray tax)
- sslcore through Ray Train, 2 workers       (scaling: 1 thread each, shuffle-BN across the two)
- lightly 1.6, same network and recipe       (quality at equal epochs; bench/lightly_moco.py)

then kNN top-1 of every final backbone and of the random-init encoder with one script (bench/knn.py, fp32).
A run whose folder already holds a finished run is not repeated (delete bench/runs/NAME to redo it).
Runs are sequential: two at once would halve each other's speed.

    python bench/quality.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import CIFAR, HERE, median, save

REPO = HERE.parent
RUNS = HERE / "runs"
CONFIG = "bench/configs/quality.yaml"
LIGHTLY_PYTHON = HERE / ".venv-lightly" / "bin" / "python"
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+  loss [\d.e+-]+  ([\d.e+]+) img/s", re.M)


def sslcore_run(name: str, seed: int, *overrides: str) -> dict:
    run = RUNS / name
    log = RUNS / f"{name}.log"
    summary = run / "summary.json"
    if not (summary.exists() and "final" in json.loads(summary.read_text())):
        cmd = [str(Path(sys.executable).parent / "sslcore"), "run", CONFIG, "--set", f"name={name}",
               "--set", f"seed={seed}", *[a for o in overrides for a in ("--set", o)]]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
        (run / "wall_seconds").write_text(f"{time.perf_counter() - start:.1f}")
    epochs = {int(m[1]): float(m[2]) for m in EPOCH_LINE.finditer(log.read_text())}
    wall = run / "wall_seconds"
    return {"backbone": str(run / "backbone.pt"), "epoch_img_s": [epochs[k] for k in sorted(epochs)],
            "summary": json.loads(summary.read_text()),
            "wall_seconds": float(wall.read_text()) if wall.exists() else None}


def lightly_run(name: str, seed: int) -> dict:
    run = RUNS / name
    run.mkdir(parents=True, exist_ok=True)
    log = run / "log.json"
    if not log.exists():
        config = yaml.safe_load((REPO / CONFIG).read_text())
        encoder = config["encoder"]
        stem = ("imagenet" if not encoder.get("cifar_stem") else
                "cifar_pool" if encoder.get("maxpool") else "cifar")
        cmd = [str(LIGHTLY_PYTHON), str(HERE / "lightly_moco.py"), "train", "--root", str(CIFAR / "train"),
               "--stem", stem, "--batch", str(config["train"]["batch_size"]),
               "--temperature", str(config["loss"]["temperature"]),
               "--memory-bank", str(config["negatives"]["size"] if config["negatives"]["name"] == "queue" else 0),
               "--per-class", str(config["data"]["max_per_class"]), "--epochs", str(config["train"]["epochs"]),
               "--seed", str(seed), "--out", str(run / "backbone.pt")]
        print("$", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        log.write_text(out.strip().splitlines()[-1])
    data = json.loads(log.read_text())
    return {"backbone": str(run / "backbone.pt"), "epoch_img_s": [e["img_per_s"] for e in data["epochs"]],
            "wall_seconds": data["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["local", "two_workers", "lightly"])
    args = parser.parse_args()
    RUNS.mkdir(exist_ok=True)
    runs: dict[str, dict] = {}
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"_seed{seed}"
        runs[f"sslcore_ray{suffix}"] = sslcore_run(f"quality_ray{suffix}", seed)
        if "lightly" not in args.skip:
            runs[f"lightly{suffix}"] = lightly_run(f"lightly_quality{suffix}", seed)
        if seed == args.seeds[0]:
            if "local" not in args.skip:
                runs["sslcore_local"] = sslcore_run("quality_local", seed, "scaling.backend=local")
            if "two_workers" not in args.skip:
                runs["sslcore_ray_2_workers"] = sslcore_run("quality_ray2w", seed, "scaling.num_workers=2")
    weights = [r["backbone"] for r in runs.values()] + [f"random:{s}" for s in args.seeds]
    out = subprocess.run([sys.executable, str(HERE / "knn.py"), CONFIG, *weights], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    knn = json.loads(out.strip().splitlines()[-1])
    for name, run in runs.items():
        run["knn_top1"] = knn[run["backbone"]]["knn_top1"]
        run["median_epoch_img_s"] = median(run["epoch_img_s"])
        print(f"{name:24s} kNN top-1 {run['knn_top1']:.4f}  median epoch {run['median_epoch_img_s']:.1f} img/s  "
              f"wall {run['wall_seconds'] or float('nan'):.0f} s", flush=True)
    floors = {s: knn[f"random:{s}"]["knn_top1"] for s in args.seeds}
    print(f"random-init floor: {floors}")
    result = {"runs": runs, "floor": floors, "epochs": yaml.safe_load((REPO / CONFIG).read_text())["train"]["epochs"]}
    if "sslcore_local" in runs:
        result["ray_tax"] = runs["sslcore_ray"]["median_epoch_img_s"] / runs["sslcore_local"]["median_epoch_img_s"]
        print(f"Ray (1 worker) / in-process, median epoch img/s: {result['ray_tax']:.3f}")
    if "sslcore_ray_2_workers" in runs:
        result["two_over_one_worker"] = (runs["sslcore_ray_2_workers"]["median_epoch_img_s"]
                                         / runs["sslcore_ray"]["median_epoch_img_s"])
        print(f"2 workers / 1 worker, median epoch img/s: {result['two_over_one_worker']:.3f}")
    save("quality", result)


if __name__ == "__main__":
    main()
