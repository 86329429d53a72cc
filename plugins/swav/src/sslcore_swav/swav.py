"""SwAV: Swapping Assignments between multiple Views (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin;
NeurIPS 2020), following the official code, facebookresearch/swav @ 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9
(``main_swav.py``: the training step, ``distributed_sinkhorn``, the queue; ``src/resnet50.py``: the head
and the prototypes, the multi-crop forward by resolution).

Each image n of the batch gives V crops t (multi-crop: 2 global crops, V - 2 small ones). Every crop goes
through the encoder f (the backbone) and the projection head g and is L2-normalised,

    z_nt = g(f(x_nt)) / ||g(f(x_nt))||        (D)

and is scored against K prototypes c_1..c_K (the rows of C, K x D: trainable, put back on the unit sphere
before every forward), z_nt . c_k, a cosine.

Codes. For each crop s of ``crops_for_assign`` (the two global crops), the codes q_ns (K, summing to 1) of
the B images of the global batch are the soft assignment in which every prototype takes B/K of the mass,
found by a few Sinkhorn-Knopp iterations on exp(z . c / epsilon) (eq. 3, :func:`sslcore.toolkit.prototypes.
sinkhorn`; without gradient):

    Q = Diag(u) exp(C^T Z / epsilon) Diag(v)

Swapped prediction. Every other crop t of the image predicts q_s from its own scores (eq. 1-2),

    l(z_t, q_s) = - sum_k q_s,k log p_t,k,      p_t,k = exp(z_t . c_k / tau) / sum_k' exp(z_t . c_k' / tau)

averaged over the N images, over the V - 1 crops t != s and over the crops s.

Queue (small batches). From epoch ``epoch_queue_starts`` on, the embeddings z of the assigned crops of the
last batches are kept, L in all; once the queue is full, their scores (with the current prototypes) join
the batch's in Sinkhorn, whose equipartition is then over B + L samples, and the batch's codes are its last
rows. The prototypes get no gradient for the first ``freeze_prototypes_niters`` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from sslcore.api.errors import TrainingError
from sslcore.api.hookspecs import Loss, Method, Slots
from sslcore.api.recipe import TrainingStep
from sslcore.toolkit.distributed import concat_all_gather
from sslcore.toolkit.heads import MLPHead
from sslcore.toolkit.multicrop import encode_crops
from sslcore.toolkit.prototypes import PrototypeLayer, sinkhorn

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


class SwAVConfig(BaseModel):
    """The ``method: {name: swav, ...}`` block (official argument names in the descriptions)."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_dim: int = Field(2048, ge=0, description="hidden width of the projection head g, "
                                                              "Linear-BN-ReLU-Linear (hidden_mlp 2048; 0: one "
                                                              "Linear)")
    dim: int = Field(128, ge=1, description="D: dimension of the embeddings z and the prototypes (feat_dim)")
    num_prototypes: int = Field(3000, ge=1, description="K, the number of prototypes (nmb_prototypes)")
    queue_length: int = Field(0, ge=0, description="L: embeddings kept per assigned crop, over all workers, a "
                                                   "multiple of the global batch (official: 0 at batch 4096, "
                                                   "3840 at 256); 0: no queue")
    epoch_queue_starts: int = Field(15, ge=0, description="the epoch (0-based) from which the queue is filled; "
                                                          "it joins Sinkhorn once full")
    freeze_prototypes_niters: int = Field(313, ge=0, description="optimizer steps without updates of the "
                                                                 "prototypes, from the start (313 at batch 4096, "
                                                                 "5005 at 256)")


class SwAVLossConfig(BaseModel):
    """Parameters of the swapped prediction and of its Sinkhorn codes."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.1, gt=0, description="tau of the softmax over the prototypes")
    epsilon: float = Field(0.05, gt=0, description="entropy regularisation of Sinkhorn-Knopp: the codes' softness")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations")
    crops_for_assign: list[int] = Field([0, 1], min_length=1,
                                        description="the crops (index in the views) whose codes the others "
                                                    "predict: the two global crops")

    @field_validator("crops_for_assign")
    @classmethod
    def _distinct(cls, crops: list[int]) -> list[int]:
        if len(set(crops)) != len(crops) or min(crops) < 0:
            raise ValueError(f"crops_for_assign must be distinct view indices >= 0, got {crops}")
        return crops


@runtime_checkable
class SwappedPredictionLoss(Loss, Protocol):
    """A swapped prediction over prototypes (SwAV): loss(scores, codes), codes(scores).

    Each crop predicts the codes of the assigned crops of the same image, which ``codes`` computes from the
    assigned crops' scores."""

    crops_for_assign: Sequence[int]  #: the crops, by index in the views, whose codes the other crops predict

    def codes(self, scores: torch.Tensor) -> torch.Tensor:
        """Q: M x K, each row summing to 1, of this worker's ``scores`` (M x K, detached), under the
        equipartition of all workers' rows together; float32."""

    def forward(self, scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """``scores``: one N x K per crop, z_t . c with gradient, in view order; ``codes``: one N x K per crop
        of ``crops_for_assign``, in that order."""


class SwAVLoss(nn.Module, SwappedPredictionLoss):
    """SwAV's loss: codes by Sinkhorn-Knopp (epsilon, iterations) and the swapped prediction

        L = 1/|S| sum_{s in S} 1/(V - 1) sum_{t != s} 1/N sum_n - sum_k q_ns,k log softmax(z_nt . C^T / tau)_k

    (S: ``crops_for_assign``), as ``main_swav.py``'s training step. In float32 even under autocast.
    """

    def __init__(self, config: SwAVLossConfig) -> None:
        super().__init__()
        self.temperature = config.temperature
        self.epsilon = config.epsilon
        self.sinkhorn_iterations = config.sinkhorn_iterations
        self.crops_for_assign = list(config.crops_for_assign)

    def codes(self, scores: torch.Tensor) -> torch.Tensor:
        return sinkhorn(scores, self.epsilon, self.sinkhorn_iterations)

    def forward(self, scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor]) -> torch.Tensor:
        views = len(scores)
        if len(codes) != len(self.crops_for_assign) or views < 2:
            raise ValueError(f"swav loss: {len(codes)} codes for crops_for_assign {self.crops_for_assign}, "
                             f"and {views} crops (at least 2)")
        with torch.autocast(scores[0].device.type, enabled=False):
            log_p = [F.log_softmax(s.float() / self.temperature, dim=1) for s in scores]  # V x (N x K)
            loss = scores[0].new_zeros((), dtype=torch.float32)
            for s, q in zip(self.crops_for_assign, codes):
                swapped = sum(-(q.float() * log_p[t]).sum(dim=1).mean() for t in range(views) if t != s)
                loss = loss + swapped / (views - 1)
            return loss / len(codes)


class SwAV(nn.Module, Method):
    """SwAV: encoder f, projection head g, prototypes C, the swapped prediction; see the module docstring.

    The crops go through f one resolution at a time and through g all together (``src/resnet50.py``), so
    g's BatchNorm sees every crop of the batch. z and the scores are computed in float32 (the official code
    in fp16): Sinkhorn divides the scores by epsilon = 0.05 and the loss by tau = 0.1.

    The queue is a buffer of C x W x L/W x D (C assigned crops, W workers) that is the same on every worker:
    block r is worker r's queue of the official code (which keeps one per process, saved to one file per
    rank), filled with worker r's embeddings, which each step gathers from every worker; worker r puts only
    block r in its Sinkhorn, whose sums over the workers then cover all L. Rank 0's checkpoint holds every
    block, so a resume restores each worker's queue; it needs the same number of workers.
    """

    queue: torch.Tensor | None

    loss: SwappedPredictionLoss  # the loss slot needs it (plugin.SLOTS), so validate refuses another loss

    def __init__(self, config: SwAVConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        self.backbone = slots.build("encoder")  # f
        hidden = [config.projector_hidden_dim] if config.projector_hidden_dim else []
        self.projector = MLPHead([self.backbone.feature_dim, *hidden, config.dim])  # g
        self.prototypes = PrototypeLayer(config.dim, config.num_prototypes)  # C: one head of K
        self.loss = slots.build("loss")
        self.epoch_queue_starts = config.epoch_queue_starts
        self.freeze_prototypes_niters = config.freeze_prototypes_niters
        self.world_size, self.rank = context.world_size, context.rank
        length, batch = config.queue_length, context.global_batch_size
        if length % batch:
            lower, upper = length - length % batch, length - length % batch + batch
            raise ValueError(f"queue_length {length} is not a multiple of the global batch {batch}: use "
                             f"{lower or upper}{f' or {upper}' if lower else ''}")
        shape = (len(self.loss.crops_for_assign), self.world_size, length // self.world_size, config.dim)
        self.register_buffer("queue", torch.zeros(shape) if length else None)  # C x W x L/W x D
        self._queue_started = False  # epoch >= epoch_queue_starts: set by on_step_start, every step
        self.register_load_state_dict_pre_hook(_check_queue_shape)

    def on_step_start(self, step: TrainingStep) -> None:
        self._queue_started = self.queue is not None and step.epoch >= self.epoch_queue_starts

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]  # V views, N x 3 x S_v x S_v each
        if max(self.loss.crops_for_assign) >= len(views):
            raise ValueError(f"swav: crops_for_assign {self.loss.crops_for_assign} names a crop beyond the "
                             f"augmentation's {len(views)} views")
        self.prototypes.normalize_()
        projected = self.projector(encode_crops(self.backbone, views))  # (V N) x D
        with torch.autocast(projected.device.type, enabled=False):
            z = F.normalize(projected.float(), dim=1)  # (V N) x D, on the unit sphere
            scores = self.prototypes(z)[0]  # (V N) x K: z . c
        crop_scores = scores.split(n)  # V x (N x K), in view order
        codes, used = self.assign(crop_scores, z.detach().split(n))
        out = {"loss": self.loss(crop_scores, codes), **self.loss.metrics()}
        if self.queue is not None:
            out["queue_used"] = torch.tensor(float(used), device=scores.device)
        return out

    @torch.no_grad()
    def assign(self, crop_scores: Sequence[torch.Tensor], crop_z: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], bool]:
        """The codes q_s (N x K) of each crop s of ``crops_for_assign``, with this worker's queue block in
        Sinkhorn once it is full (its last row is no longer zero: the official test), and whether it was;
        then this step's embeddings enter the queue (from epoch_queue_starts on)."""
        crops = self.loss.crops_for_assign
        n = crop_scores[0].shape[0]
        used = self._queue_started and bool(self.queue[:, self.rank, -1].any())
        codes = []
        for i, s in enumerate(crops):
            scores = crop_scores[s].detach()  # N x K
            if used:
                queued = self.queue[i, self.rank] @ self.prototypes.heads[0].weight.float().T  # L/W x K
                scores = torch.cat([queued, scores])  # (L/W + N) x K
            codes.append(self.loss.codes(scores)[-n:])  # N x K: the batch's rows
        if self._queue_started:
            self.enqueue(torch.stack([crop_z[s] for s in crops], dim=1))  # N x C x D
        return codes, used

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """First in, first out, per block: every worker's N x C x D embeddings enter its own block, newest
        first, and its oldest N leave."""
        n, crops, dim = z.shape
        gathered = concat_all_gather(z.contiguous())  # (W N) x C x D, in rank order
        newest = gathered.view(self.world_size, n, crops, dim).permute(2, 0, 1, 3)  # C x W x N x D
        self.queue[:, :, n:] = self.queue[:, :, :-n].clone()
        self.queue[:, :, :n] = newest

    def before_optimizer_step(self, step: TrainingStep) -> None:
        if step.index < self.freeze_prototypes_niters:  # main_swav.py: "cancel gradients for the prototypes"
            for p in self.prototypes.parameters():
                p.grad = None


def _check_queue_shape(module: SwAV, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """A checkpoint's queue has one block per worker of its run: refuse one of another shape in one line."""
    saved = state_dict.get(prefix + "queue")
    if saved is None or module.queue is None or saved.shape == module.queue.shape:
        return
    if saved.shape[1] != module.queue.shape[1]:
        raise TrainingError(f"swav: the checkpoint holds the queues of {saved.shape[1]} workers and this run has "
                            f"{module.queue.shape[1]}: resume with scaling.num_workers: {saved.shape[1]}, or "
                            "start a new run")
    raise TrainingError(f"swav: the checkpoint's queue is {tuple(saved.shape)} (crops x workers x length x dim) and "
                        f"this run's is {tuple(module.queue.shape)}: resume with the run's method.queue_length, "
                        "method.dim and loss.crops_for_assign")
