"""LARS against its update rule written out here, and the ``train.optimizer: {name: lars}`` block."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslcore.api.errors import ConfigError
from sslcore.config import resolve
from sslcore.registry import Registry
from sslcore.toolkit.lars import LARS, build_optimizer

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 0.01, 0.001


def lars_reference(w: list[float], grads: list[list[float]], adapt: bool) -> list[float]:
    """The LARS update on plain floats, one step per gradient in ``grads``."""
    mu = [0.0] * len(w)
    for g in grads:
        d = [gi + WD * wi for gi, wi in zip(g, w)] if adapt else list(g)
        if adapt:
            w_norm = math.sqrt(sum(x * x for x in w))
            d_norm = math.sqrt(sum(x * x for x in d))
            trust = ETA * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
            d = [x * trust for x in d]
        mu = [MOMENTUM * m + x for m, x in zip(mu, d)]
        w = [wi - LR * m for wi, m in zip(w, mu)]
    return w


@pytest.mark.parametrize("adapt", [True, False])
def test_lars_follows_the_update_rule(adapt: bool) -> None:
    w0 = [0.3, -1.2, 2.0, 0.7]
    grads = [[0.5, 0.1, -0.3, 2.0], [-1.0, 0.4, 0.2, 0.1], [0.0, 3.0, -0.5, 0.25]]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    optimizer = LARS([{"params": [w], "lars_exclude": not adapt, "weight_decay": WD if adapt else 0.0}],
                     lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor(lars_reference(w0, grads, adapt), dtype=torch.float64))


def test_lars_leaves_a_zero_weight_to_plain_sgd() -> None:
    w = torch.zeros(3, requires_grad=True)
    optimizer = LARS([w], lr=LR, momentum=0.0, weight_decay=WD, trust_coefficient=ETA)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    optimizer.step()
    torch.testing.assert_close(w.detach(), -LR * torch.tensor([1.0, -2.0, 0.5]))


def test_biases_and_norm_parameters_are_excluded() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    block = {"name": "lars", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.001,
             "exclude_bias_and_norm": True}
    optimizer = build_optimizer(model, block)
    adapted, excluded = optimizer.param_groups
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0
    assert not adapted["lars_exclude"] and adapted["weight_decay"] == 1e-4

    everything = build_optimizer(model, {**block, "exclude_bias_and_norm": False})
    assert len(everything.param_groups) == 1 and not everything.param_groups[0]["lars_exclude"]


def test_the_lars_block_is_validated(tmp_path) -> None:
    data = {"method": "x", "data": {"name": "image_folder", "root": str(tmp_path)},
            "train": {"optimizer": {"name": "lars", "lr": 0.3, "trust_coeficient": 0.01}}}
    with pytest.raises(ConfigError, match=r"train\.optimizer\.trust_coeficient: unknown key .*trust_coefficient"):
        resolve(data, Registry(autoload=False))
