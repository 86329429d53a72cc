"""MoCo: Momentum Contrast (He et al., CVPR 2020), with the v2 improvements (Chen et al., 2020).

A query encoder f_q (backbone + projection head, parameters theta_q) maps one augmented view x^q of each
image to an embedding q; a key encoder f_k with the same architecture maps another view x^k of the same
image to its positive key k. Both are L2-normalized. f_k gets no gradient. Its parameters follow f_q's by
the momentum update

    theta_k <- m theta_k + (1 - m) theta_q

so the keys in the queue of K negatives (the ``negatives`` slot) stay consistent from step to step. The
loss (the ``loss`` slot: InfoNCE with temperature tau) contrasts q with its k and the negatives. v2 swaps
the linear head for an MLP (``mlp``) and uses stronger augmentation and tau = 0.2.

The paper's other two mechanisms (its Fig. 2 and 3) are the same module with another ``negatives`` block:
end-to-end is ``negatives: {name: in_batch}`` with ``momentum: 0`` (f_k is f_q at every step, as the update
runs before the keys are encoded), the memory bank of Wu et al. (2018) is ``negatives: {name: memory_bank}``
(with ``momentum: 0``, one encoder as there) and gets each image's dataset index through ``forward``.

Shuffling BN. BatchNorm statistics carry information between the samples of a batch. If a query and its
key are normalized with statistics of the same images, the model can find the positive through that leak
instead of learning good features (the "cheating" of the paper). So the key batch is shuffled before f_k,
which normalizes each key with statistics of other images than its query's, and restored after:

- ``gather`` (several workers, the official code): the key images of all workers are gathered, permuted
  with one permutation drawn by rank 0, and each worker encodes a slice of them;
- ``split`` (one worker, the official CIFAR-10 demo): every BN layer normalizes ``bn_splits`` groups of the
  batch on its own, as ``bn_splits`` workers would, and the key batch is permuted locally.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.components.negatives import positive_key
from sslcore.toolkit.distributed import broadcast, concat_all_gather, rank, world_size
from sslcore.toolkit.ema import momentum_update

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext

ShuffleBN = Literal["auto", "gather", "split", "off"]


class MoCoConfig(BaseModel):
    """The ``method: {name: moco, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    momentum: float = Field(
        0.999, ge=0.0, lt=1.0,
        description="m in theta_k <- m theta_k + (1 - m) theta_q (key encoder update). The update runs before "
                    "f_k encodes the keys (official moco/builder.py), so m = 0 encodes them with this step's "
                    "query encoder: the paper's end-to-end mechanism (with negatives: in_batch), without gradient "
                    "through the keys, and the single encoder of its memory-bank mechanism")
    head_hidden_dim: int = Field(2048, ge=1, description="hidden width of the MLP head (unused when mlp=false)")
    dim: int = Field(128, ge=1, description="D: dimension of the embeddings q and k (and of the negatives)")
    mlp: bool = Field(True, description="v2 head Linear-ReLU-Linear; false: the v1 linear head")
    shuffle_bn: ShuffleBN = Field(
        "auto", description="shuffling BN: 'gather' across workers, 'split' BN groups on one worker, 'off'; "
                            "'auto' is 'gather' with several workers, else 'split'")
    bn_splits: int = Field(8, ge=1, description="BN groups per worker batch in 'split' mode (emulated workers)")


class MoCoProjectionHead(nn.Sequential):
    """g: backbone features (N x feature_dim) -> embeddings (N x dim); Linear-ReLU-Linear (v2) or Linear (v1)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, mlp: bool = True) -> None:
        if mlp:
            super().__init__(nn.Linear(input_dim, hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(hidden_dim, output_dim))
        else:
            super().__init__(nn.Linear(input_dim, output_dim))


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
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))  # the kernels want one layout
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


class MoCo(nn.Module):
    """MoCo v2: f_q = head(backbone), f_k its momentum copy; see the module docstring for the symbols."""

    def __init__(self, config: MoCoConfig, *, context: MethodContext, encoder: nn.Module,
                 negatives: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.m = config.momentum
        self.shuffle_bn = _resolve_shuffle_bn(config, context)
        if self.shuffle_bn == "split" and config.bn_splits > 1:
            encoder = convert_split_batchnorm(encoder, config.bn_splits)
        self.backbone = encoder
        self.head = MoCoProjectionHead(encoder.feature_dim, config.head_hidden_dim, config.dim, config.mlp)
        # f_k starts as an exact copy of f_q and is only ever changed by the momentum update
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.negative_source = negatives
        self.loss = loss

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``index``: the N images' dataset indices (given by sslcore's loop), for a negative source with an entry
        per image (``memory_bank``)."""
        q, k = self.queries_and_keys(views)
        negatives, exclude = self.negative_source.negatives(q, k, index)  # negatives: K x D, exclude: N x K or None
        positive = positive_key(self.negative_source, k, index)  # N x D: k, or a memory bank's entries v_i
        loss = self.loss(q, positive, negatives, exclude)
        self.negative_source.update(k, index)
        return {"loss": loss}

    def queries_and_keys(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q = f_q(x^q) and k = f_k(x^k), both N x D and L2-normalised, after the momentum update of f_k."""
        im_q, im_k = views[0], views[1]  # x^q, x^k: N x 3 x H x W, two views of the same N images
        q = F.normalize(self.head(self.backbone(im_q)).float(), dim=1)  # q: N x D
        with torch.no_grad():
            self.momentum_update_key_encoder()
            k = self.keys(im_k)  # k: N x D, row i the positive of q row i
        return q, k

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        momentum_update([*self.key_backbone.parameters(), *self.key_head.parameters()],
                        [*self.backbone.parameters(), *self.head.parameters()], self.m)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """k = f_k(x^k) / ||f_k(x^k)||: N x D, in the order of ``im_k``, with this run's BN shuffling."""
        if self.shuffle_bn == "gather":
            return self._keys_shuffled_across_workers(im_k)
        if self.shuffle_bn == "split":
            perm = torch.randperm(im_k.shape[0], device=im_k.device)
            k = self.encode_keys(im_k[perm])  # k row j is the key of image perm[j]
            return k[torch.argsort(perm)]
        return self.encode_keys(im_k)

    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """f_k(x^k) / ||f_k(x^k)||: N x D, the batch encoded as it is (no shuffling)."""
        return F.normalize(self.key_head(self.key_backbone(im_k)).float(), dim=1)

    def _keys_shuffled_across_workers(self, im_k: torch.Tensor) -> torch.Tensor:
        n, workers, r = im_k.shape[0], world_size(), rank()
        im_all = concat_all_gather(im_k)  # (workers N) x 3 x H x W, in rank order
        perm = (torch.randperm(im_all.shape[0], device=im_k.device) if r == 0
                else torch.empty(im_all.shape[0], dtype=torch.long, device=im_k.device))
        broadcast(perm, src=0)  # one permutation for all workers
        mine = im_all[perm.view(workers, n)[r]].contiguous(memory_format=_memory_format(im_k))
        k_all = concat_all_gather(self.encode_keys(mine))  # k_all row j is the key of global image perm[j]
        unshuffle = torch.argsort(perm)  # k_all row unshuffle[g] is the key of global image g
        return k_all[unshuffle.view(workers, n)[r]]


def _resolve_shuffle_bn(config: MoCoConfig, context: MethodContext) -> str:
    workers = context.world_size
    mode = config.shuffle_bn
    if mode == "auto":
        mode = "gather" if workers > 1 else "split"
    if mode == "gather" and workers == 1:
        raise ValueError("shuffle_bn 'gather' shuffles keys across workers and this run has one; "
                         "use shuffle_bn: auto or split")
    per_worker = context.global_batch_size // workers
    if mode == "split" and per_worker % config.bn_splits:
        raise ValueError(f"shuffle_bn 'split' needs the per-worker batch size ({per_worker}) divisible by "
                         f"bn_splits ({config.bn_splits}); change batch_size or bn_splits")
    return mode


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
