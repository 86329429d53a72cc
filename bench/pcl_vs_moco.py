"""PCL against MoCo at equal budget (issue: the PCL plugin): kNN top-1, AMI/NMI/ARI of k-means (k = 10) of
test features against labels, the random-init floor of each, and the E-step's share of PCL's epoch time.

Both runs use bench/configs/pcl_vs_moco.yaml (MoCo: the same file with method moco and loss info_nce, which
without prototypes is what proto_nce computes), one after the other in this process's machine; a run whose
folder holds a finished run is not repeated (delete bench/runs/NAME to redo it).

    python bench/pcl_vs_moco.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from harness import HERE, median, save

REPO = HERE.parent
CONFIG = REPO / "bench" / "configs" / "pcl_vs_moco.yaml"
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+  loss [\d.e+-]+  ([\d.e+-]+) img/s  ([\d.e+-]+) s", re.M)


def moco_config() -> Path:
    """The same file with MoCo: method moco, loss info_nce, no clustering block."""
    config = yaml.safe_load(CONFIG.read_text())
    config["method"] = {**config["method"], "name": "moco"}
    del config["method"]["warmup_epochs"]
    config["loss"] = {"name": "info_nce", "temperature": config["loss"]["temperature"]}
    del config["clustering"]
    path = HERE / "runs" / "pcl_vs_moco_moco.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(name: str, seed: int, config: Path) -> dict:
    run_dir = HERE / "runs" / name
    summary, log = run_dir / "summary.json", HERE / "runs" / f"{name}.log"
    if not (summary.exists() and "final" in json.loads(summary.read_text())):
        cmd = [str(Path(sys.executable).parent / "sslcore"), "run", str(config), "--set", f"name={name}",
               "--set", f"seed={seed}"]
        print("$", " ".join(cmd), flush=True)
        with open(log, "w") as out:
            subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    e_steps = {r["epoch"]: r["e_step_seconds"] for r in records if r["subset"] == "epoch_start"}
    epochs = list(EPOCH_LINE.finditer(log.read_text()))
    return {"summary": json.loads(summary.read_text()), "e_steps": e_steps,
            "epoch_seconds": {int(m[1]) - 1: float(m[3]) for m in epochs},
            "epoch_img_s": [float(m[2]) for m in epochs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    (HERE / "runs").mkdir(exist_ok=True)
    rows = {}
    for seed in args.seeds:
        for method, config in (("pcl", CONFIG), ("moco", moco_config())):
            result = run(f"pcl_vs_moco_{method}_seed{seed}", seed, config)
            final, initial = result["summary"]["final"], result["summary"]["initial"]
            row = {"knn_top1": final["knn_top1"], "ami": final["ami"], "nmi": final["nmi"], "ari": final["ari"],
                   "floor_knn_top1": initial["knn_top1"], "floor_ami": initial["ami"],
                   "median_epoch_img_s": median(result["epoch_img_s"])}
            if result["e_steps"]:
                # the E-step runs before the epoch's clock starts: its share of (E-step + training) time
                epoch_seconds = result["epoch_seconds"]
                shares = [s / (s + epoch_seconds[e]) for e, s in result["e_steps"].items() if e in epoch_seconds]
                row["median_e_step_seconds"] = median(list(result["e_steps"].values()))
                row["median_e_step_share"] = median(shares) if shares else None
            rows[f"{method}_seed{seed}"] = row
            print(f"{method} seed {seed}: " + json.dumps(row), flush=True)
    print("| run | kNN top-1 | AMI (k-means, k=10) | NMI | ARI | floor kNN / AMI | E-step share |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        share = row.get("median_e_step_share")
        print(f"| {name} | {row['knn_top1']:.4f} | {row['ami']:.4f} | {row['nmi']:.4f} | {row['ari']:.4f} | "
              f"{row['floor_knn_top1']:.4f} / {row['floor_ami']:.4f} | {'' if share is None else f'{share:.1%}'} |")
    save("pcl_vs_moco", {"runs": rows, "config": str(CONFIG.relative_to(REPO))})


if __name__ == "__main__":
    main()
