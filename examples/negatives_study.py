"""The three sources of negatives of the MoCo paper (He et al. 2020, Fig. 3) on a CIFAR-10 subset: kNN top-1
against K, the number of negatives, one line per mechanism.

- end-to-end: ``negatives: in_batch`` with ``method.momentum: 0`` (the keys come from this step's query
  encoder); K is the batch size, and the learning rate follows it (linear scaling from quickstart's 0.06 at 128);
- memory bank (Wu et al. 2018): ``negatives: memory_bank`` with ``method.momentum: 0`` (one encoder, the bank
  updated with momentum 0.5); K is ``num_negatives``, drawn from one entry per training image;
- MoCo: ``negatives: queue`` with quickstart's key-encoder momentum 0.99; K is the queue size (a multiple of
  the batch size).

Every run is examples/quickstart.yaml with its budget put over it (the same images, epochs and, but for
end-to-end, batch size), trained in-process (``scaling.backend: local``) by ``sslcore run`` in a child process
and scored by kNN on the test images at the end. The script reads kNN top-1 from each run's summary.json, the
median img/s of the logged training windows (after the first) from its metrics.jsonl, and the child's peak
resident memory, and writes negatives_study.md, .json and .png to ``--out``. It is resumable: a finished run
(summary.json with a final result) is read, not repeated, and an interrupted one continues from its last
checkpoint; a new budget needs a new ``--out``.

    python examples/negatives_study.py [--data-root ~/.cache/sslcore/cifar10] [--epochs 15] [--max-per-class 500]
        [--in-batch-sizes 64 128 256] [--memory-bank-sizes 256 1024 4096] [--queue-sizes 256 1024 4096]
        [--out negatives_study]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
MECHANISMS = {"end_to_end": "end-to-end (in-batch)", "memory_bank": "memory bank", "moco": "MoCo (queue)"}


def overrides(mechanism: str, k: int, args: argparse.Namespace) -> list[str]:
    """quickstart.yaml's ``--set`` overrides for one run: the budget, then the mechanism with K negatives."""
    batch_size = k if mechanism == "end_to_end" else args.batch_size  # the base lr scales with it (linear rule)
    data_root = args.data_root.expanduser().resolve()
    sets = [f"name={mechanism}_K{k}", f"output_dir={args.out.resolve() / 'runs'}", f"seed={args.seed}",
            "scaling.backend=local", "tracking.aim=null", "tracking.progress_bar=false",
            f"data.root={data_root / 'train'}", f"data.max_per_class={args.max_per_class}",
            f"evaluators.0.data.root={data_root / 'test'}", f"evaluators.0.data.max_per_class={args.test_per_class}",
            "evaluators.0.every_epochs=0", f"train.epochs={args.epochs}", "train.eval_at_start=false",
            f"train.batch_size={batch_size}", "checkpoint.every_epochs=1",
            "checkpoint.keep=1"]
    if mechanism == "end_to_end":
        return [*sets, "method.momentum=0", "negatives={name: in_batch}"]
    if mechanism == "memory_bank":
        return [*sets, "method.momentum=0", f"negatives={{name: memory_bank, num_negatives: {k}, momentum: 0.5}}"]
    return [*sets, f"negatives={{name: queue, size: {k}}}"]


def train(mechanism: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume, or only read) one configuration; its kNN top-1, img/s, s/step and peak RSS."""
    run_dir = args.out.resolve() / "runs" / f"{mechanism}_K{k}"
    summary, usage, log = run_dir / "summary.json", run_dir.with_suffix(".usage.json"), run_dir.with_suffix(".log")
    if (run_dir / "config.yaml").exists():
        earlier = yaml.safe_load((run_dir / "config.yaml").read_text())
        if (earlier["train"]["epochs"], earlier["data"]["max_per_class"]) != (args.epochs, args.max_per_class):
            raise SystemExit(f"{run_dir} was trained with another budget; give this one a new --out")
    if not (summary.exists() and "final" in json.loads(summary.read_text()) and usage.exists()):
        resume = ["--resume", str(run_dir)] if list(run_dir.glob("checkpoint_*")) else [str(QUICKSTART)]
        command = [sys.executable, "-m", "sslcore", "run", *resume,
                   *(arg for item in overrides(mechanism, k, args) for arg in ("--set", item))]
        print(f"{mechanism} K={k}: training, log in {log}", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            _, status, rusage = os.wait4(child.pid, 0)  # rusage: the child's own peak RSS
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{mechanism} K={k} failed:\n" + "\n".join(log.read_text().splitlines()[-5:]))
        usage.write_text(json.dumps({"peak_rss_mib": rusage.ru_maxrss / 1024,
                                     "wall_minutes": (time.perf_counter() - start) / 60}))
    final = json.loads(summary.read_text())["final"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["img_per_s"] for r in records if r.get("subset") == "train"]
    img_s = statistics.median(windows[1:] or windows)  # the first window holds the warm-up
    batch_size = config["train"]["batch_size"]
    return {"mechanism": mechanism, "K": k, "batch_size": batch_size, "epochs": config["train"]["epochs"],
            "knn_top1": final["knn_top1"], "img_per_s": img_s, "seconds_per_step": batch_size / img_s,
            **json.loads(usage.read_text())}


def write_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    lines = [f"MoCo on {10 * args.max_per_class} CIFAR-10 images, {args.epochs} epochs; kNN top-1 on "
             f"{10 * args.test_per_class} test images. Peak RSS: the training process (host memory).", "",
             "| mechanism | K | batch | kNN top-1 | img/s | s/step | peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {MECHANISMS[r['mechanism']]} | {r['K']} | {r['batch_size']} | {r['knn_top1']:.4f} | "
              f"{r['img_per_s']:.0f} | {r['seconds_per_step']:.3f} | {r['peak_rss_mib']:.0f} |" for r in rows]
    path = args.out / "negatives_study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for mechanism, label in MECHANISMS.items():
        points = sorted((r["K"], r["knn_top1"]) for r in rows if r["mechanism"] == mechanism)
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("K (negatives)")
    axes.set_ylabel("kNN top-1")
    axes.set_title(f"{10 * args.max_per_class} CIFAR-10 images, {args.epochs} epochs (cf. MoCo Fig. 3)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = args.out / "negatives_study.png"
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("~/.cache/sslcore/cifar10"),
                        help="a folder with train/ and test/ ImageFolders of CIFAR-10")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--max-per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="kNN test images per class")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the memory bank and queue runs")
    parser.add_argument("--in-batch-sizes", type=int, nargs="*", default=[64, 128, 256],
                        help="K of end-to-end: batch sizes")
    parser.add_argument("--memory-bank-sizes", type=int, nargs="*", default=[256, 1024, 4096],
                        help="K of the memory bank: negatives drawn per step")
    parser.add_argument("--queue-sizes", type=int, nargs="*", default=[256, 1024, 4096],
                        help="K of MoCo: queue sizes, multiples of --batch-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("negatives_study"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [("end_to_end", k) for k in args.in_batch_sizes] + [("memory_bank", k) for k in args.memory_bank_sizes]
    plan += [("moco", k) for k in args.queue_sizes]
    rows = [train(mechanism, k, args) for mechanism, k in plan]
    (args.out / "negatives_study.json").write_text(json.dumps({"budget": {**vars(args), "data_root": str(
        args.data_root), "out": str(args.out)}, "runs": rows}, indent=2))
    table = write_table(rows, args)
    print(table.read_text(), end="")
    print(f"wrote {table}, {table.with_suffix('.json')} and {write_plot(rows, args)}")


if __name__ == "__main__":
    main()
