"""Barlow Twins: the loss against its formula written out here, the heads of the official code, the method's two
views and metrics, two real gloo workers against one process on the global batch, the plugin contract, and the
CIFAR-10 example through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcore_barlowtwins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss, BarlowTwinsLossConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import check_plugin, run_distributed, run_example_briefly, tiny_encoder

GLOBAL_BATCH = 16


def build_barlowtwins(**method) -> BarlowTwins:
    config = BarlowTwinsConfig(**{"projector_hidden_dim": 16, "dim": 12, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"))
    return BarlowTwins(config, context=context, encoder=tiny_encoder(),
                       loss=BarlowTwinsLoss(BarlowTwinsLossConfig()))


def standardized_columns(z: list[list[float]]) -> list[list[float]]:
    """Each column to mean 0 and biased variance 1 (the batch norm of the paper, eps 1e-5), as columns."""
    n = len(z)
    columns = []
    for j in range(len(z[0])):
        column = [row[j] for row in z]
        mean = sum(column) / n
        variance = sum((x - mean) ** 2 for x in column) / n
        columns.append([(x - mean) / math.sqrt(variance + 1e-5) for x in column])
    return columns


def formula_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[float, float]:
    """sum_i (1 - C_ii)^2 and sum_{i != j} C_ij^2, with C_ij = sum_b zhat^A_bi zhat^B_bj / N, by explicit sums."""
    n = len(z_a)
    a, b = standardized_columns(z_a.tolist()), standardized_columns(z_b.tolist())
    invariance = redundancy_reduction = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            if i == j:
                invariance += (1 - c_ij) ** 2
            else:
                redundancy_reduction += c_ij ** 2
    return invariance, redundancy_reduction


def formula_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 0.0051, scale: float = 1.0) -> float:
    invariance, redundancy_reduction = formula_terms(z_a, z_b)
    return scale * (invariance + lambd * redundancy_reduction)


def test_loss_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=generator) * 3 + 1, torch.randn(6, 5, generator=generator)
    loss_fn = BarlowTwinsLoss(BarlowTwinsLossConfig())
    assert loss_fn(z_a, z_b).item() == pytest.approx(formula_loss(z_a, z_b), rel=1e-5)
    invariance, redundancy_reduction = formula_terms(z_a, z_b)
    assert loss_fn.last_terms["invariance"].item() == pytest.approx(invariance, rel=1e-5)
    assert loss_fn.last_terms["redundancy_reduction"].item() == pytest.approx(redundancy_reduction, rel=1e-5)
    weighted = BarlowTwinsLoss(BarlowTwinsLossConfig(lambd=0.5, scale=0.1))
    assert weighted(z_a, z_b).item() == pytest.approx(formula_loss(z_a, z_b, lambd=0.5, scale=0.1), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(z_a.bfloat16(), z_b.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_loss(z_a.bfloat16().float(), z_b.bfloat16().float()), rel=1e-5)


def test_identical_decorrelated_views_cost_nothing() -> None:
    # columns of +-1 with mean 0, variance 1 and zero correlation: C is the identity (up to the eps)
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    loss_fn = BarlowTwinsLoss(BarlowTwinsLossConfig())
    assert loss_fn(z, 3 * z + 2).item() == pytest.approx(0.0, abs=1e-8)  # invariant to each column's affine map
    assert loss_fn(z, z.flip(1)).item() == pytest.approx(2.0 + 0.0051 * 2, rel=1e-4)  # C swaps the dimensions


def test_projector_is_that_of_the_official_code() -> None:
    model = build_barlowtwins(projector_hidden_dim=24, dim=32)
    layers = [(type(m).__name__, getattr(m, "bias", None) is not None) for m in model.projector]
    assert layers == [("Linear", False), ("BatchNorm1d", True), ("ReLU", False),
                      ("Linear", False), ("BatchNorm1d", True), ("ReLU", False), ("Linear", False)]
    assert [m.weight.shape for m in model.projector if isinstance(m, nn.Linear)] == [(24, 8), (24, 24), (32, 24)]


def test_the_views_go_through_separately_and_the_terms_are_reported() -> None:
    torch.manual_seed(0)
    model = build_barlowtwins().train()
    embeddings: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: embeddings.append(out.detach()))
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator) for _ in range(2)]

    out = model(views)
    out["loss"].backward()

    assert [z.shape for z in embeddings] == [(GLOBAL_BATCH, 12), (GLOBAL_BATCH, 12)]  # one batch per view
    z_a, z_b = embeddings
    assert out["loss"].item() == pytest.approx(formula_loss(z_a, z_b), rel=1e-5)
    invariance, redundancy_reduction = formula_terms(z_a, z_b)
    assert out["invariance"].ndim == 0 and out["invariance"].item() == pytest.approx(invariance, rel=1e-5)
    assert out["redundancy_reduction"].item() == pytest.approx(redundancy_reduction, rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of both views: GLOBAL_BATCH x 8 each."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 8, generator=generator)


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every worker
    model = DistributedDataParallel(nn.Linear(8, 16))
    x_a, x_b = (x.chunk(world_size)[rank] for x in inputs())  # this worker's half of each view
    z_a, z_b = model(torch.cat([x_a, x_b])).chunk(2)
    loss = BarlowTwinsLoss(BarlowTwinsLossConfig())(z_a, z_b)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def test_two_workers_compute_the_loss_and_gradients_of_one_process_on_the_global_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 16)
    x_a, x_b = inputs()
    loss = BarlowTwinsLoss(BarlowTwinsLossConfig())(model(x_a), model(x_b))
    loss.backward()
    assert loss.item() == pytest.approx(formula_loss(model(x_a), model(x_b)), rel=1e-5)

    results = run_distributed(_worker, world_size=2)

    for result in results:  # each worker's loss is that of the global batch, not of its half
        torch.testing.assert_close(result["loss"], loss.detach())
        for got, expected in zip(result["grads"], [p.grad for p in model.parameters()], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_barlowtwins_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_barlowtwins.plugin", [("method", "barlowtwins"), ("loss", "barlow_twins")])


def test_the_installed_entry_point_registers_barlowtwins() -> None:
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "barlowtwins"), registry.get("loss", "barlow_twins")
    assert method.distribution == loss.distribution == "sslcore-barlowtwins"
    assert method.factory is BarlowTwins and loss.factory is BarlowTwinsLoss
    assert method.extra["slots"] == {"encoder": {"name": "resnet50", "zero_init_residual": True},
                                     "augmentation": {"name": "byol"},
                                     "loss": {"name": "barlow_twins", "lambd": 0.0051}}


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(Path(__file__).parents[3] / "examples" / "barlowtwins_cifar10.yaml", cifar10_dir,
                                  tmp_path)
    state = torch.load(run_dir / "checkpoint_000000" / "state.pt", weights_only=True)["model"]
    assert state["projector.6.weight"].shape == (2048, 2048)
