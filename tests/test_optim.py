"""LARS against its update rule written out here; optimizers as a registered kind; parameter groups and the
learning-rate schedule the engine builds from a recipe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslcore.api.errors import ConfigError
from sslcore.api.recipe import Schedule, TrainConfig, peak_lr
from sslcore.config import resolve
from sslcore.engine.build import build_optimization, parameter_groups
from sslcore.registry import Registry
from sslcore.toolkit.lars import LARS

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 0.01, 0.001


def lars_reference(w: list[float], grads: list[list[float]], adapt: bool, wd: float, clip: bool = False) -> list[float]:
    """The LARS update on plain floats, one step per gradient in ``grads``."""
    mu = [0.0] * len(w)
    for g in grads:
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        if adapt:
            w_norm = math.sqrt(sum(x * x for x in w))
            d_norm = math.sqrt(sum(x * x for x in d))
            trust = ETA * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
            if clip:
                trust = min(trust / LR, 1.0)
            d = [x * trust for x in d]
        mu = [MOMENTUM * m + x for m, x in zip(mu, d)]
        w = [wi - LR * m for wi, m in zip(w, mu)]
    return w


@pytest.mark.parametrize(("adapt", "wd", "clip"), [(True, WD, False), (False, 0.0, False), (False, WD, False),
                                                   (True, WD, True)])
def test_lars_follows_the_update_rule(adapt: bool, wd: float, clip: bool) -> None:
    w0 = [0.3, -1.2, 2.0, 0.7]
    grads = [[0.5, 0.1, -0.3, 2.0], [-1.0, 0.4, 0.2, 0.1], [0.0, 3.0, -0.5, 0.25]]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    optimizer = LARS([{"params": [w], "lars_exclude": not adapt, "weight_decay": wd}], lr=LR, momentum=MOMENTUM,
                     weight_decay=WD, trust_coefficient=ETA, clip_lr=clip)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor(lars_reference(w0, grads, adapt, wd, clip),
                                                        dtype=torch.float64))


def test_clip_lr_caps_a_large_trust_ratio_at_the_lr() -> None:
    # a tiny gradient: trust ratio eta ||w|| / ||g|| = 0.001 * 1 / 1e-5 = 100, above 1 / lr = 10
    for clip, step in ((True, 0.1 * 1e-5), (False, 0.1 * 100 * 1e-5)):  # clipped: lr x g, the plain SGD step
        w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        optimizer = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.001, clip_lr=clip)
        w.grad = torch.tensor([1e-5, 0.0], dtype=torch.float64)
        optimizer.step()
        torch.testing.assert_close(w.detach(), torch.tensor([1.0 - step, 0.0], dtype=torch.float64))


def test_lars_leaves_a_zero_weight_to_plain_sgd() -> None:
    w = torch.zeros(3, requires_grad=True)
    optimizer = LARS([w], lr=LR, momentum=0.0, weight_decay=WD, trust_coefficient=ETA)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    optimizer.step()
    torch.testing.assert_close(w.detach(), -LR * torch.tensor([1.0, -2.0, 0.5]))


def test_the_lars_block_is_validated(tmp_path) -> None:
    data = {"method": "x", "data": {"name": "image_folder", "root": str(tmp_path)},
            "train": {"optimizer": {"name": "lars", "lr": 0.3, "trust_coeficient": 0.01}}}
    with pytest.raises(ConfigError, match=r"train\.optimizer\.trust_coeficient: unknown key .*trust_coefficient"):
        resolve(data, Registry(autoload=False))


def test_an_unknown_optimizer_names_the_registered_ones(tmp_path) -> None:
    data = {"method": "x", "data": {"name": "image_folder", "root": str(tmp_path)},
            "train": {"optimizer": {"name": "lamb"}}}
    with pytest.raises(ConfigError, match=r"unknown optimizer 'lamb' \(choose from: adamw, lars, sgd\)"):
        resolve(data, Registry(autoload=False))


class Toy(nn.Module):
    """A method-shaped module: a body, a head, and a named group."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 2)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.head.parameters())}


def groups_of(model: nn.Module, **train: object) -> dict[str, dict]:
    config = TrainConfig.model_validate({"optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}, **train})
    train_dict = config.model_dump()
    groups = parameter_groups(model, "toy", train_dict, {"lr": 0.1, "weight_decay": 1e-4}, 512)
    return {g["group"]: g for g in groups}


def test_a_parameter_joins_the_first_group_that_claims_it() -> None:
    model = Toy()
    groups = groups_of(model, param_groups={"head": {"fixed_lr": True}, "bias_and_norm": {"weight_decay": 0.0}})
    assert [id(p) for p in groups["head"]["params"]] == [id(model.head.weight), id(model.head.bias)]  # bias too
    assert [id(p) for p in groups["bias_and_norm"]["params"]] == [id(p) for p in model.body[1].parameters()]
    assert [id(p) for p in groups["rest"]["params"]] == [id(model.body[0].weight)]
    assert groups["bias_and_norm"]["weight_decay"] == 0.0 and groups["rest"]["weight_decay"] == 1e-4
    assert groups["head"]["fixed_lr"] and groups["head"]["lr"] == pytest.approx(0.1 * 512 / 256)


def test_a_group_lr_is_a_base_lr_scaled_by_the_rule() -> None:
    groups = groups_of(Toy(), lr_scaling="sqrt", param_groups={"head": {"lr": 0.02}})
    assert groups["rest"]["lr"] == pytest.approx(0.1 * math.sqrt(512))
    assert groups["head"]["lr"] == pytest.approx(0.02 * math.sqrt(512))
    assert peak_lr(0.3, "none", 4096) == 0.3 and peak_lr(0.3, "linear", 4096) == pytest.approx(4.8)
    assert peak_lr(0.075, "sqrt", 4096) == pytest.approx(4.8)  # SimCLR: the two rules agree at 4096


def test_an_undeclared_group_of_the_method_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"parameter_groups\(\) returns \['head'\]"):
        groups_of(Toy())


def test_schedule_is_linear_warmup_then_cosine_to_its_end() -> None:
    lr = Schedule(start=1.0, end=0.0, warmup_epochs=2)  # 2 steps per epoch: 4 warmup steps of 20
    assert [lr.at(s, 2, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr.at(4, 2, 20) == 1.0
    assert lr.at(12, 2, 20) == pytest.approx(0.5)  # half-way through the decay: cos(pi/2)
    assert lr.at(20, 2, 20) == pytest.approx(0.0)
    assert Schedule(start=1.0, warmup_epochs=2).at(15, 2, 20) == 1.0  # constant after the warmup
    barlow = Schedule(start=1.0, end=0.001)
    assert barlow.at(0, 1, 10) == 1.0 and barlow.at(10, 1, 10) == pytest.approx(0.001)
    byol = Schedule(start=0.996, end=1.0)  # tau_k = 1 - (1 - 0.996)(cos(pi k / K) + 1) / 2
    for k in (0, 3, 7, 10):
        assert byol.at(k, 1, 10) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 10) + 1) / 2)
    assert Schedule(start=0.04, end=0.07, shape="linear").at(5, 1, 10) == pytest.approx(0.055)


def test_fixed_groups_stay_at_their_peak_and_the_rest_follows_the_schedule() -> None:
    registry = Registry(autoload=False)
    model = Toy()
    train = TrainConfig.model_validate({"optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4},
                                        "warmup_epochs": 1, "final_lr": 0.01, "weight_decay_end": 1e-3,
                                        "param_groups": {"head": {"fixed_lr": True}}}).model_dump()
    experiment = {"method": {"name": "toy"}, "train": {**train, "batch_size": 256,
                                                       "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                                                     "weight_decay": 1e-4, "nesterov": False}}}
    optimization = build_optimization(model, experiment, registry, steps_per_epoch=2, total_steps=10)
    assert optimization.group_names == ["rest", "head"]
    expected = Schedule(start=1.0, end=0.01, warmup_epochs=1)
    for step in range(10):
        rest, head = (group["lr"] for group in optimization.optimizer.param_groups)
        assert rest == pytest.approx(0.1 * expected.at(step, 2, 10)) and head == pytest.approx(0.1)
        optimization.optimizer.step()
        optimization.scheduler.step()
    assert optimization.weight_decay == Schedule(start=1e-4, end=1e-3)


def test_a_step_schedule_multiplies_by_gamma_at_each_milestone() -> None:
    train = TrainConfig(schedule="step", milestones=[2, 3.5], gamma=0.2, warmup_epochs=1, warmup_start=0.25)
    from sslcore.engine.build import lr_schedule

    schedule = lr_schedule(train.model_dump())
    steps_per_epoch, total = 4, 20
    factors = [schedule.at(k, steps_per_epoch, total) for k in range(total)]
    # warmup over epoch 0 from 0.25 (reaching 1 at its last step), then 1 until epoch 2 (step 8), 0.2 until
    # epoch 3.5 (step 14), then 0.04
    expected = [0.25 + 0.75 * (k + 1) / 4 for k in range(4)] + [1.0] * 4 + [0.2] * 6 + [0.04] * 6
    assert factors == pytest.approx(expected)


def test_warmup_starts_at_its_fraction_of_the_peak() -> None:
    from sslcore.engine.build import lr_schedule

    schedule = lr_schedule(TrainConfig(warmup_epochs=2, warmup_start=0.0625, final_lr=0.001).model_dump())
    assert schedule.at(0, 5, 50) == pytest.approx(0.0625 + (1 - 0.0625) / 10)
    assert schedule.at(9, 5, 50) == pytest.approx(1.0)
    assert schedule.at(49, 5, 50) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_per_parameter_clipping_scales_each_gradient_above_the_bound_on_its_own() -> None:
    from sslcore.engine.loop import clip_gradients

    grads = [[3.0, 4.0], [0.3, 0.4], [0.0, 12.0]]  # norms 5, 0.5, 12
    params = [nn.Parameter(torch.zeros(2)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    clip_gradients(params, 1.0, "per_parameter")
    # DINO's utils.clip_gradients: g * clip / (||g|| + 1e-6) where that factor is below 1
    for p, g in zip(params, grads):
        norm = math.sqrt(sum(x * x for x in g))
        factor = min(1.0, 1.0 / (norm + 1e-6))
        assert p.grad.tolist() == pytest.approx([x * factor for x in g])
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    clip_gradients(params, 1.0, "total")  # the norm of all of them together: sqrt(25 + 0.25 + 144)
    total = math.sqrt(25 + 0.25 + 144)
    for p, g in zip(params, grads):
        assert p.grad.tolist() == pytest.approx([x / total for x in g], rel=1e-5)
