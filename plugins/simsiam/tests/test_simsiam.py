"""SimSiam: the loss against its formula written out here, the stop-gradient, the heads of the official code,
the collapse monitor, two real gloo workers against one process, the plugin contract, and the CIFAR-10
example through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcore_simsiam import NegativeCosineConfig, NegativeCosineLoss, SimSiam, SimSiamConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import check_plugin, run_distributed, run_example_briefly, tiny_encoder

GLOBAL_BATCH = 16


def build_simsiam(**method) -> SimSiam:
    config = SimSiamConfig(**{"dim": 16, "projector_hidden_dim": 16, "predictor_hidden_dim": 4, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"))
    return SimSiam(config, context=context, encoder=tiny_encoder(), loss=NegativeCosineLoss(NegativeCosineConfig()))


def views(n: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=generator) for _ in range(2)]


def formula_d(p: torch.Tensor, z: torch.Tensor) -> float:
    """D(p, z) = -(1/N) sum_i <p_i, z_i> / (||p_i|| ||z_i||), one row at a time."""
    total = 0.0
    for p_i, z_i in zip(p.tolist(), z.tolist()):
        dot = sum(a * b for a, b in zip(p_i, z_i))
        total -= dot / (math.sqrt(sum(a * a for a in p_i)) * math.sqrt(sum(b * b for b in z_i)))
    return total / len(p)


def test_negative_cosine_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=generator) * 3, torch.randn(6, 5, generator=generator)
    loss_fn = NegativeCosineLoss(NegativeCosineConfig())
    assert loss_fn(p, z).item() == pytest.approx(formula_d(p, z), rel=1e-5)
    assert loss_fn(p, p * 2).item() == pytest.approx(-1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(p.bfloat16(), z.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_d(p.bfloat16().float(), z.bfloat16().float()), rel=1e-5)


def test_the_loss_is_symmetric_and_no_gradient_flows_through_z() -> None:
    torch.manual_seed(0)
    model = build_simsiam().train()
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.loss.register_forward_pre_hook(lambda module, args: calls.append(args))
    projections: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: projections.append(out))

    out = model(views())
    out["loss"].backward()

    (p1, z2), (p2, z1) = calls
    assert p1.requires_grad and p2.requires_grad
    assert not z1.requires_grad and not z2.requires_grad  # stopgrad(z)
    torch.testing.assert_close(z1, projections[0].detach())
    torch.testing.assert_close(z2, projections[1].detach())
    assert out["loss"].item() == pytest.approx(formula_d(p1, z2) / 2 + formula_d(p2, z1) / 2, rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_gradient_reaches_z_only_through_the_predictor() -> None:
    torch.manual_seed(0)
    model = build_simsiam().train()
    projections: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        projections.append(out)

    model.projector.register_forward_hook(keep)
    model(views())["loss"].backward()

    # z_1's gradient is that of D(h(z_1), z_2) / 2 alone: the term D(p_2, z_1) / 2 sends none back
    z1, z2 = projections[0].detach().requires_grad_(), projections[1].detach()
    p1 = model.predictor(z1)
    term = -((p1 * z2).sum(dim=1) / (p1.norm(dim=1) * z2.norm(dim=1))).mean() / 2
    term.backward()
    torch.testing.assert_close(projections[0].grad, z1.grad)


def test_heads_are_those_of_the_official_builder() -> None:
    model = build_simsiam(dim=32, projector_hidden_dim=24, predictor_hidden_dim=8)
    projector = [(type(m).__name__, getattr(m, "bias", None) is not None, getattr(m, "affine", None))
                 for m in model.projector]
    assert projector == [("Linear", False, None), ("BatchNorm1d", True, True), ("ReLU", False, None),
                         ("Linear", False, None), ("BatchNorm1d", True, True), ("ReLU", False, None),
                         ("Linear", False, None), ("BatchNorm1d", False, False)]
    assert [m.weight.shape for m in model.projector if isinstance(m, nn.Linear)] == [(24, 8), (24, 24), (32, 24)]
    predictor = [(type(m).__name__, getattr(m, "bias", None) is not None) for m in model.predictor]
    assert predictor == [("Linear", False), ("BatchNorm1d", True), ("ReLU", False), ("Linear", True)]
    assert [m.weight.shape for m in model.predictor if isinstance(m, nn.Linear)] == [(8, 32), (32, 8)]


def test_z_std_is_the_spread_of_the_normalised_projections() -> None:
    torch.manual_seed(0)
    model = build_simsiam().train()
    projections: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: projections.append(out.detach()))
    z_std = model(views())["z_std"]

    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in projections[0].tolist()]
    n, d = len(rows), len(rows[0])
    stds = []
    for j in range(d):
        mean = sum(row[j] for row in rows) / n
        stds.append(math.sqrt(sum((row[j] - mean) ** 2 for row in rows) / (n - 1)))
    assert z_std.ndim == 0 and z_std.item() == pytest.approx(sum(stds) / d, rel=1e-5)


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every worker, as the engine seeds them
    # eval mode: BatchNorm uses its running statistics, so no statistic couples the samples of a batch
    # (per-worker batch statistics are the SyncBatchNorm question, not the loss's)
    model = DistributedDataParallel(build_simsiam().eval())
    mine = [v.chunk(world_size)[rank] for v in views()]
    loss = model(mine)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.module.parameters() if p.requires_grad]}


def test_two_workers_compute_the_loss_and_gradients_of_one_process() -> None:
    torch.manual_seed(0)
    model = build_simsiam().eval()
    loss = model(views())["loss"]
    loss.backward()

    results = run_distributed(_worker, world_size=2)

    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, loss.detach())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for result in results:
        assert len(result["grads"]) == len(grads)
        for got, expected in zip(result["grads"], grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_simsiam_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_simsiam.plugin", [("method", "simsiam"), ("loss", "negative_cosine")])


def test_the_installed_entry_point_registers_simsiam() -> None:
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "simsiam"), registry.get("loss", "negative_cosine")
    assert method.distribution == loss.distribution == "sslcore-simsiam"
    assert method.factory is SimSiam and loss.factory is NegativeCosineLoss
    assert method.extra["slots"] == {"encoder": {"name": "resnet50", "zero_init_residual": True},
                                     "augmentation": {"name": "moco_v2"}, "loss": {"name": "negative_cosine"}}


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_example_briefly(Path(__file__).parents[3] / "examples" / "simsiam_cifar10.yaml", cifar10_dir, tmp_path)
