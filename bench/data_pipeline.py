"""Data-pipeline levers, one thread, on real CIFAR-10 JPEGs: decoding with PIL vs OpenCV, and two MoCo v2
views normalised per image (sslcore's moco_v2) vs left uint8 and normalised per batch afterwards.

    python bench/data_pipeline.py --images 2000 --reps 3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from harness import CIFAR, median, save

from sslcore.components.augmentations import MoCoV2Augmentation, MoCoV2Config
from sslcore.toolkit.images import load_image

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cv2_load(path: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    root = CIFAR / "train"
    paths = sorted(str(p) for p in root.glob("*/*.jpg"))[:: max(1, 50000 // args.images)][: args.images]
    for path in paths:  # same file-cache state for both decoders
        Path(path).read_bytes()
    aug = MoCoV2Augmentation(MoCoV2Config(size=32, mean=MEAN, std=STD))
    uint8_views = A.Compose([t for t in aug.view_transforms[0].transforms if not isinstance(t, A.Normalize)])
    images = [load_image(p) for p in paths]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def batched(imgs):
        views = [torch.stack([uint8_views(image=im)["image"] for im in imgs]) for _ in range(2)]
        return [(v.float() - mean) / std for v in views]

    rows: dict[str, list[float]] = {"decode_pil": [], "decode_cv2": [], "views_per_image_normalize": [],
                                    "views_uint8_batch_normalize": []}
    for _ in range(args.reps):
        rows["decode_pil"].append(rate(load_image, paths))
        rows["decode_cv2"].append(rate(cv2_load, paths))
        rows["views_per_image_normalize"].append(rate(aug.views, images))
        start = time.perf_counter()
        for i in range(0, len(images), 256):
            batched(images[i:i + 256])
        rows["views_uint8_batch_normalize"].append(len(images) / (time.perf_counter() - start))
    result = {k: median(v) for k, v in rows.items()}
    result["cv2_over_pil"] = median([c / p for c, p in zip(rows["decode_cv2"], rows["decode_pil"])])
    result["batch_over_per_image"] = median([b / p for b, p in zip(rows["views_uint8_batch_normalize"],
                                                                    rows["views_per_image_normalize"])])
    for key, value in result.items():
        print(f"{key:32s} {value:10.2f}")
    save("data_pipeline", {**result, "per_rep": rows, "images": len(paths), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
