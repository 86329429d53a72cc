"""gather_with_grad in a real 2-process gloo group: the forward is the global batch, and with DDP the
parameter gradients equal those of one process on the whole batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.testing import run_distributed
from sslcore.toolkit.distributed import gather_with_grad

GLOBAL_BATCH = 8


def _inputs() -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def _global_loss(z: torch.Tensor) -> torch.Tensor:
    """A loss that couples all samples: the squared norm of the batch's Gram matrix, per sample."""
    return (z @ z.T).square().sum() / z.shape[0]


def _worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = DistributedDataParallel(_model())
    mine = _inputs().chunk(world_size)[rank]
    z_all = gather_with_grad(model(mine))
    loss = _global_loss(z_all)
    loss.backward()
    return {"z_all": z_all.detach(), "loss": loss.detach(), "grad": model.module.weight.grad.clone()}


def test_gather_with_grad_gives_one_process_gradients_under_ddp() -> None:
    model = _model()
    z = model(_inputs())
    loss = _global_loss(z)
    loss.backward()

    results = run_distributed(_worker, world_size=2)

    for result in results:
        torch.testing.assert_close(result["z_all"], z.detach())
        torch.testing.assert_close(result["loss"], loss.detach())
        torch.testing.assert_close(result["grad"], model.weight.grad)


def test_gather_with_grad_is_the_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
