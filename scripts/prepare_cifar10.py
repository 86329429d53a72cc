"""Put CIFAR-10 as an ImageFolder of JPEGs in ~/.cache/sslcore/cifar10 (train/, test/).

From the shared archive (../shared/data/cifar10-jpg.tar.gz) when it is there, else through torchvision's
download (needs internet), written out in the same layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sslcore.testing import cache_dir, find_cifar10_archive, unpack_cifar10


def from_torchvision(target: Path) -> None:
    from PIL import Image
    from torchvision.datasets import CIFAR10

    for split, train in (("train", True), ("test", False)):
        data = CIFAR10(str(cache_dir() / "torchvision"), train=train, download=True)
        for i, (image, label) in enumerate(zip(data.data, data.targets)):
            folder = target / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=95)
    (target / ".unpacked").touch()


def main() -> int:
    target = cache_dir() / "cifar10"
    if (target / ".unpacked").exists():
        print(f"CIFAR-10 images ready in {target}")
        return 0
    archive = find_cifar10_archive(Path(__file__).resolve().parent)
    if archive is not None:
        unpack_cifar10(archive, target)
    else:
        print("no shared CIFAR-10 archive found; downloading through torchvision", file=sys.stderr)
        from_torchvision(target)
    print(f"CIFAR-10 images ready in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
