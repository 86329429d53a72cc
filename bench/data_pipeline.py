"""Data-pipeline levers and the two augmentation paths, on real CIFAR-10 JPEGs. Not a test.

``levers`` (the default), one thread: decoding with PIL vs OpenCV, and two MoCo v2 views normalised per image
(sslcore's moco_v2) vs left uint8 and normalised per batch afterwards.

``device``: source images/s of moco_v2's two views made per image by albumentations (the CPU path, what one
loader worker does) against the device path (``sslcore.toolkit.device_views``, batched) run here on CPU
tensors, from the same decoded uint8 images (decoding not timed), at 32 px (CIFAR-10 train JPEGs) and at
224 px (:func:`jpeg_folder`: CIFAR-10 train images upscaled once to 256-500 px a side and saved as JPEGs in a
temporary folder, sides drawn independently, so the batch is padded as ImageNet's would be). The device path's
batch is collated beforehand (``pad_collate``, timed on its own); ``--threads`` torch threads for both.

    python bench/data_pipeline.py --images 2000 --reps 3
    python bench/data_pipeline.py device --images 1024 --batch 256 --reps 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from harness import CIFAR, cpu_name, median, save

from sslcore.components.augmentations import MoCoV2Augmentation, MoCoV2Config
from sslcore.toolkit.device_views import pad_collate
from sslcore.toolkit.images import load_image

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
#: the side range of jpeg_folder's images: ImageNet's typical 500 x 375 lies inside it
SIDES = (256, 500)


def cv2_load(path: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def batch_rate(fn, calls: list[tuple], batch: int) -> float:
    """Source images/s of ``fn(*call)`` for each call, each one a batch of ``batch`` images."""
    start = time.perf_counter()
    for call in calls:
        fn(*call)
    return len(calls) * batch / (time.perf_counter() - start)


def cifar_paths(images: int) -> list[str]:
    """``images`` CIFAR-10 train JPEGs spread evenly over the sorted list (so over the classes)."""
    paths = sorted(str(p) for p in (CIFAR / "train").glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no CIFAR-10 JPEGs under {CIFAR / 'train'}: run scripts/setup.sh or set SSLCORE_CIFAR10")
    return paths[:: max(1, len(paths) // images)][:images]


def _upscale(job: tuple[str, str, int, int]) -> None:
    source, target, height, width = job
    image = cv2.imread(source, cv2.IMREAD_COLOR)
    cv2.imwrite(target, cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC),
                [cv2.IMWRITE_JPEG_QUALITY, 90])


def jpeg_folder(per_class: int, seed: int = 0) -> Path:
    """An ImageFolder of ``per_class`` JPEGs per CIFAR-10 class, each the class's next train image upscaled
    (bicubic) to a height and a width drawn uniformly from ``SIDES``, quality 90; made once into the system's
    temporary folder and reused (a ``complete`` file marks it done)."""
    root = Path(tempfile.gettempdir()) / f"sslcore-bench-jpegs-{SIDES[0]}-{SIDES[1]}-{per_class}-seed{seed}"
    if (root / "complete").exists():
        return root
    rng = np.random.default_rng(seed)
    jobs = []
    for folder in sorted(p for p in (CIFAR / "train").iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True, exist_ok=True)
        sources = sorted(folder.glob("*.jpg"))[:per_class]
        if len(sources) < per_class:
            raise SystemExit(f"{folder} holds {len(sources)} JPEGs, fewer than the {per_class} asked for")
        for source in sources:
            height, width = (int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
            jobs.append((str(source), str(root / folder.name / source.name), height, width))
    if not jobs:
        raise SystemExit(f"no class folders under {CIFAR / 'train'}: run scripts/setup.sh or set SSLCORE_CIFAR10")
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_upscale, jobs, chunksize=64))
    (root / "complete").write_text(f"{len(jobs)} images\n")
    return root


def levers(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    paths = cifar_paths(args.images)
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


def device_vs_albumentations(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(0)
    print(f"CPU: {cpu_name()}; torch threads {args.threads}; {args.images} images per size, device-path batch "
          f"{args.batch}, {args.reps} reps", flush=True)
    sources = {32: cifar_paths(args.images),
               224: sorted(str(p) for p in jpeg_folder(-(-args.images // 10)).glob("*/*.jpg"))[:args.images]}
    result: dict[str, dict[str, float]] = {}
    per_rep: dict[str, dict[str, list[float]]] = {}
    for size, paths in sources.items():
        mean, std = (MEAN, STD) if size == 32 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        aug = MoCoV2Augmentation(MoCoV2Config(size=size, mean=mean, std=std, device=False))
        images = [load_image(p) for p in paths]
        # the loader's batches on the device path: decoded uint8 tensors (none over max_source_side here)
        items = [(torch.from_numpy(image), 0, i) for i, image in enumerate(images)]
        chunks = [items[i:i + args.batch] for i in range(0, len(items) - args.batch + 1, args.batch)]
        if not chunks:
            raise SystemExit(f"--images {args.images} is fewer than one batch of {args.batch}")
        batches = [pad_collate(chunk)[0] for chunk in chunks]
        generator = torch.Generator().manual_seed(0)
        aug.device_views(*batches[0], generator)  # untimed: the first call pays kornia's and torch's set-up
        rows: dict[str, list[float]] = {"albumentations_per_image": [], "device_path_on_cpu": [], "pad_collate": []}
        for _ in range(args.reps):  # side by side in each rep
            rows["albumentations_per_image"].append(rate(aug.views, images))
            rows["device_path_on_cpu"].append(
                batch_rate(aug.device_views, [(canvas, sizes, generator) for canvas, sizes in batches], args.batch))
            rows["pad_collate"].append(batch_rate(pad_collate, [(chunk,) for chunk in chunks], args.batch))
        ratios = [d / a for d, a in zip(rows["device_path_on_cpu"], rows["albumentations_per_image"])]
        canvas = [tuple(c.shape[1:3]) for c, _ in batches]
        result[f"{size}px"] = {**{k: median(v) for k, v in rows.items()}, "device_over_albumentations": median(ratios)}
        per_rep[f"{size}px"] = {**rows, "device_over_albumentations": ratios}
        line = ", ".join(f"{k} {median(v):,.0f}" for k, v in rows.items())
        print(f"{size:3d} px (batch canvas {canvas[0][0]}x{canvas[0][1]}): source images/s {line}; "
              f"device path / albumentations {median(ratios):.2f}", flush=True)
    save("data_pipeline_device", {"result": result, "per_rep": per_rep, "images": args.images, "batch": args.batch,
                                  "threads": args.threads, "source_224": f"jpeg_folder, sides {SIDES}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="levers", choices=["levers", "device"])
    parser.add_argument("--images", type=int, default=None, help="images per size (levers: 2000, device: 1024)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="device: the device path's batch")
    parser.add_argument("--threads", type=int, default=1, help="device: torch threads")
    args = parser.parse_args()
    if args.what == "levers":
        args.images = args.images or 2000
        levers(args)
    else:
        args.images = args.images or 1024
        device_vs_albumentations(args)


if __name__ == "__main__":
    main()
