"""SimSiam: the loss against its formula written out here, the stop-gradient, the heads of the official code,
the collapse monitor, two real gloo workers against one process, the official recipe and its fixed predictor
lr through the engine, the plugin contract, and the CIFAR-10 example through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sslcore_simsiam import NegativeCosineConfig, NegativeCosineLoss, SimSiam, SimSiamConfig
from sslcore_simsiam.plugin import RECIPE, SLOTS
from torch import nn

from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, Slot
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_entry_point,
    check_plugin,
    check_workers_match_one_process,
    run_example_briefly,
    tiny_encoder,
)

GLOBAL_BATCH = 16


def build_simsiam(**method) -> SimSiam:
    config = SimSiamConfig(**{"dim": 16, "projector_hidden_dim": 16, "predictor_hidden_dim": 4, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    slots = built_slots(encoder=tiny_encoder(), loss=NegativeCosineLoss(NegativeCosineConfig()))
    return SimSiam(config, context=context, slots=slots)


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
    assert isinstance(loss_fn, PairedLoss) and loss_fn.metrics() == {}
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


def test_the_projector_is_as_wide_as_the_encoder_by_default() -> None:
    """builder.py: prev_dim = the encoder's feature width, the width of both hidden layers."""
    model = build_simsiam(projector_hidden_dim=None)
    assert model.projector.dims == [8, 8, 8, 16]  # tiny_encoder: 8 features; dim 16


def test_the_predictor_is_the_parameter_group_predictor() -> None:
    model = build_simsiam()
    groups = model.parameter_groups()
    assert list(groups) == ["predictor"]
    assert [id(p) for p in groups["predictor"]] == [id(p) for p in model.predictor.parameters()]


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


def simsiam_in_eval_mode() -> SimSiam:
    """Its BatchNorms on running statistics: no batch statistic couples a worker's rows."""
    return build_simsiam().eval()


def test_two_workers_compute_the_loss_and_gradients_of_one_process() -> None:
    check_workers_match_one_process(simsiam_in_eval_mode, views)


def test_method_simsiam_alone_resolves_to_the_official_recipe(registry: Registry, tmp_path: Path) -> None:
    """facebookresearch/simsiam main_simsiam.py @ a7bc1772896d0dad0806c51f0bb6f3b16d290468: --epochs 100,
    --batch-size 512, --lr 0.05 (init_lr = lr x batch_size / 256), --momentum 0.9, --wd 1e-4 on all
    parameters, cosine without warmup (adjust_learning_rate), and the README's --fix-pred-lr."""
    registry.add_module("sslcore_simsiam.plugin")
    experiment = resolve({"method": "simsiam", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                                  "nesterov": False}
    assert (train["lr_scaling"], train["warmup_epochs"], train["schedule"], train["final_lr"]) == \
        ("linear", 0, "cosine", 0.0)
    assert (train["epochs"], train["batch_size"], train["grad_clip"], train["weight_decay_end"]) == \
        (100, 512, None, None)
    assert train["param_groups"] == {"predictor": {"lr": None, "weight_decay": None, "lars_exclude": False,
                                                   "fixed_lr": True}}
    assert experiment["encoder"]["name"] == "resnet50" and experiment["encoder"]["zero_init_residual"] is True
    assert experiment["augmentation"]["name"] == "moco_v2"
    assert experiment["method"] == {"name": "simsiam", "dim": 2048, "projector_hidden_dim": None,
                                    "predictor_hidden_dim": 512}


def test_the_predictor_keeps_its_lr_while_the_rest_follows_the_cosine(registry: Registry, tmp_path: Path) -> None:
    """Through the engine over a whole schedule: the predictor at init_lr = 0.05 x B/256 (--fix-pred-lr),
    every other parameter at init_lr x (1 + cos(pi k / K)) / 2 at step k of K, weight decay 1e-4 for all."""
    registry.add_module("sslcore_simsiam.plugin")
    batch, steps_per_epoch, epochs = 64, 3, 4
    data = {"method": {"name": "simsiam", "dim": 16, "predictor_hidden_dim": 4},
            "encoder": {"name": "resnet18", "cifar_stem": True},
            "data": {"name": "image_folder", "root": str(tmp_path)}, "train": {"batch_size": batch}}
    experiment = resolve(data, registry).as_dict()
    method, optimization = build_for_training(experiment, registry, steps_per_epoch=steps_per_epoch, epochs=epochs)
    total = steps_per_epoch * epochs
    groups = {group["group"]: group for group in optimization.optimizer.param_groups}
    assert sorted(groups) == ["predictor", "rest"]
    predictor = {id(p) for p in method.predictor.parameters()}
    assert {id(p) for p in groups["predictor"]["params"]} == predictor
    assert {id(p) for p in groups["rest"]["params"]} == \
        {id(p) for p in method.parameters() if p.requires_grad and id(p) not in predictor}
    init_lr = 0.05 * batch / 256
    for k in range(total):
        assert groups["predictor"]["lr"] == pytest.approx(init_lr)
        assert groups["rest"]["lr"] == pytest.approx(init_lr * 0.5 * (1 + math.cos(math.pi * k / total)))
        assert groups["predictor"]["weight_decay"] == groups["rest"]["weight_decay"] == 1e-4
        optimization.optimizer.step()
        optimization.scheduler.step()
    assert groups["rest"]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the cosine
    assert groups["predictor"]["lr"] == pytest.approx(init_lr)


def test_simsiam_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_simsiam.plugin", [("method", "simsiam"), ("loss", "negative_cosine")])


def test_the_installed_entry_point_registers_simsiam() -> None:
    check_entry_point("sslcore-simsiam", [("method", "simsiam"), ("loss", "negative_cosine")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "simsiam"), registry.get("loss", "negative_cosine")
    assert method.factory is SimSiam and loss.factory is NegativeCosineLoss
    assert method.slots == SLOTS == {"encoder": Slot(Encoder, {"name": "resnet50", "zero_init_residual": True}),
                                     "augmentation": Slot(Augmentation, {"name": "moco_v2"}),
                                     "loss": Slot(PairedLoss, {"name": "negative_cosine"})}
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(Path(__file__).parents[3] / "examples" / "simsiam_cifar10.yaml", cifar10_dir,
                                  tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["subset"] == "train"]
    # BRIEF_RUN's batch of 32: the predictor at its peak lr 0.5 x 32/256 during the warmup of the rest
    assert train and train[-1]["lr_predictor"] == pytest.approx(0.5 * 32 / 256)
    assert train[-1]["lr"] < train[-1]["lr_predictor"]
