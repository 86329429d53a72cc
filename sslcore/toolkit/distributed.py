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


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every worker (in place, also returned)."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All workers' ``tensor`` concatenated along dim 0, in rank order, with gradient.

    The backward pass sums the gradient of the gathered tensor over workers and hands each worker the
    slice of its own rows, so every worker's loss reaches every worker's embeddings. With DDP averaging the
    parameter gradients, training on W workers then computes the gradients of one worker on the global
    batch (for a loss that every worker computes on the gathered tensor, or that is a per-worker mean).
    Every worker must pass a tensor of the same shape; with one process this is the identity.

    ``torch.distributed.nn.functional.all_gather`` gives the same values and the same gradients (its backward
    sums too; tests/test_library_equivalence.py), but torch 2.14 deprecates it (a FutureWarning in every run's
    log) for the private ``torch.distributed._functional_collectives.all_gather_single``, which older torch
    releases (sslcore supports 2.4 on) lack; the maintainers point users to a custom autograd function
    meanwhile (pytorch/pytorch#121587). Hence these few lines of public collectives.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over workers: each worker's loss depends on every worker's rows
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]
