"""Barlow Twins: the loss against its formula written out here, the heads of the official code, the method's two
views and metrics, two real gloo workers against one process on the global batch, the plugin contract, the
official recipe that ``method: barlowtwins`` resolves to and its learning rates through the engine, and the
CIFAR-10 example through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcore_barlowtwins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss, BarlowTwinsLossConfig
from torch import nn

from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss
from sslcore.config import load_experiment, resolve
from sslcore.engine.context import MethodContext
from sslcore.engine.rundir import RunDir
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
from sslcore.toolkit.distributed import concat_all_gather

GLOBAL_BATCH = 16
EXAMPLE = Path(__file__).parents[3] / "examples" / "barlowtwins_cifar10.yaml"


def build_barlowtwins(**method) -> BarlowTwins:
    config = BarlowTwinsConfig(**{"projector_hidden_dim": 16, "dim": 12, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    return BarlowTwins(config, context=context,
                       slots=built_slots(encoder=tiny_encoder(), loss=BarlowTwinsLoss(BarlowTwinsLossConfig())))


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
    terms = loss_fn.metrics()
    assert set(terms) == {"invariance", "redundancy_reduction"}
    assert terms["invariance"].item() == pytest.approx(invariance, rel=1e-5)
    assert terms["redundancy_reduction"].item() == pytest.approx(redundancy_reduction, rel=1e-5)
    assert not any(t.requires_grad for t in terms.values())
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


def inputs() -> list[torch.Tensor]:
    """The global batch of both views: GLOBAL_BATCH x 8 each."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 8, generator=generator)]


def linear() -> nn.Module:
    return nn.Linear(8, 16)


def barlow_twins_of_both_views(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Both views through ``model`` in one forward, then the loss, which every worker computes alike: that of the
    global batch, not of its half (their mean is compared with one process's)."""
    z_a, z_b = model(torch.cat(views)).chunk(2)
    loss = BarlowTwinsLoss(BarlowTwinsLossConfig())(z_a, z_b)
    every_worker = concat_all_gather(loss.detach()[None])
    assert torch.equal(every_worker, loss.detach().expand_as(every_worker)), f"workers' losses differ: {every_worker}"
    return loss


def test_two_workers_compute_the_loss_and_gradients_of_one_process_on_the_global_batch() -> None:
    check_workers_match_one_process(linear, inputs, loss=barlow_twins_of_both_views)


def test_barlowtwins_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_barlowtwins.plugin", [("method", "barlowtwins"), ("loss", "barlow_twins")])


def test_the_installed_entry_point_registers_barlowtwins() -> None:
    check_entry_point("sslcore-barlowtwins", [("method", "barlowtwins"), ("loss", "barlow_twins")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "barlowtwins"), registry.get("loss", "barlow_twins")
    assert method.factory is BarlowTwins and loss.factory is BarlowTwinsLoss
    assert {slot: (s.needs, dict(s.default)) for slot, s in method.slots.items()} == {
        "encoder": (Encoder, {"name": "resnet50", "zero_init_residual": True}),
        "augmentation": (Augmentation, {"name": "byol"}),
        "loss": (PairedLoss, {"name": "barlow_twins", "lambd": 0.0051})}
    assert loss.meets(PairedLoss)


# -- the recipe -------------------------------------------------------------------------------------------

# facebookresearch/barlowtwins main.py @ a655214c76c97d0150277b85d16e69328ea52fd9 (the same at HEAD 8e8d284):
# --epochs 1000, --batch-size 2048, --learning-rate-weights 0.2, --learning-rate-biases 0.0048,
# --weight-decay 1e-6, --lambd 0.0051, --projector 8192-8192-8192; LARS(momentum=0.9, eta=0.001,
# weight_decay_filter=True, lars_adaptation_filter=True) with the filters on p.ndim == 1
OFFICIAL_EPOCHS, OFFICIAL_BATCH = 1000, 2048
LR_WEIGHTS, LR_BIASES, WEIGHT_DECAY = 0.2, 0.0048, 1e-6
WARMUP_EPOCHS = 10


def official_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    """The official adjust_learning_rate without base_lr (batch_size / 256) and the per-group lr: a linear
    warmup over 10 epochs, then q = 0.5 (1 + cos(pi t / T)) and q + 0.001 (1 - q). The warmup is sslcore's
    Schedule's, (step + 1) / warmup_steps (the official code has step / warmup_steps: one step earlier, so it
    starts at 0 where sslcore reaches the peak at the last warmup step)."""
    max_steps, warmup_steps = epochs * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    step, max_steps = step - warmup_steps, max_steps - warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return q + 0.001 * (1 - q)


@pytest.fixture
def plugin_registry(registry: Registry) -> Registry:
    registry.add_module("sslcore_barlowtwins.plugin")
    return registry


def test_method_alone_resolves_to_the_official_recipe(plugin_registry: Registry, tmp_path: Path) -> None:
    experiment = resolve({"method": "barlowtwins", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         plugin_registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": LR_WEIGHTS, "momentum": 0.9, "weight_decay": WEIGHT_DECAY,
                                  "trust_coefficient": 0.001, "clip_lr": False}
    assert train["lr_scaling"] == "linear"  # base_lr = batch_size / 256, times each group's lr
    assert (train["warmup_epochs"], train["schedule"], train["final_lr"]) == (WARMUP_EPOCHS, "cosine", 0.001)
    assert (train["epochs"], train["batch_size"]) == (OFFICIAL_EPOCHS, OFFICIAL_BATCH)
    assert train["param_groups"] == {"bias_and_norm": {"lr": LR_BIASES, "weight_decay": 0.0, "lars_exclude": True,
                                                       "fixed_lr": False}}
    assert (train["weight_decay_end"], train["grad_clip"]) == (None, None)
    assert experiment["method"] == {"name": "barlowtwins", "projector_hidden_dim": 8192, "dim": 8192}
    assert experiment["encoder"]["name"] == "resnet50" and experiment["encoder"]["zero_init_residual"] is True
    assert experiment["loss"] == {"name": "barlow_twins", "lambd": 0.0051, "scale": 1.0}
    augmentation = experiment["augmentation"]  # the official Transform: blur 1.0 / 0.1, solarization 0.0 / 0.2
    assert augmentation["name"] == "byol" and augmentation["size"] == 224
    assert (augmentation["blur_prob"], augmentation["solarize_prob"]) == ([1.0, 0.1], [0.0, 0.2])


def test_every_parameter_follows_the_official_learning_rates_over_the_whole_schedule(
        plugin_registry: Registry, tmp_path: Path) -> None:
    batch, steps_per_epoch = 32, 2
    experiment = resolve({"method": {"name": "barlowtwins", "projector_hidden_dim": 16, "dim": 12},
                          "encoder": {"name": "resnet18", "cifar_stem": True}, "augmentation": {"size": 32},
                          "data": {"name": "image_folder", "root": str(tmp_path)}, "train": {"batch_size": batch}},
                         plugin_registry).as_dict()
    epochs = experiment["train"]["epochs"]
    assert epochs == OFFICIAL_EPOCHS
    total_steps = epochs * steps_per_epoch
    method, optimization = build_for_training(experiment, plugin_registry, steps_per_epoch=steps_per_epoch)
    optimizer = optimization.optimizer
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    parameters = [p for p in method.parameters() if p.requires_grad]
    assert len(group_of) == len(parameters) == sum(len(g["params"]) for g in optimizer.param_groups)
    assert any(p.ndim == 1 for p in parameters) and any(p.ndim > 1 for p in parameters)
    for p in parameters:
        group = group_of[id(p)]
        one_dim = p.ndim == 1  # the official param_biases
        assert group["weight_decay"] == (0.0 if one_dim else WEIGHT_DECAY)
        assert group["lars_exclude"] is one_dim
    for step in range(total_steps):
        factor = official_factor(step, steps_per_epoch, epochs)
        for p in parameters:
            base = LR_BIASES if p.ndim == 1 else LR_WEIGHTS
            assert group_of[id(p)]["lr"] == pytest.approx(base * batch / 256 * factor, rel=1e-9, abs=1e-15), step
        optimizer.step()  # no gradients: moves nothing
        optimization.scheduler.step()
    assert official_factor(total_steps - 1, steps_per_epoch, epochs) == pytest.approx(0.001, abs=1e-6)


def test_the_cifar10_example_gives_biases_and_norms_the_weights_lr(plugin_registry: Registry,
                                                                  tmp_path: Path) -> None:
    registry = plugin_registry
    config = tmp_path / EXAMPLE.name
    config.write_text(EXAMPLE.read_text().replace("~/.cache/sslcore/cifar10", str(tmp_path)))
    experiment = load_experiment(config, registry).as_dict()
    train = experiment["train"]
    _, optimization = build_for_training(experiment, registry)
    groups = {g["group"]: g for g in optimization.optimizer.param_groups}  # initial_lr: the peak lr
    assert set(groups) == {"rest", "bias_and_norm"}
    # solo-learn: 0.3 x 256/256
    assert groups["rest"]["initial_lr"] == groups["bias_and_norm"]["initial_lr"] == pytest.approx(0.3)
    assert (groups["rest"]["weight_decay"], groups["bias_and_norm"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["rest"]["lars_exclude"], groups["bias_and_norm"]["lars_exclude"]) == (False, True)
    assert train["optimizer"]["trust_coefficient"] == 0.02 and train["optimizer"]["clip_lr"] is True
    assert (train["warmup_epochs"], train["final_lr"], train["epochs"]) == (10, 0.0, 1000)
    assert experiment["loss"] == {"name": "barlow_twins", "lambd": 0.0051, "scale": 0.1}
    augmentation = experiment["augmentation"]  # solo-learn's asymmetric.yaml: no blur, solarization 0.0 / 0.2
    assert augmentation["scale"] == [0.08, 1.0]
    assert (augmentation["blur_prob"], augmentation["solarize_prob"]) == ([0.0, 0.0], [0.0, 0.2])


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path)
    state = torch.load(RunDir(run_dir).checkpoints()[0], weights_only=True)["model"]
    assert state["projector.6.weight"].shape == (2048, 2048)
