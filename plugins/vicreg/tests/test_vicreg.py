"""VICReg: the loss and its three terms against their formulas written out here, the expander of the official
code, the method's two views and metrics, two real gloo workers against one process on the global batch, the
plugin contract, the official recipe that ``method: vicreg`` resolves to, and the CIFAR-10 example."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcore_vicreg import VICReg, VICRegConfig, VICRegLoss, VICRegLossConfig
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
EXAMPLE = Path(__file__).parents[3] / "examples" / "vicreg_cifar10.yaml"


def build_vicreg(**method) -> VICReg:
    config = VICRegConfig(**{"projector_hidden_dim": 16, "dim": 12, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    return VICReg(config, context=context,
                  slots=built_slots(encoder=tiny_encoder(), loss=VICRegLoss(VICRegLossConfig())))


def formula_invariance(z: list[list[float]], z_prime: list[list[float]]) -> float:
    """The mean over all n x d entries of (z - z')^2."""
    n, d = len(z), len(z[0])
    return sum((z[i][j] - z_prime[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)


def formula_variance(z: list[list[float]]) -> float:
    """v(Z) = (1/d) sum_j max(0, 1 - sqrt(Var(z^j) + 1e-4)), Var with n - 1, one dimension at a time."""
    n, d = len(z), len(z[0])
    total = 0.0
    for j in range(d):
        mean = sum(z[i][j] for i in range(n)) / n
        std = math.sqrt(sum((z[i][j] - mean) ** 2 for i in range(n)) / (n - 1) + 1e-4)
        total += max(0.0, 1.0 - std)
    return total / d


def formula_covariance(z: list[list[float]]) -> float:
    """c(Z) = (1/d) sum_{j != k} Cov(z^j, z^k)^2, each covariance with n - 1."""
    n, d = len(z), len(z[0])
    means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
    total = 0.0
    for j in range(d):
        for k in range(d):
            if j != k:
                cov = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                total += cov ** 2
    return total / d


def formula_terms(z: torch.Tensor, z_prime: torch.Tensor) -> dict[str, float]:
    a, b = z.tolist(), z_prime.tolist()
    return {"invariance": formula_invariance(a, b),
            "variance": (formula_variance(a) + formula_variance(b)) / 2,
            "covariance": formula_covariance(a) + formula_covariance(b)}


def formula_loss(z: torch.Tensor, z_prime: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                 cov: float = 1.0) -> float:
    terms = formula_terms(z, z_prime)
    return sim * terms["invariance"] + std * terms["variance"] + cov * terms["covariance"]


def test_loss_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    # dimensions of std below and above gamma = 1, so the hinge is both active and inactive
    z = torch.randn(7, 5, generator=generator) * torch.tensor([0.2, 0.5, 1.5, 3.0, 0.9])
    z_prime = z + 0.3 * torch.randn(7, 5, generator=generator)
    loss_fn = VICRegLoss(VICRegLossConfig())
    assert loss_fn(z, z_prime).item() == pytest.approx(formula_loss(z, z_prime), rel=1e-5)
    terms = loss_fn.metrics()
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert not any(t.requires_grad for t in terms.values())
    for name, value in formula_terms(z, z_prime).items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    weighted = VICRegLoss(VICRegLossConfig(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5))
    assert weighted(z, z_prime).item() == pytest.approx(formula_loss(z, z_prime, 2.0, 3.0, 0.5), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(z.bfloat16(), z_prime.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_loss(z.bfloat16().float(), z_prime.bfloat16().float()), rel=1e-5)


def test_each_term_vanishes_where_the_paper_says() -> None:
    loss_fn = VICRegLoss(VICRegLossConfig())
    # +-2 columns: equal views, std above 1, uncorrelated dimensions: every term is 0
    z = 2 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert loss_fn(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # a collapsed batch: every row the same, std sqrt(1e-4) = 0.01 in each dimension
    collapsed = torch.ones(4, 3)
    loss_fn(collapsed, collapsed)
    assert loss_fn.metrics()["variance"].item() == pytest.approx(0.99)
    assert loss_fn.metrics()["covariance"].item() == 0.0


def test_expander_is_that_of_the_official_code() -> None:
    model = build_vicreg(projector_hidden_dim=24, dim=32)
    layers = [(type(m).__name__, getattr(m, "bias", None) is not None) for m in model.projector]
    assert layers == [("Linear", True), ("BatchNorm1d", True), ("ReLU", False),
                      ("Linear", True), ("BatchNorm1d", True), ("ReLU", False), ("Linear", False)]
    assert [m.weight.shape for m in model.projector if isinstance(m, nn.Linear)] == [(24, 8), (24, 24), (32, 24)]


def test_the_views_go_through_separately_and_the_terms_are_reported() -> None:
    torch.manual_seed(0)
    model = build_vicreg().train()
    embeddings: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: embeddings.append(out.detach()))
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator) for _ in range(2)]

    out = model(views)
    out["loss"].backward()

    assert [z.shape for z in embeddings] == [(GLOBAL_BATCH, 12), (GLOBAL_BATCH, 12)]  # one batch per view
    z, z_prime = embeddings
    assert out["loss"].item() == pytest.approx(formula_loss(z, z_prime), rel=1e-5)
    for name, value in formula_terms(z, z_prime).items():
        assert out[name].ndim == 0 and out[name].item() == pytest.approx(value, rel=1e-5), name
    assert all(p.grad is not None for p in model.parameters())


def inputs() -> list[torch.Tensor]:
    """The global batch of both views: GLOBAL_BATCH x 8 each."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 8, generator=generator)]


def linear() -> nn.Module:
    return nn.Linear(8, 16)


def vicreg_of_both_views(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Both views through ``model`` in one forward, then the loss, whose value and terms every worker computes
    alike: those of the global batch, not of its half (the mean loss is compared with one process's)."""
    z, z_prime = model(torch.cat(views)).chunk(2)
    loss_fn = VICRegLoss(VICRegLossConfig())
    loss = loss_fn(z, z_prime)
    values = torch.stack([loss.detach(), *loss_fn.metrics().values()])  # the loss, s, v and c
    every_worker = concat_all_gather(values[None])
    assert torch.equal(every_worker, values.expand_as(every_worker)), f"workers' loss and terms differ: {every_worker}"
    return loss


def test_two_workers_compute_the_loss_and_gradients_of_one_process_on_the_global_batch() -> None:
    check_workers_match_one_process(linear, inputs, loss=vicreg_of_both_views)


def test_vicreg_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_vicreg.plugin", [("method", "vicreg"), ("loss", "vicreg")])


def test_the_installed_entry_point_registers_vicreg() -> None:
    check_entry_point("sslcore-vicreg", [("method", "vicreg"), ("loss", "vicreg")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "vicreg"), registry.get("loss", "vicreg")
    assert method.factory is VICReg and loss.factory is VICRegLoss
    assert {slot: (s.needs, dict(s.default)) for slot, s in method.slots.items()} == {
        "encoder": (Encoder, {"name": "resnet50", "zero_init_residual": True}),
        "augmentation": (Augmentation, {"name": "byol"}),
        "loss": (PairedLoss, {"name": "vicreg", "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0})}
    assert loss.meets(PairedLoss)


def test_method_alone_resolves_to_the_official_recipe(registry: Registry, tmp_path: Path) -> None:
    # facebookresearch/vicreg main_vicreg.py @ cc1ef4f1584a26770308a9b8f1538e490a6d4b43 (the same at HEAD
    # 4e12602) with the README's 1000-epoch command (--epochs 1000 --batch-size 2048 --base-lr 0.2; the
    # argparse default of --epochs is 100): --wd 1e-6, LARS(momentum 0.9, eta 0.001) whose weight_decay_filter
    # and lars_adaptation_filter are exclude_bias_and_norm (p.ndim == 1), adjust_learning_rate: base_lr x
    # batch_size / 256, 10 warmup epochs, cosine to end_lr = base_lr x 0.001, the same lr for every parameter
    registry.add_module("sslcore_vicreg.plugin")
    experiment = resolve({"method": "vicreg", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-6,
                                  "trust_coefficient": 0.001, "clip_lr": False}
    assert train["lr_scaling"] == "linear"
    assert (train["warmup_epochs"], train["schedule"], train["final_lr"]) == (10, "cosine", 0.001)
    assert (train["epochs"], train["batch_size"]) == (1000, 2048)
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": True,
                                                       "fixed_lr": False}}
    assert (train["weight_decay_end"], train["grad_clip"]) == (None, None)
    assert experiment["method"] == {"name": "vicreg", "projector_hidden_dim": 8192, "dim": 8192}  # --mlp
    assert experiment["encoder"]["name"] == "resnet50" and experiment["encoder"]["zero_init_residual"] is True
    assert experiment["loss"] == {"name": "vicreg", "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}
    augmentation = experiment["augmentation"]  # augmentations.py: blur 1.0 / 0.1, solarization 0.0 / 0.2
    assert augmentation["name"] == "byol" and augmentation["scale"] == [0.08, 1.0]
    assert (augmentation["blur_prob"], augmentation["solarize_prob"]) == ([1.0, 0.1], [0.0, 0.2])


def test_the_cifar10_example_is_solo_learns_recipe(registry: Registry, tmp_path: Path) -> None:
    registry.add_module("sslcore_vicreg.plugin")
    config = tmp_path / EXAMPLE.name
    config.write_text(EXAMPLE.read_text().replace("~/.cache/sslcore/cifar10", str(tmp_path)))
    experiment = load_experiment(config, registry).as_dict()
    train = experiment["train"]
    _, optimization = build_for_training(experiment, registry)
    groups = {g["group"]: g for g in optimization.optimizer.param_groups}  # initial_lr: the peak lr
    assert groups["rest"]["initial_lr"] == groups["bias_and_norm"]["initial_lr"] == pytest.approx(0.3)  # 0.3 x 256/256
    assert (groups["rest"]["weight_decay"], groups["bias_and_norm"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["rest"]["lars_exclude"], groups["bias_and_norm"]["lars_exclude"]) == (False, True)
    assert train["optimizer"]["trust_coefficient"] == 0.02 and train["optimizer"]["clip_lr"] is True
    assert (train["warmup_epochs"], train["final_lr"], train["epochs"]) == (10, 0.0, 1000)
    augmentation = experiment["augmentation"]
    assert augmentation["scale"] == [0.2, 1.0]
    assert (augmentation["blur_prob"], augmentation["solarize_prob"]) == ([0.0, 0.0], [0.1, 0.1])


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path)
    state = torch.load(RunDir(run_dir).checkpoints()[0], weights_only=True)["model"]
    assert state["projector.6.weight"].shape == (2048, 2048)
