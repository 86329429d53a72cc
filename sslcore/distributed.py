"""Collective helpers that work the same with one process (no process group) and with many."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All workers' ``tensor`` concatenated along dim 0, in rank order; no gradient flows back.

    Every worker must pass a tensor of the same shape.
    """
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every worker's loss depends on every worker's slice
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`concat_all_gather`, but the gradient of each worker's slice flows back to it."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every worker (in place, also returned)."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor
