"""The shared head builder and the momentum (EMA) update and schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslcore.toolkit.ema import momentum_update
from sslcore.toolkit.heads import MLPHead


def test_mlp_head_layers_follow_the_dims_and_options() -> None:
    head = MLPHead([16, 32, 32, 8], hidden_bias=False, output_bias=False, output_norm="bn_noaffine")
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear,
                     nn.BatchNorm1d]
    linears = [layer for layer in head if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features, lin.bias is not None) for lin in linears] == [
        (16, 32, False), (32, 32, False), (32, 8, False)]
    assert not head[-1].affine
    assert head(torch.randn(4, 16)).shape == (4, 8)

    byol = MLPHead([16, 64, 8])
    assert [type(layer) for layer in byol] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert byol[0].bias is not None and byol[-1].bias is not None
    assert MLPHead([16, 8], output_norm="bn")[-1].affine


def test_mlp_head_needs_two_widths() -> None:
    with pytest.raises(ValueError, match="at least an input and an output"):
        MLPHead([16])


def test_momentum_update_follows_the_formula() -> None:
    target, online = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    before = [o.clone() for o in online]
    momentum_update(target, online, 0.9)
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e)
    assert all(torch.equal(o, b) for o, b in zip(online, before))
