"""BYOL: the loss against its formula written out here, the stop-gradient and the EMA target with its cosine
schedule (also through a state-dict round trip), two real gloo workers against one process, the plugin
contract, and the CIFAR-10 example through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcore_byol import BYOL, BYOLConfig, BYOLLoss, BYOLLossConfig
from torch.nn.parallel import DistributedDataParallel

from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import check_plugin, run_distributed, run_example_briefly, tiny_encoder

GLOBAL_BATCH = 16


def build_byol(*, total_steps: int = 100, **method) -> BYOL:
    config = BYOLConfig(**{"projector_hidden_dim": 16, "dim": 8, "predictor_hidden_dim": 16, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=total_steps,
                            epochs=1, device=torch.device("cpu"))
    return BYOL(config, context=context, encoder=tiny_encoder(), loss=BYOLLoss(BYOLLossConfig()))


def views(n: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=generator) for _ in range(2)]


def online_parameters(model: BYOL) -> list[torch.Tensor]:
    return [*model.backbone.parameters(), *model.projector.parameters()]


def target_parameters(model: BYOL) -> list[torch.Tensor]:
    return [*model.target_backbone.parameters(), *model.target_projector.parameters()]


def formula_loss(p: torch.Tensor, z: torch.Tensor) -> float:
    """(1/N) sum_i (2 - 2 <p_i, z_i> / (||p_i|| ||z_i||)), one row at a time."""
    total = 0.0
    for p_i, z_i in zip(p.tolist(), z.tolist()):
        dot = sum(a * b for a, b in zip(p_i, z_i))
        norm_p = math.sqrt(sum(a * a for a in p_i))
        norm_z = math.sqrt(sum(b * b for b in z_i))
        total += 2 - 2 * dot / (norm_p * norm_z)
    return total / len(p)


def formula_tau(k: int, total: int, base: float) -> float:
    return 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2


def test_loss_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=generator) * 3, torch.randn(6, 5, generator=generator)
    loss_fn = BYOLLoss(BYOLLossConfig())
    assert loss_fn(p, z).item() == pytest.approx(formula_loss(p, z), rel=1e-5)
    # the normalised MSE of the paper: || p/||p|| - z/||z|| ||^2 per row
    assert loss_fn(p, p * 2).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(p, -p).item() == pytest.approx(4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(p.bfloat16(), z.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_loss(p.bfloat16().float(), z.bfloat16().float()), rel=1e-5)


def test_the_loss_is_symmetrised_and_no_gradient_reaches_the_target() -> None:
    torch.manual_seed(0)
    model = build_byol().train()
    for p_online, p_target in zip(online_parameters(model), target_parameters(model)):
        assert torch.equal(p_online, p_target) and p_online.data_ptr() != p_target.data_ptr()
    targets: list[torch.Tensor] = []
    model.target_projector.register_forward_hook(lambda module, args, out: targets.append(out))
    v1, v2 = views()

    out = model([v1, v2])
    out["loss"].backward()

    assert all(not z.requires_grad for z in targets)
    assert all(p.grad is None for p in target_parameters(model))
    assert all(p.grad is not None for p in [*online_parameters(model), *model.predictor.parameters()])
    with torch.no_grad():  # the same modules again, in training mode: the same batch statistics
        p1 = model.predictor(model.projector(model.backbone(v1)))
        p2 = model.predictor(model.projector(model.backbone(v2)))
    expected = formula_loss(p1, targets[1]) + formula_loss(p2, targets[0])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_the_target_moves_only_by_the_ema_with_the_cosine_schedule() -> None:
    torch.manual_seed(0)
    total, base = 4, 0.5
    model = build_byol(total_steps=total, base_momentum=base).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for k in range(total):
        theta = [p.detach().clone() for p in online_parameters(model)]
        xi = [p.detach().clone() for p in target_parameters(model)]
        tau = formula_tau(k - 1, total, base)

        out = model(views(seed=k))  # the EMA for the step taken after the previous forward

        assert out["tau"].item() == pytest.approx(formula_tau(k, total, base))
        for p_target, before_target, before_online in zip(target_parameters(model), xi, theta):
            expected = before_target if k == 0 else tau * before_target + (1 - tau) * before_online
            torch.testing.assert_close(p_target, expected)
        xi = [p.detach().clone() for p in target_parameters(model)]
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert all(torch.equal(p, before) for p, before in zip(target_parameters(model), xi))
        assert not all(torch.equal(p, before) for p, before in zip(online_parameters(model), theta))
    assert int(model.step) == total


def test_momentum_schedule_values() -> None:
    total = 10
    cosine = build_byol(total_steps=total, base_momentum=0.99)
    assert cosine.momentum(0) == pytest.approx(0.99)
    assert cosine.momentum(total // 2) == pytest.approx(0.995)
    assert cosine.momentum(total) == pytest.approx(1.0)
    assert cosine.momentum(3) == pytest.approx(formula_tau(3, total, 0.99))
    constant = build_byol(total_steps=total, base_momentum=0.99, momentum_schedule="constant")
    assert [constant.momentum(k) for k in (0, 5, 10)] == [0.99, 0.99, 0.99]


def test_the_schedule_step_survives_a_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = build_byol(total_steps=10).train()
    for seed in range(3):
        model(views(seed=seed))
    state = model.state_dict()
    assert int(state["step"]) == 3

    resumed = build_byol(total_steps=10).train()
    resumed(views())  # caches k = 1 before the load, which must not survive it
    resumed.load_state_dict(state)
    assert resumed.current_step() == 3
    assert resumed(views())["tau"].item() == pytest.approx(resumed.momentum(3))
    assert int(resumed.step) == 4


def test_eval_mode_leaves_the_target_and_the_step_alone() -> None:
    torch.manual_seed(0)
    model = build_byol()
    with torch.no_grad():  # the online network moved, as after an optimizer step
        for p in online_parameters(model):
            p.add_(1.0)
    xi = [p.detach().clone() for p in target_parameters(model)]
    model.eval()(views())
    assert int(model.step) == 0
    assert all(torch.equal(p, before) for p, before in zip(target_parameters(model), xi))


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every worker, as the engine seeds them
    # eval mode: BatchNorm uses its running statistics, so no statistic couples the samples of a batch
    # (per-worker batch statistics are the SyncBatchNorm question, not the loss's)
    model = DistributedDataParallel(build_byol().eval())
    mine = [v.chunk(world_size)[rank] for v in views()]
    loss = model(mine)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.module.parameters() if p.requires_grad]}


def test_two_workers_compute_the_loss_and_gradients_of_one_process() -> None:
    torch.manual_seed(0)
    model = build_byol().eval()
    loss = model(views())["loss"]
    loss.backward()

    results = run_distributed(_worker, world_size=2)

    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, loss.detach())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for result in results:
        assert len(result["grads"]) == len(grads)
        for got, expected in zip(result["grads"], grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_byol_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_byol.plugin", [("method", "byol"), ("loss", "byol")])


def test_the_installed_entry_point_registers_byol() -> None:
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "byol"), registry.get("loss", "byol")
    assert method.distribution == loss.distribution == "sslcore-byol"
    assert method.factory is BYOL and loss.factory is BYOLLoss
    assert method.extra["slots"] == {"encoder": {"name": "resnet50"}, "augmentation": {"name": "byol"},
                                     "loss": {"name": "byol"}}


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(Path(__file__).parents[3] / "examples" / "byol_cifar10.yaml", cifar10_dir,
                                  tmp_path)
    state = torch.load(run_dir / "checkpoint_000000" / "state.pt", weights_only=True)["model"]
    assert int(state["step"]) == 2  # the schedule's k, for a resume
