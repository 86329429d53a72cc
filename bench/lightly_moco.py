"""MoCo v2 built from lightly 1.6's own modules, the way lightly's examples and CIFAR-10 benchmark do it.

Runs in bench/.venv-lightly (bash bench/setup_lightly.sh), never imports sslcore. Two modes:

    throughput   images/s of decode + lightly's MoCoV2Transform (two views) + step, over the ImageFolder
    train        train for --epochs on the first --per-class images of each class, save the backbone

lightly's parts: MoCoProjectionHead, NTXentLoss with a memory bank (MoCo's InfoNCE against a queue; without
one, lightly's in-batch NT-Xent over the query and key batches),
update_momentum, deactivate_requires_grad, MoCoV2Transform. The backbone is bench/backbone.py's ResNet-18,
the same module sslcore trains, so one kNN script evaluates both. Defaults as lightly runs: fp32, contiguous.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torchvision
from backbone import resnet18
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.moco_transform import MoCoV2Transform
from torch import nn

CIFAR_NORMALIZE = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(512, 2048, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def loader(root: str, per_class: int | None, batch: int, workers: int, seed: int) -> torch.utils.data.DataLoader:
    transform = MoCoV2Transform(input_size=32, gaussian_blur=0.0, normalize=CIFAR_NORMALIZE)
    dataset = torchvision.datasets.ImageFolder(root, transform=transform)
    if per_class:  # the first per_class files of each class in sorted order, as sslcore's max_per_class
        seen: dict[int, int] = {}
        keep = []
        for i, (_, label) in enumerate(dataset.samples):
            if seen.get(label, 0) < per_class:
                keep.append(i)
                seen[label] = seen.get(label, 0) + 1
        dataset = torch.utils.data.Subset(dataset, keep)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


def make(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    model = MoCo(resnet18(args.stem))
    # with a memory bank: MoCo's InfoNCE against a queue; size 0: the other samples of the batch (NT-Xent)
    bank = (args.memory_bank, 128) if args.memory_bank else 0
    criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=bank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    return model, criterion, optimizer


def step(model, criterion, optimizer, views, momentum: float) -> torch.Tensor:
    x_query, x_key = views
    update_momentum(model.backbone, model.backbone_momentum, m=momentum)
    update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
    query = model(x_query)
    key = model.forward_momentum(x_key)
    loss = criterion(query, key)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def throughput(args: argparse.Namespace) -> None:
    model, criterion, optimizer = make(args)
    data = loader(args.root, None, args.batch, args.workers, args.seed)
    it = iter(data)
    rates = []
    for _ in range(args.reps):
        for _ in range(args.warmup):
            views, _ = next(it)
            step(model, criterion, optimizer, views, 0.99)
        start = time.perf_counter()
        for _ in range(args.steps):
            views, _ = next(it)
            step(model, criterion, optimizer, views, 0.99)
        rates.append(args.batch * args.steps / (time.perf_counter() - start))
        print(f"lightly end to end: {rates[-1]:.1f} img/s", flush=True)
    print(json.dumps({"lightly_img_s": rates}))


def train(args: argparse.Namespace) -> None:
    model, criterion, optimizer = make(args)
    data = loader(args.root, args.per_class, args.batch, args.workers, args.seed)
    total = args.epochs * len(data)
    # cosine decay per step, no warmup: the same schedule the sslcore run uses (warmup_epochs: 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    log = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start, losses = time.perf_counter(), []
        for views, _ in data:
            losses.append(float(step(model, criterion, optimizer, views, 0.99)))
            scheduler.step()
        seconds = time.perf_counter() - epoch_start
        log.append({"epoch": epoch, "loss": statistics.mean(losses), "img_per_s": len(data) * args.batch / seconds})
        print(f"lightly epoch {epoch + 1}/{args.epochs} loss {log[-1]['loss']:.4f} "
              f"{log[-1]['img_per_s']:.1f} img/s", flush=True)
    torch.save(model.backbone.state_dict(), args.out)
    print(json.dumps({"seconds": time.perf_counter() - start, "epochs": log}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "train"])
    parser.add_argument("--root", required=True, help="CIFAR-10 train ImageFolder")
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--memory-bank", type=int, default=4096, help="queue size; 0 for in-batch negatives")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--out", default="lightly_backbone.pt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (throughput if args.mode == "throughput" else train)(args)


if __name__ == "__main__":
    main()
