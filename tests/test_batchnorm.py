"""Split batch norm (sslcore.toolkit.batchnorm): each group against plain batch norm, the conversion of an
encoder, and the one-line refusal of groups too small for statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslcore.components.encoders import plain_torchvision_resnet
from sslcore.registry import Registry
from sslcore.toolkit.batchnorm import SplitBatchNorm, convert_split_batchnorm


def test_split_batchnorm_normalizes_each_group_with_its_own_statistics() -> None:
    torch.manual_seed(0)
    splits, n, c = 4, 12, 3
    bn = SplitBatchNorm(c, num_splits=splits)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(n, c, 5, 5) * 3 + 1).requires_grad_()
    grad_out = torch.randn(n, c, 5, 5)

    out = bn(x)
    out.backward(grad_out)

    # the reference: each group (a contiguous slice of n / splits samples) through plain batch norm
    x_ref = x.detach().clone().requires_grad_()
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    size = n // splits
    groups = [x_ref[g * size:(g + 1) * size] for g in range(splits)]
    expected = torch.cat([F.batch_norm(group, None, None, weight, bias, training=True, eps=bn.eps)
                          for group in groups])
    expected.backward(grad_out)
    expected_mean = sum(0.1 * group.detach().mean(dim=(0, 2, 3)) for group in groups) / splits
    expected_var = sum(0.9 + 0.1 * group.detach().var(dim=(0, 2, 3), unbiased=True) for group in groups) / splits
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, weight.grad)
    torch.testing.assert_close(bn.bias.grad, bias.grad)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert int(bn.num_batches_tracked) == 1

    x_channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    channels_last = bn(x_channels_last)
    channels_last.backward(grad_out.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, expected)
    torch.testing.assert_close(x_channels_last.grad, x_ref.grad)

    plain = nn.BatchNorm2d(c)
    assert list(bn.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn.eval()(x), plain.eval()(x))


def test_split_batchnorm_under_bf16_autocast_matches_plain_batch_norm_per_group() -> None:
    torch.manual_seed(0)
    bn = SplitBatchNorm(4, num_splits=2).to(memory_format=torch.channels_last)
    x = torch.randn(8, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x.bfloat16())
    expected = torch.cat([F.batch_norm(group, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
                          for group in x.bfloat16().float().chunk(2)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_split_batchnorm_without_affine_parameters_in_double_precision() -> None:
    bn = SplitBatchNorm(3, num_splits=2, affine=False).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    expected = torch.cat([F.batch_norm(group, None, None, training=True) for group in x.chunk(2)])
    torch.testing.assert_close(bn(x), expected)


def test_split_batchnorm_refuses_groups_too_small_for_batch_statistics() -> None:
    bn = SplitBatchNorm(3, num_splits=4)
    with pytest.raises(ValueError, match="use a larger batch size or a smaller bn_splits"):
        bn(torch.randn(4, 3, 1, 1))
    with pytest.raises(ValueError, match="divisible by bn_splits=4"):
        bn(torch.randn(6, 3, 2, 2))


def test_converted_backbone_keeps_its_weights_and_loads_into_plain_torchvision(registry: Registry) -> None:
    encoder = registry.get("encoder", "resnet18").build({"cifar_stem": True})
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    converted = convert_split_batchnorm(encoder, num_splits=4)
    norms = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in norms)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    plain_torchvision_resnet("resnet18", cifar_stem=True).load_state_dict(after, strict=True)
