"""MAE against MoCo on the same ViT-Tiny (patch 4, 32 px) at equal budget: kNN top-1, img/s (median epoch),
and MAE's reconstruction loss per epoch (the curve: no linear probe needed to see it learn).

MAE runs examples/mae_cifar10.yaml; MoCo runs examples/moco_cifar10.yaml with its encoder block swapped
for the same ViT and MoCo v3's optimizer for ViTs (AdamW, wd 0.1, lr 1.5e-4 x B/256). Both on the same
subset, epochs, batch and warm-up, in-process, scored by kNN (k 200, tau 0.1) on the 10,000 test images.
A run whose folder holds a finished run is not repeated (delete bench/runs/NAME to redo it).

    python bench/mae_vs_moco.py [--epochs 10] [--per-class 200] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml
from harness import CIFAR, HERE, median, save
from methods import KNN, sslcore_run

REPO = HERE.parent
VIT = {"name": "vit_tiny", "image_size": 32, "patch_size": 4}
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+  loss ([\d.e+-]+)  ([\d.e+-]+) img/s", re.M)


def config(method: str, args: argparse.Namespace) -> Path:
    experiment = yaml.safe_load((REPO / "examples" / f"{method}_cifar10.yaml").read_text())
    train = experiment["train"]
    if method == "moco":  # MoCo v3's recipe for ViTs: base lr 1.5e-4 x B/256 (lr_scaling: linear, MoCo's rule)
        train["optimizer"] = {"name": "adamw", "lr": 1.5e-4, "betas": [0.9, 0.999], "weight_decay": 0.1}
    experiment.update(name=f"vit_{method}", seed=0, output_dir="bench/runs", evaluators=[KNN], encoder=VIT,
                      scaling={"backend": "local", "num_workers": 1},
                      checkpoint={"every_epochs": args.epochs, "keep": 1},
                      tracking={"aim": None, "progress_bar": False})
    experiment["data"] = {"name": "image_folder", "root": str(CIFAR / "train"), "max_per_class": args.per_class}
    train.update(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs)
    path = HERE / "runs" / f"vit_{method}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def run(method: str, path: Path) -> dict:
    run_dir, log = HERE / "runs" / f"vit_{method}", HERE / "runs" / f"vit_{method}.log"
    summary = run_dir / "summary.json"
    if not (summary.exists() and "final" in json.loads(summary.read_text())):
        sslcore_run(path, log)
    epochs = list(EPOCH_LINE.finditer(log.read_text()))
    return {"knn_top1": json.loads(summary.read_text())["final"]["knn_top1"],
            "median_epoch_img_s": median([float(m[3]) for m in epochs]),
            "epoch_loss": [float(m[2]) for m in epochs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=float, default=1)
    args = parser.parse_args()
    (HERE / "runs").mkdir(exist_ok=True)
    rows = {method: run(method, config(method, args)) for method in ("mae", "moco")}
    print(f"\nViT-Tiny patch 4 at 32 px, {args.per_class * 10} CIFAR-10 images, {args.epochs} epochs, "
          f"batch {args.batch_size}, kNN on the 10,000 test images\n")
    print("| method | kNN top-1 | img/s (median epoch) | training loss per epoch |")
    print("|---|---|---|---|")
    for method, row in rows.items():
        curve = " ".join(f"{loss:.3f}" for loss in row["epoch_loss"])
        print(f"| {method} | {row['knn_top1']:.4f} | {row['median_epoch_img_s']:.0f} | {curve} |")
    save("mae_vs_moco", {"runs": rows, "budget": vars(args)})


if __name__ == "__main__":
    main()
