"""MoCo v2 built from lightly 1.6's own modules, the way lightly's examples and CIFAR-10 benchmark do it.

Runs in bench/.venv-lightly (bash bench/setup_lightly.sh), never imports sslcore. Two modes:

    throughput   images/s of decode + lightly's MoCoV2Transform (two views) + step, over the ImageFolder
    train        train for --epochs on the first --per-class images of each class, save the backbone

lightly's parts: MoCoProjectionHead, NTXentLoss with a memory bank (MoCo's InfoNCE against a queue; without
one, lightly's in-batch NT-Xent over the query and key batches),
update_momentum, deactivate_requires_grad, MoCoV2Transform. The backbone is bench/backbone.py's ResNet-18,
the same module sslcore trains, so one kNN script evaluates both. Defaults as lightly runs: fp32, contiguous.

``--model vit_s16``: ViT-S/16 at 224 px (width 384, 12 blocks, 6 heads, the CLS token's output), timm's
``vit_small_patch16_224`` when timm is installed, else torchvision's ``VisionTransformer`` of those sizes, with
lightly's MoCoV2Transform at its defaults (224 px, blur p 0.5, ImageNet mean and std); the same head
(hidden 2048, 128-d) and queue. ``--device cuda`` trains on the GPU; throughput mode then also reports
torch.cuda.max_memory_allocated over the timed steps, and the timed windows (time.time()) for a caller that
samples the GPU's utilisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Iterator

import torch
import torchvision
from backbone import resnet18
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.moco_transform import MoCoV2Transform
from torch import nn

CIFAR_NORMALIZE = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
MODELS = ("resnet18", "vit_s16")


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, 2048, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def vit_s16() -> tuple[nn.Module, str]:
    """ViT-S/16 at 224 px whose forward returns the CLS token's output (N x 384), and where it comes from."""
    try:
        import timm
    except ImportError:
        model = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
                                                     hidden_dim=384, mlp_dim=1536)
        model.heads = nn.Identity()
        return model, f"torchvision {torchvision.__version__} VisionTransformer(224, patch 16, 12 x 384, 6 heads)"
    return timm.create_model("vit_small_patch16_224", num_classes=0), f"timm {timm.__version__} vit_small_patch16_224"


def backbone(args: argparse.Namespace) -> tuple[nn.Module, int, str]:
    """The backbone of ``--model``, its feature width and where it comes from."""
    if args.model == "vit_s16":
        model, source = vit_s16()
        return model, 384, source
    return resnet18(args.stem), 512, f"bench/backbone.py ResNet-18, stem {args.stem}"


def loader(root: str, per_class: int | None, batch: int, workers: int, seed: int,
           model: str = "resnet18") -> torch.utils.data.DataLoader:
    if model == "vit_s16":
        transform = MoCoV2Transform(input_size=224)  # lightly's defaults
    else:
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
    """The model, loss and optimizer, and where the backbone comes from."""
    torch.manual_seed(args.seed)
    network, feature_dim, source = backbone(args)
    model = MoCo(network, feature_dim).to(args.device)
    # with a memory bank: MoCo's InfoNCE against a queue; size 0: the other samples of the batch (NT-Xent)
    bank = (args.memory_bank, 128) if args.memory_bank else 0
    criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=bank).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    return model, criterion, optimizer, source


def step(model, criterion, optimizer, views, momentum: float, device: str = "cpu") -> torch.Tensor:
    x_query, x_key = (view.to(device) for view in views)
    update_momentum(model.backbone, model.backbone_momentum, m=momentum)
    update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
    query = model(x_query)
    key = model.forward_momentum(x_key)
    loss = criterion(query, key)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def forever(data: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch (a small folder may hold fewer batches than the reps take)."""
    while True:
        yield from data


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(args: argparse.Namespace) -> None:
    model, criterion, optimizer, source = make(args)
    data = loader(args.root, None, args.batch, args.workers, args.seed, args.model)
    it = forever(data)
    rates, windows, memory = [], [], []
    for _ in range(args.reps):
        for _ in range(args.warmup):
            views, _ = next(it)
            step(model, criterion, optimizer, views, 0.99, args.device)
        synchronize(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall, start = time.time(), time.perf_counter()
        for _ in range(args.steps):
            views, _ = next(it)
            step(model, criterion, optimizer, views, 0.99, args.device)
        synchronize(args.device)
        rates.append(args.batch * args.steps / (time.perf_counter() - start))
        windows.append([wall, time.time()])
        if args.device == "cuda":
            memory.append(torch.cuda.max_memory_allocated() / 2**30)
        print(f"lightly end to end: {rates[-1]:.1f} img/s", flush=True)
    print(json.dumps({"lightly_img_s": rates, "timed_windows": windows, "max_memory_gib": max(memory, default=None),
                      "backbone": source, "device": args.device}))


def train(args: argparse.Namespace) -> None:
    model, criterion, optimizer, _ = make(args)
    data = loader(args.root, args.per_class, args.batch, args.workers, args.seed, args.model)
    total = args.epochs * len(data)
    # cosine decay per step, no warmup: the same schedule the sslcore run uses (warmup_epochs: 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    log = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start, losses = time.perf_counter(), []
        for views, _ in data:
            losses.append(float(step(model, criterion, optimizer, views, 0.99, args.device)))
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
    parser.add_argument("--root", required=True, help="the training ImageFolder (CIFAR-10 train for resnet18)")
    parser.add_argument("--model", default="resnet18", choices=MODELS,
                        help="resnet18: bench/backbone.py's at 32 px; vit_s16: ViT-S/16 at 224 px")
    parser.add_argument("--stem", default="cifar", help="resnet18's stem (bench/backbone.py)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "lightly_moco.py: --device cuda and torch sees no CUDA device\n")
    torch.set_num_threads(args.threads)
    (throughput if args.mode == "throughput" else train)(args)


if __name__ == "__main__":
    main()
