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

from sslcore.api.hookspecs import Method, Slots
from sslcore.api.recipe import TrainingStep
from sslcore.toolkit.batchnorm import convert_split_batchnorm, memory_format_of
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
    head_hidden_dim: int | None = Field(
        None, ge=1, description="hidden width of the MLP head (unused when mlp=false); default: the encoder's "
                                "feature width, as the official code (2048 for ResNet-50, 512 for ResNet-18)")
    dim: int = Field(128, ge=1, description="D: dimension of the embeddings q and k (and of the negatives)")
    mlp: bool = Field(True, description="v2 head Linear-ReLU-Linear; false: the v1 linear head")
    shuffle_bn: ShuffleBN = Field(
        "auto", description="shuffling BN: 'gather' across workers, 'split' BN groups on one worker, 'off'; "
                            "'auto' is 'gather' with several workers, else 'split'")
    bn_splits: int = Field(8, ge=1, description="BN groups per worker batch in 'split' mode (emulated workers), "
                                                "each of at least 2 images")


class MoCoProjectionHead(nn.Sequential):
    """g: backbone features (N x feature_dim) -> embeddings (N x dim); Linear-ReLU-Linear (v2) or Linear (v1)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, mlp: bool = True) -> None:
        if mlp:
            super().__init__(nn.Linear(input_dim, hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(hidden_dim, output_dim))
        else:
            super().__init__(nn.Linear(input_dim, output_dim))


class MoCo(nn.Module, Method):
    """MoCo v2: f_q = head(backbone), f_k its momentum copy; see the module docstring for the symbols.

    The momentum update runs after each optimizer step (``after_optimizer_step``), so f_k encodes step t's
    keys with theta_k updated by step t - 1's theta_q: the official ``builder.py`` updates at the start of
    the forward, which is the same sequence of keys.
    """

    uses_index = True  # a negative source with an entry per image (memory_bank) gets the batch's dataset ids

    def __init__(self, config: MoCoConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        self.m = config.momentum
        self.shuffle_bn = _resolve_shuffle_bn(config, context)
        encoder = slots.build("encoder")
        if self.shuffle_bn == "split" and config.bn_splits > 1:
            encoder = convert_split_batchnorm(encoder, config.bn_splits)
        self.backbone = encoder
        self.head = MoCoProjectionHead(encoder.feature_dim, config.head_hidden_dim or encoder.feature_dim,
                                       config.dim, config.mlp)
        # f_k starts as an exact copy of f_q and is only ever changed by the momentum update
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.negative_source = slots.build("negatives", dim=config.dim)
        self.loss = slots.build("loss")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``index``: the N images' dataset indices, for a negative source with an entry per image."""
        q, k = self.queries_and_keys(views)
        negatives, exclude = self.negative_source.negatives(q, k, index)  # negatives: K x D, exclude: N x K or None
        positive = self.negative_source.positive(k, index)  # N x D: k, or a memory bank's entries v_i
        loss = self.loss(q, positive, negatives, exclude)
        self.negative_source.update(k, index)
        return {"loss": loss, **self.loss.metrics()}

    def after_optimizer_step(self, step: TrainingStep) -> None:
        self.momentum_update_key_encoder()

    def queries_and_keys(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q = f_q(x^q) and k = f_k(x^k), both N x D and L2-normalised."""
        im_q, im_k = views[0], views[1]  # x^q, x^k: N x 3 x H x W, two views of the same N images
        q = F.normalize(self.head(self.backbone(im_q)).float(), dim=1)  # q: N x D
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
        mine = im_all[perm.view(workers, n)[r]].contiguous(memory_format=memory_format_of(im_k))
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
    per_worker, splits = context.global_batch_size // workers, config.bn_splits
    if mode == "split" and per_worker % splits:
        raise ValueError(f"shuffle_bn 'split' needs the per-worker batch size ({per_worker}) divisible by "
                         f"bn_splits ({splits}); change train.batch_size or method.bn_splits")
    if mode == "split" and splits > 1 and per_worker < 2 * splits:
        raise ValueError(f"shuffle_bn 'split' with bn_splits {splits} normalises groups of "
                         f"{per_worker // splits} image(s) of the per-worker batch of {per_worker}: BN statistics "
                         f"need at least 2 per group; raise train.batch_size to {2 * splits * workers} or lower "
                         f"method.bn_splits to {max(1, per_worker // 2)}")
    return mode
