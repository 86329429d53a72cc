"""Benchmark: ``sslcore sweep`` with ASHA against the same trials all trained to the end (issue 21).

The quickstart (examples/quickstart.yaml: MoCo v2 with in-batch negatives, ResNet-18, kNN top-1) at CPU scale:
``--images`` training images per class, ``--epochs`` epochs, the kNN every ``--eval-every`` epochs on
``--test`` test images per class. The space is the quickstart's temperature and lr, a grid of
``--temperatures`` x ``--lrs``. Two sweeps of the same trials, one after the other on this machine:

1. ``--scheduler asha`` (sslcore's default: ASHA on knn_top1, reduction factor 2, first rung at the first kNN);
2. ``--scheduler none``: every trial to the end, which is what full runs of each would give (a trial is
   ``sslcore run`` of its experiment).

It prints and saves (bench/results/sweep.json): trials, how many ASHA stopped, the wall time of each sweep and
their ratio, the best trial of each, whether they agree, and each trial's final kNN in the full sweep beside
what ASHA did with it.

    python bench/sweep.py [--images 200 --epochs 10 --eval-every 2 --test 100]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time

from harness import HERE, cpu_name, save

REPO = HERE.parent
RUNS = HERE / "runs" / "sweep"


def sweep(name: str, scheduler: str, args: argparse.Namespace) -> dict:
    """One sweep through the CLI; its wall time and its table (trials.md)."""
    sets = [f"name={name}", f"output_dir={RUNS}", f"data.max_per_class={args.images}", f"train.epochs={args.epochs}",
            f"evaluators.0.every_epochs={args.eval_every}", f"evaluators.0.data.max_per_class={args.test}",
            f"checkpoint.every_epochs={args.eval_every}", "tracking.aim=null"]
    command = [sys.executable, "-m", "sslcore", "sweep", str(REPO / "examples" / "quickstart.yaml"),
               "--param", f"loss.temperature=[{','.join(args.temperatures)}]",
               "--param", f"train.optimizer.lr=[{','.join(args.lrs)}]", "--scheduler", scheduler,
               *(a for s in sets for a in ("--set", s))]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"sweep {name} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(out.stdout[-2500:], flush=True)
    rows = {}
    for line in (RUNS / f"{name}-sweep" / "trials.md").read_text().splitlines():
        if line.startswith("| trial_"):
            trial, temperature, lr, knn, epochs, outcome = (c.strip() for c in line.strip("|").split("|"))
            rows[f"t={temperature} lr={lr}"] = {"trial": trial, "knn_top1": float(knn) if knn else None,
                                               "epochs": epochs, "outcome": outcome}
    best = re.search(r"sslcore: best (trial_\d+) \(([^)]*)\)", out.stdout)
    return {"seconds": seconds, "trials": rows, "best": best[2] if best else None,
            "pruned": sum(r["outcome"] == "stopped early" for r in rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="kNN test images per class")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--temperatures", nargs="+", default=["0.1", "0.2", "0.5"])
    parser.add_argument("--lrs", nargs="+", default=["0.06", "0.24"])
    args = parser.parse_args()
    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    asha = sweep("asha", "asha", args)
    full = sweep("full", "none", args)
    ranked = sorted(full["trials"], key=lambda k: -full["trials"][k]["knn_top1"])
    result = {
        "cpu": cpu_name(), "setup": vars(args),
        "trials": len(full["trials"]), "pruned_by_asha": asha["pruned"],
        "asha_seconds": round(asha["seconds"], 1), "all_to_end_seconds": round(full["seconds"], 1),
        "asha_over_all_to_end": round(asha["seconds"] / full["seconds"], 3),
        "best_asha": asha["best"], "best_all_to_end": full["best"],
        "same_best": _values(asha["best"]) == _values(full["best"]),
        "per_trial": {key: {"all_to_end_knn_top1": full["trials"][key]["knn_top1"], "rank": ranked.index(key) + 1,
                            "asha": asha["trials"][key]} for key in full["trials"]},
    }
    print(json.dumps(result, indent=2))
    save("sweep", result)


def _values(text: str | None) -> dict[str, str]:
    """``{key: value}`` of the callback's ``loss.temperature 0.2, train.optimizer.lr 0.06``."""
    return dict(part.rsplit(" ", 1) for part in (text or "").split(", ") if part)


if __name__ == "__main__":
    main()
