"""Benchmark 2, end to end: decode JPEG + two augmented views + MoCo v2 step, sslcore against lightly 1.6.

Same data (the shared CIFAR-10 train ImageFolder), backbone (ResNet-18, CIFAR stem), head, queue, batch
256, SGD and DataLoader workers on both sides; sslcore with its default precision, memory format and
shuffle-BN, lightly as it runs by default (fp32, contiguous, see lightly_moco.py, in its own venv). Reps
alternate between the two; each rep times --steps steps after --warmup untimed ones. sslcore's model-only
rate (the same Trainer's train_step on pre-made tensors) gives the cost of its data pipeline.

    bash bench/setup_lightly.sh && python bench/end_to_end.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from harness import CIFAR, HERE, experiment, make_trainer, median, save, time_steps, train_step

LIGHTLY_PYTHON = HERE / ".venv-lightly" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both sides")
    parser.add_argument("--stem", default="cifar", choices=["cifar", "cifar_pool"])
    parser.add_argument("--sslcore-set", nargs="*", default=[], metavar="KEY=JSON",
                        help="train.* settings for sslcore instead of its defaults, e.g. precision='\"fp32\"'")
    args = parser.parse_args()
    if not LIGHTLY_PYTHON.exists():
        sys.exit(f"{LIGHTLY_PYTHON} is missing: run bash bench/setup_lightly.sh first")
    train = {"batch_size": args.batch, "loader_workers": args.workers}
    for item in args.sslcore_set:
        key, value = item.split("=", 1)
        train[key] = json.loads(value)
    trainer = make_trainer(experiment(
        encoder={"cifar_stem": True, "maxpool": args.stem == "cifar_pool"},
        method={"shuffle_bn": "auto"},  # sslcore's default on one worker: split BN (the official CIFAR demo)
        train=train))
    trainer.steps_per_epoch = args.warmup + args.steps
    print(f"sslcore settings: precision={trainer.train_cfg['precision']} -> {trainer.autocast_dtype}, "
          f"channels_last={trainer.channels_last}, compile={trainer.train_cfg['compile']}, "
          f"shuffle_bn={trainer.method.shuffle_bn}, loader_workers={trainer.loader_workers}", flush=True)
    x = [torch.randn(args.batch, 3, 32, 32), torch.randn(args.batch, 3, 32, 32)]
    sslcore_e2e, sslcore_model, lightly = [], [], []
    lightly_cmd = [str(LIGHTLY_PYTHON), str(HERE / "lightly_moco.py"), "throughput", "--root", str(CIFAR / "train"),
                   "--stem", args.stem, "--batch", str(args.batch), "--workers", str(args.workers), "--reps", "1",
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for rep in range(args.reps):
        # sslcore end to end: its own train_epoch over the loader; the rate counts the timed steps only
        trainer.steps_per_epoch = args.warmup
        trainer.train_epoch(2 * rep)
        trainer.steps_per_epoch = args.steps
        sslcore_e2e.append(trainer.train_epoch(2 * rep + 1)["img_per_s"])
        sslcore_model.append(args.batch / time_steps(lambda: train_step(trainer, x), 1, args.steps))
        out = subprocess.run(lightly_cmd, capture_output=True, text=True, check=True).stdout
        lightly.append(json.loads(out.strip().splitlines()[-1])["lightly_img_s"][0])
        print(f"rep {rep + 1}: sslcore end to end {sslcore_e2e[-1]:.1f} img/s, model only {sslcore_model[-1]:.1f}; "
              f"lightly end to end {lightly[-1]:.1f}; sslcore/lightly {sslcore_e2e[-1] / lightly[-1]:.2f}", flush=True)
    ratios = [s / b for s, b in zip(sslcore_e2e, lightly)]
    data_cost = [e / m for e, m in zip(sslcore_e2e, sslcore_model)]
    result = {"sslcore_img_s": median(sslcore_e2e), "sslcore_model_only_img_s": median(sslcore_model),
              "lightly_img_s": median(lightly), "sslcore_over_lightly": median(ratios),
              "sslcore_e2e_over_model_only": median(data_cost), "per_rep": {"sslcore": sslcore_e2e,
              "sslcore_model_only": sslcore_model, "lightly": lightly}, "args": vars(args),
              "settings": {"precision": str(trainer.autocast_dtype), "channels_last": trainer.channels_last,
                           "shuffle_bn": trainer.method.shuffle_bn, "loader_workers": trainer.loader_workers},
              "when": time.strftime("%H:%M")}
    print(f"median: sslcore {result['sslcore_img_s']:.1f} img/s, lightly {result['lightly_img_s']:.1f} img/s, "
          f"sslcore/lightly {result['sslcore_over_lightly']:.2f}, sslcore end to end / model only "
          f"{result['sslcore_e2e_over_model_only']:.3f}")
    tag = "_".join([args.stem, f"w{args.workers}", *[s.replace("=", "-").replace('"', "") for s in args.sslcore_set]])
    save(f"end_to_end_{tag}", result)


if __name__ == "__main__":
    main()
