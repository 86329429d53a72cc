"""BYOL: the loss against its formula written out here, the heads of the official code, the stop-gradient and
the EMA target with its cosine schedule (also across a resume), two real gloo workers against one process,
the recipe of the official code through the engine, the plugin contract, and the CIFAR-10 example through
the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sslcore_byol import BYOL, BYOLConfig, BYOLLoss, BYOLLossConfig
from sslcore_byol.plugin import RECIPE, SLOTS
from torch import nn

from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, Slot
from sslcore.api.recipe import TrainingStep
from sslcore.config import resolve
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

GLOBAL_BATCH = 16


def build_byol(**method) -> BYOL:
    config = BYOLConfig(**{"projector_hidden_dim": 16, "dim": 8, "predictor_hidden_dim": 16, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=100,
                            epochs=1, device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    return BYOL(config, context=context, slots=built_slots(encoder=tiny_encoder(), loss=BYOLLoss(BYOLLossConfig())))


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
    """The official byol_experiment.py / utils/schedules.py: tau_k = 1 - (1 - base)(cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2


def training_step(model: BYOL, k: int, total: int) -> TrainingStep:
    """The TrainingStep the engine passes at optimizer step k of ``total`` (one epoch)."""
    return TrainingStep(index=k, epoch=0, steps_per_epoch=total, total_steps=total,
                        values={name: schedule.at(k, total, total) for name, schedule in model.schedules().items()})


def test_loss_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=generator) * 3, torch.randn(6, 5, generator=generator)
    loss_fn = BYOLLoss(BYOLLossConfig())
    assert isinstance(loss_fn, PairedLoss) and loss_fn.metrics() == {}
    assert loss_fn(p, z).item() == pytest.approx(formula_loss(p, z), rel=1e-5)
    # the normalised MSE of the paper: || p/||p|| - z/||z|| ||^2 per row
    assert loss_fn(p, p * 2).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(p, -p).item() == pytest.approx(4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(p.bfloat16(), z.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_loss(p.bfloat16().float(), z.bfloat16().float()), rel=1e-5)


def test_heads_are_those_of_the_official_code_with_no_bias_in_the_last_linear() -> None:
    """deepmind-research byol/utils/networks.py MLP: Linear(with_bias=True)-BN-ReLU-Linear(with_bias=False)."""
    model = build_byol(projector_hidden_dim=24, dim=12, predictor_hidden_dim=20)
    for head, widths in ((model.projector, [(24, 8), (12, 24)]), (model.predictor, [(20, 12), (12, 20)])):
        layers = [(type(m).__name__, getattr(m, "bias", None) is not None) for m in head]
        assert layers == [("Linear", True), ("BatchNorm1d", True), ("ReLU", False), ("Linear", False)]
        assert [m.weight.shape for m in head if isinstance(m, nn.Linear)] == widths
    # the target projector is a copy of the online one, without a bias in its last Linear as well
    assert model.target_projector[-1].bias is None


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

    assert sorted(out) == ["loss"]  # tau is the engine's to log (schedules())
    assert all(not z.requires_grad for z in targets)
    assert all(p.grad is None for p in target_parameters(model))
    assert all(p.grad is not None for p in [*online_parameters(model), *model.predictor.parameters()])
    with torch.no_grad():  # the same modules again, in training mode: the same batch statistics
        p1 = model.predictor(model.projector(model.backbone(v1)))
        p2 = model.predictor(model.projector(model.backbone(v2)))
    expected = formula_loss(p1, targets[1]) + formula_loss(p2, targets[0])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_the_target_moves_only_by_the_ema_after_each_optimizer_step() -> None:
    torch.manual_seed(0)
    total, base = 4, 0.5
    model = build_byol(base_momentum=base).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for k in range(total):
        xi = [p.detach().clone() for p in target_parameters(model)]
        out = model(views(seed=k))
        assert all(torch.equal(p, before) for p, before in zip(target_parameters(model), xi)), "forward moved xi"
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert all(torch.equal(p, before) for p, before in zip(target_parameters(model), xi)), "the step moved xi"
        theta = [p.detach().clone() for p in online_parameters(model)]  # after step k

        step = training_step(model, k, total)
        tau = formula_tau(k, total, base)
        assert step.values["tau"] == pytest.approx(tau)
        model.after_optimizer_step(step)

        for p_target, before_target, after_online in zip(target_parameters(model), xi, theta):
            torch.testing.assert_close(p_target, tau * before_target + (1 - tau) * after_online)
    assert not all(torch.equal(p, q) for p, q in zip(target_parameters(model), online_parameters(model)))


def test_momentum_schedule_values() -> None:
    total = 10
    tau = build_byol(base_momentum=0.99).schedules()["tau"]
    assert tau.at(0, total, total) == pytest.approx(0.99)
    assert tau.at(total // 2, total, total) == pytest.approx(0.995)
    assert tau.at(total, total, total) == pytest.approx(1.0)
    for k in range(total):
        assert tau.at(k, 5, total) == pytest.approx(formula_tau(k, total, 0.99))  # no warmup: per step of the run
    constant = build_byol(base_momentum=0.99, momentum_schedule="constant").schedules()["tau"]
    assert constant.end is None
    assert [constant.at(k, total, total) for k in (0, 5, 10)] == [0.99, 0.99, 0.99]


def test_a_resumed_run_continues_the_schedule_from_the_state_dict() -> None:
    """The step index is the engine's (restored on resume): the method's state holds no counter, and a run
    interrupted after 2 of 4 steps ends with the target of the uninterrupted one."""
    total = 4

    def train(model: BYOL, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for k in steps:
            optimizer.zero_grad()
            model(views(seed=k))["loss"].backward()
            optimizer.step()
            model.after_optimizer_step(training_step(model, k, total))

    def fresh() -> tuple[BYOL, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_byol(base_momentum=0.5).train()
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)

    whole, whole_optimizer = fresh()
    train(whole, whole_optimizer, range(total))

    first, first_optimizer = fresh()
    train(first, first_optimizer, range(2))
    assert not any("step" in key.split(".")[-1] for key in first.state_dict())
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(first.state_dict())
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    train(resumed, resumed_optimizer, range(2, total))

    for got, expected in zip(target_parameters(resumed), target_parameters(whole)):
        torch.testing.assert_close(got, expected)


def byol_in_eval_mode() -> BYOL:
    """Its BatchNorms on running statistics: no batch statistic couples a worker's rows."""
    return build_byol().eval()


def test_two_workers_compute_the_loss_and_gradients_of_one_process() -> None:
    check_workers_match_one_process(byol_in_eval_mode, views)


def test_method_byol_alone_resolves_to_the_official_recipe(registry: Registry, tmp_path: Path) -> None:
    """google-deepmind/deepmind-research byol/ @ 82a347438fd93bdd4bc01764258223ae583e5cbf: configs/byol.py
    (_LR_PRESETS[1000] = 0.2, _WD_PRESETS[1000] = 1.5e-6, eta 1e-3, momentum .9, warmup_steps = 10 epochs),
    main_loop.py (batch_size 4096, pretrain_epochs 1000), utils/schedules.py (scaled_lr = base x B / 256,
    cosine to 0), byol_experiment.py (exclude_bias_and_norm: no weight decay, no LARS adaptation)."""
    registry.add_module("sslcore_byol.plugin")
    resolved = resolve({"method": "byol", "data": {"name": "image_folder", "root": str(tmp_path)}}, registry)
    experiment = resolved.as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1.5e-6,
                                  "trust_coefficient": 1e-3, "clip_lr": False}
    assert (train["lr_scaling"], train["warmup_epochs"], train["schedule"], train["final_lr"]) == \
        ("linear", 10, "cosine", 0.0)
    assert (train["epochs"], train["batch_size"], train["grad_clip"], train["weight_decay_end"]) == \
        (1000, 4096, None, None)
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": True,
                                                       "fixed_lr": False}}
    assert experiment["encoder"]["name"] == "resnet50" and experiment["augmentation"]["name"] == "byol"
    assert experiment["loss"] == {"name": "byol"}
    assert experiment["method"] == {"name": "byol", "projector_hidden_dim": 4096, "dim": 256,
                                    "predictor_hidden_dim": 4096, "base_momentum": 0.996,
                                    "momentum_schedule": "cosine"}


def test_the_engine_exempts_biases_and_norms_from_weight_decay_and_trust_ratio(registry: Registry,
                                                                              tmp_path: Path) -> None:
    registry.add_module("sslcore_byol.plugin")
    batch, steps_per_epoch, epochs = 512, 2, 20  # warmup: 10 epochs = 20 steps of the 40
    data = {"method": {"name": "byol", "projector_hidden_dim": 16, "dim": 8, "predictor_hidden_dim": 16},
            "encoder": {"name": "resnet18", "cifar_stem": True},
            "data": {"name": "image_folder", "root": str(tmp_path)}, "train": {"batch_size": batch}}
    experiment = resolve(data, registry).as_dict()
    method, optimization = build_for_training(experiment, registry, steps_per_epoch=steps_per_epoch, epochs=epochs)
    total = steps_per_epoch * epochs
    groups = {group["group"]: group for group in optimization.optimizer.param_groups}
    assert sorted(groups) == ["bias_and_norm", "rest"]
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert {id(p) for p in groups["bias_and_norm"]["params"]} == {id(p) for p in trainable if p.ndim <= 1}
    assert {id(p) for p in groups["rest"]["params"]} == {id(p) for p in trainable if p.ndim > 1}
    assert (groups["rest"]["weight_decay"], groups["rest"]["lars_exclude"]) == (1.5e-6, False)
    assert (groups["bias_and_norm"]["weight_decay"], groups["bias_and_norm"]["lars_exclude"]) == (0.0, True)
    assert groups["rest"]["trust_coefficient"] == 1e-3 and groups["rest"]["momentum"] == 0.9
    peak = 0.2 * batch / 256
    warmup = 10 * steps_per_epoch
    for k in range(total):
        # utils/schedules.py: linear warmup to the peak, then cosine to 0 over the remaining steps (the
        # official warmup is k / warmup, sslcore's reaches the peak one step earlier: (k + 1) / warmup)
        expected = peak * (k + 1) / warmup if k < warmup else \
            peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        for group in optimization.optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected)
        optimization.optimizer.step()
        optimization.scheduler.step()


def test_byol_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_byol.plugin", [("method", "byol"), ("loss", "byol")])


def test_the_installed_entry_point_registers_byol() -> None:
    check_entry_point("sslcore-byol", [("method", "byol"), ("loss", "byol")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "byol"), registry.get("loss", "byol")
    assert method.factory is BYOL and loss.factory is BYOLLoss
    assert method.slots == SLOTS == {"encoder": Slot(Encoder, {"name": "resnet50"}),
                                     "augmentation": Slot(Augmentation, {"name": "byol"}),
                                     "loss": Slot(PairedLoss, {"name": "byol"})}
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(Path(__file__).parents[3] / "examples" / "byol_cifar10.yaml", cifar10_dir,
                                  tmp_path)
    state = torch.load(RunDir(run_dir).checkpoints()[0], weights_only=True)
    assert "step" not in state["model"]  # the schedule's step is the engine's, restored on resume
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["subset"] == "train"]
    # the engine logs the scheduled tau of the last step, here step 1 of the 2 of the brief run
    assert train and train[-1]["tau"] == pytest.approx(formula_tau(1, 2, 0.99))
