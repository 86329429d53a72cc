"""Benchmark 1, framework overhead: sslcore's MoCo training step against a hand-written PyTorch loop.

Model only: both get the same pre-made tensors (two 256 x 3 x 32 x 32 views), so no data loading is
timed. sslcore's side is its real Trainer.train_step (autocast, optimizer, scheduler, the moco plugin's
forward, the queue negative source, the info_nce loss), built from an experiment dict. The two sides run
alternately in one process, rep after rep, and the ratio is taken per rep, then the median.

    python bench/overhead.py                       # fp32 and bf16+channels_last, 3 reps
    python bench/overhead.py --configs fp32 bf16_cl bf16_cl_compile --reps 5
"""

from __future__ import annotations

import argparse
import time

import torch
from bare_moco import BareMoCo, BareStep
from harness import experiment, make_trainer, median, save, time_steps, train_step

CONFIGS = {  # name -> (precision, channels_last, compile)
    "fp32": ("fp32", False, False),
    "fp32_cl": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16_cl": ("bf16", True, False),
    "bf16_cl_compile": ("bf16", True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16_cl"], choices=sorted(CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stem", default="cifar", choices=["cifar", "cifar_pool", "imagenet"])
    parser.add_argument("--shuffle-bn", default="off", help="sslcore's moco shuffle_bn (the bare loop has none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    x_q, x_k = torch.randn(args.batch, 3, 32, 32), torch.randn(args.batch, 3, 32, 32)
    stem = {"cifar_stem": args.stem != "imagenet", "maxpool": args.stem != "cifar"}
    rows = []
    for name in args.configs:
        precision, channels_last, compile_ = CONFIGS[name]
        torch.set_num_threads(args.threads)
        bare = BareStep(BareMoCo(args.stem), bf16=precision == "bf16", channels_last=channels_last,
                        compile=compile_)
        trainer = make_trainer(experiment(
            encoder=stem, method={"shuffle_bn": args.shuffle_bn},
            data={"max_per_class": 30},
            train={"batch_size": args.batch, "precision": precision, "channels_last": channels_last,
                   "compile": compile_}))
        torch.set_num_threads(args.threads)  # Trainer.setup sets it from the CPUs; same for both sides
        views = [x_q, x_k]

        def sslcore_step(trainer=trainer, views=views):
            return train_step(trainer, views)

        def bare_step(bare=bare):
            return bare(x_q, x_k)

        bare_s, ssl_s = [], []
        for _ in range(args.reps):
            bare_s.append(time_steps(bare_step, args.warmup, args.steps))
            ssl_s.append(time_steps(sslcore_step, args.warmup, args.steps))
        ratios = [b / s for b, s in zip(bare_s, ssl_s)]
        row = {"config": name, "bare_img_s": args.batch / median(bare_s), "sslcore_img_s": args.batch / median(ssl_s),
               "ratio": median(ratios), "ratios": ratios, "bare_s": bare_s, "sslcore_s": ssl_s}
        rows.append(row)
        print(f"{name:18s} bare {row['bare_img_s']:7.1f} img/s  sslcore {row['sslcore_img_s']:7.1f} img/s  "
              f"sslcore/bare {row['ratio']:.3f}  (per rep {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    save(f"overhead_{args.stem}_shuffle-{args.shuffle_bn}",
         {"args": vars(args), "rows": rows, "when": time.strftime("%H:%M")})


if __name__ == "__main__":
    main()
