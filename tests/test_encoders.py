"""torchvision ResNet encoders: feature shapes, the CIFAR stem, and loading into plain torchvision."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from sslcore.components.encoders import ResNetConfig, plain_torchvision_resnet, resnet18, resnet50

torch.set_num_threads(1)


@pytest.mark.parametrize(("factory", "feature_dim"), [(resnet18, 512), (resnet50, 2048)])
def test_features_are_n_by_feature_dim(factory, feature_dim):
    encoder = factory(ResNetConfig())
    assert isinstance(encoder, models.ResNet)
    assert encoder.feature_dim == feature_dim
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, feature_dim)


def test_cifar_stem_replaces_conv1_and_maxpool():
    standard = resnet18(ResNetConfig())
    cifar = resnet18(ResNetConfig(cifar_stem=True))
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.bias is None
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize(("cifar_stem", "maxpool", "layer1_side"),
                         [(False, None, 8), (True, None, 32), (True, True, 16), (False, False, 16)])
def test_maxpool_option_sets_the_layer1_resolution(cifar_stem, maxpool, layer1_side):
    encoder = resnet18(ResNetConfig(cifar_stem=cifar_stem, maxpool=maxpool))
    x = torch.randn(2, 3, 32, 32)
    stem = nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
    assert stem(x).shape[-2:] == (layer1_side, layer1_side)
    plain = plain_torchvision_resnet("resnet18", cifar_stem, maxpool).eval()
    plain.load_state_dict(encoder.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), encoder.eval()(x))


def test_zero_init_residual_zeroes_last_block_norms():
    encoder = resnet18(ResNetConfig(zero_init_residual=True))
    last_norms = [block.bn2.weight for layer in (encoder.layer1, encoder.layer4) for block in layer]
    assert all((weight == 0).all() for weight in last_norms)


def torchvision_by_hand(cifar_stem: bool) -> nn.Module:
    """The recipe of plain_torchvision_resnet's docstring, written out independently."""
    model = models.resnet18()
    model.fc = nn.Identity()
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_state_dict_loads_strictly_into_plain_torchvision(cifar_stem):
    encoder = resnet18(ResNetConfig(cifar_stem=cifar_stem)).eval()
    x = torch.randn(2, 3, 32, 32)
    for plain in (torchvision_by_hand(cifar_stem), plain_torchvision_resnet("resnet18", cifar_stem)):
        assert type(plain) is models.ResNet
        plain.load_state_dict(encoder.state_dict(), strict=True)
        plain.eval()
        with torch.no_grad():
            assert torch.equal(encoder(x), plain(x))


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="extra"):
        ResNetConfig(pretrained=True)
