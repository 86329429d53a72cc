"""Split batch norm: BatchNorm2d that normalises groups of the batch apart, as that many workers would, which
MoCo's shuffling BN needs on one worker (the official CIFAR-10 demo's SplitBatchNorm); and its undoing for
fine-tuning, :func:`plain_batchnorm`.
"""

from __future__ import annotations

import torch
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that normalizes ``num_splits`` groups of the batch separately, as that many workers would.

    Group g holds the g-th contiguous slice of the batch (samples g N/s ... (g + 1) N/s - 1). Each slice is
    normalized by torch's own batch-norm kernels, writing into one output, so a channels_last batch is
    never copied to another layout (the official demo's N/s x sC x H x W view needs the contiguous one,
    and converting back and forth cost 22% of a MoCo step here: bench/results.md). The running
    statistics are the mean of the groups'. In eval mode this is a plain BatchNorm2d; parameters,
    buffers and state_dict keys are BatchNorm2d's, so trained weights load into plain models.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(input)
        n, c, h, w = input.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: a batch of {n} does not split into {s} groups; "
                             f"use a per-worker batch size divisible by bn_splits={s}")
        if n // s * h * w == 1:
            raise ValueError(f"SplitBatchNorm: {s} groups of one {h}x{w} sample leave one value per channel for "
                             f"the batch statistics; use a larger batch size or a smaller bn_splits")
        parameter_dtype = torch.promote_types(input.dtype, torch.float32)  # bf16/fp16 inputs keep fp32 statistics
        weight = self.weight if self.affine else input.new_ones(c, dtype=parameter_dtype)
        bias = self.bias if self.affine else input.new_zeros(c, dtype=parameter_dtype)
        out, mean, invstd = _GroupBatchNorm.apply(input, weight, bias, s, self.eps)
        if self.running_mean is not None:
            with torch.no_grad():
                factor = self._exponential_average_factor()
                count = n // s * h * w
                var = (invstd.pow(-2) - self.eps) * (count / (count - 1))  # unbiased, as BatchNorm2d keeps
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_(var.mean(0).to(self.running_var.dtype), factor)
        return out

    def _exponential_average_factor(self) -> float:
        # as nn.BatchNorm2d: momentum None means a cumulative average over the batches seen
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return self.momentum or 0.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class _GroupBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of each of ``s`` contiguous slices of the batch, in the input's layout.

    Returns the output and each group's mean and 1/sqrt(var + eps) (s x C), the statistics torch's kernels
    save for their backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = torch.empty_like(x)
        mean = x.new_empty((s, x.shape[1]), dtype=weight.dtype)  # s x C
        invstd = torch.empty_like(mean)
        for g, (x_g, out_g) in enumerate(zip(x.chunk(s), out.chunk(s))):
            torch.ops.aten.native_batch_norm.out(x_g, weight, bias, None, None, True, 0.0, eps,
                                                 out=out_g, save_mean=mean[g], save_invstd=invstd[g])
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _mean: torch.Tensor, _invstd: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))  # the kernels want one layout
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias = torch.empty_like(mean), torch.empty_like(mean)  # per group, summed below
        for g, (x_g, grad_out_g, grad_x_g) in enumerate(zip(x.chunk(len(mean)), grad_out.chunk(len(mean)),
                                                            grad_x.chunk(len(mean)))):
            torch.ops.aten.native_batch_norm_backward.out(
                grad_out_g, x_g, weight, None, None, mean[g], invstd[g], True, ctx.eps, [True, True, True],
                out0=grad_x_g, out1=grad_weight[g], out2=grad_bias[g])
        return grad_x, grad_weight.sum(0), grad_bias.sum(0), None, None


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """``module`` with every nn.BatchNorm2d replaced by a SplitBatchNorm holding its parameters and buffers."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats,
                               device="meta")
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(split, name, tensor)
        split.train(module.training)
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits))
    return module


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every subclass of BatchNorm2d (MoCo's SplitBatchNorm) swapped for a plain BatchNorm2d
    holding the same parameters and statistics: fine-tuning normalises whole batches of any size."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
            plain = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain.to(next(iter(child.state_dict().values())).device))
        else:
            plain_batchnorm(child)
    return module


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so, else contiguous: the layout to give a tensor made like ``x``."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
