"""DeepCluster v2 (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin; NeurIPS 2020, appendix of the SwAV paper):
k-means of a memory of every image's embeddings before each epoch, then training the network to predict
each image's cluster from every one of its crops.

Follows the official code, facebookresearch/swav ``main_deepclusterv2.py`` (and ``src/resnet50.py`` for the
head) @ 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9.

Symbols, as in the code:

- z = g(f(x)) / ||g(f(x))||: the L2-normalised embedding (D = ``dim``) of a crop x; f the encoder, g the
  projection head (Linear-BN-ReLU-Linear);
- M_j: the memory of crop ``crops_for_assign[j]``: z of that crop of every training image (N x D), written
  by every training step with the batch's embeddings (before the step, no gradient);
- c^h: the K_h prototypes of head h (unit vectors), y^h_i: image i's cluster at head h;
- tau: the temperature.

E-step, before every epoch: head h clusters the memory M_{h mod |crops_for_assign|} by spherical k-means
(``cluster_memory``): the centroids start at K_h memory entries drawn at random; then ``kmeans_iterations``
times, y_i = argmax_k z_i . c_k and c_k = normalise(mean of its z_i) (an empty cluster keeps its centroid);
then a last assignment. The prototypes of head h are set to its centroids.

M-step, every training step, for crop v of image i with scores s^h = z_{i,v} . c^h::

    L = 1/H sum_h mean_{i, v} -log softmax(s^h / tau)_{y^h_i}

The prototypes get no gradient during the first ``freeze_prototypes_steps`` steps (the official scripts:
300,000, longer than any of their runs, so they are the centroids throughout).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.errors import TrainingError
from sslcore.api.hookspecs import Loss, Method, Slots
from sslcore.api.recipe import TrainingStep
from sslcore.toolkit.distributed import broadcast, concat_all_gather, rank
from sslcore.toolkit.heads import MLPHead
from sslcore.toolkit.multicrop import encode_crops
from sslcore.toolkit.prototypes import PrototypeLayer

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext

#: the label of an image not yet clustered; the loss leaves it out (the official code's ignore_index -100)
UNASSIGNED = -1


class DeepClusterV2Config(BaseModel):
    """The ``method: {name: deepclusterv2, ...}`` block (defaults: the official ImageNet scripts)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(128, ge=1, description="D, the embedding and prototype width (official feat_dim)")
    hidden_dim: int = Field(2048, ge=0, description="hidden width of the projection head (official hidden_mlp); "
                                                    "0: a single Linear")
    num_prototypes: list[int] = Field([3000, 3000, 3000], min_length=1,
                                      description="K_h of each head (official nmb_prototypes)")
    crops_for_assign: list[int] = Field([0, 1], min_length=1,
                                        description="the views whose embeddings the memories keep, one memory each; "
                                                    "head h clusters memory h mod len(crops_for_assign)")
    kmeans_iterations: int = Field(10, ge=1, description="k-means iterations of each E-step (official "
                                                         "nmb_kmeans_iters)")
    freeze_prototypes_steps: int = Field(300000, ge=0, description="no gradient reaches the prototypes during "
                                                                   "these first optimizer steps (official "
                                                                   "freeze_prototypes_niters)")


# -- the M-step loss -------------------------------------------------------------------------------------


@runtime_checkable
class ClusterPredictionLoss(Loss, Protocol):
    """The call of DeepCluster v2's loss: loss(scores, targets), the crops' scores against their images' clusters.

    Every crop's scores at every head against its image's cluster at that head."""

    temperature: float  #: tau

    def forward(self, scores: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``scores``: per head h, M x K_h (the z . c of M crops); ``targets``: H x M long, the cluster of each
        crop's image at each head, ``UNASSIGNED`` (-1) where it has none (left out)."""


class DeepClusterV2LossConfig(BaseModel):
    """Parameters of the ``deepcluster_v2`` loss."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.1, gt=0, description="tau (official: 0.1)")


class DeepClusterV2Loss(nn.Module, ClusterPredictionLoss):
    """The cross-entropy of scores / tau against the assigned cluster, averaged over the assigned crops of
    each head and then over the heads (``nn.CrossEntropyLoss(ignore_index=...)`` per head in the official
    code); 0 for a head none of whose crops is assigned. Computed in float32."""

    def __init__(self, config: DeepClusterV2LossConfig) -> None:
        super().__init__()
        self.temperature = config.temperature

    def forward(self, scores: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        total = scores[0].new_zeros((), dtype=torch.float32)
        with torch.autocast(scores[0].device.type, enabled=False):
            for head_scores, head_targets in zip(scores, targets):
                summed = F.cross_entropy(head_scores.float() / self.temperature, head_targets,
                                         ignore_index=UNASSIGNED, reduction="sum")
                total = total + summed / (head_targets != UNASSIGNED).sum().clamp(min=1)
        return total / len(scores)


# -- the E-step ------------------------------------------------------------------------------------------


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """N: argmax_k x_i . c_k, in chunks of rows so that the N x K products never exist whole (ImageNet:
    1.28M x 3000)."""
    rows = max(1, 2 ** 26 // centroids.shape[0])
    return torch.cat([(chunk @ centroids.T).argmax(dim=1) for chunk in x.split(rows)])


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iterations: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_memory`` of the official code on the unit vectors ``x`` (N x D): (centroids K x D, unit
    vectors; assignments N) after ``iterations`` rounds of assignment and normalised-mean update, starting
    from K rows of ``x`` drawn with ``generator`` (torch's default one when None)."""
    n = x.shape[0]
    if k > n:
        raise ValueError(f"deepclusterv2: {k} prototypes for {n} images; num_prototypes must not exceed the "
                         "number of training images")
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)]  # K x D
    for iteration in range(iterations + 1):
        assignments = nearest_centroid(x, centroids)  # N
        if iteration == iterations:
            break
        counts = torch.bincount(assignments, minlength=k)  # K
        # index_add_ is deterministic on the CPU; on a GPU its float atomics may vary in the last bits
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)  # K x D
        means = sums / counts.clamp(min=1)[:, None]
        centroids = F.normalize(torch.where((counts > 0)[:, None], means, centroids), dim=1)
    return centroids, assignments


class DeepClusterV2(nn.Module, Method):
    """DeepCluster v2; see the module docstring."""

    uses_index: ClassVar[bool] = True

    memory: torch.Tensor
    memory_filled: torch.Tensor
    assignments: torch.Tensor

    loss: ClusterPredictionLoss  # the loss slot needs it (plugin.SLOTS)

    def __init__(self, config: DeepClusterV2Config, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        self.backbone = slots.build("encoder")
        self.loss = slots.build("loss")
        widths = [self.backbone.feature_dim, config.hidden_dim, config.dim] if config.hidden_dim else \
            [self.backbone.feature_dim, config.dim]
        self.projector = MLPHead(widths)  # g: Linear-BN-ReLU-Linear, biases everywhere (src/resnet50.py)
        self.prototypes = PrototypeLayer(config.dim, config.num_prototypes)  # c^h: K_h x D per head
        self.num_prototypes = list(config.num_prototypes)
        self.crops_for_assign = list(config.crops_for_assign)
        self.kmeans_iterations = config.kmeans_iterations
        self.freeze_prototypes_steps = config.freeze_prototypes_steps
        # M_j of every training image, by dataset index, identical on every worker (each step gathers the
        # global batch); buffers, so the checkpoint holds them
        self.register_buffer("memory", torch.zeros(len(self.crops_for_assign), context.dataset_size, config.dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.bool))
        # y^h_i: assignments[h, i]
        self.register_buffer("assignments", torch.full((len(self.num_prototypes), context.dataset_size),
                                                       UNASSIGNED, dtype=torch.long))
        self._labels: torch.Tensor | None = None  # the training images' classes, for the NMI

    def embed(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """z of every crop, view after view: (V N) x D, float32 unit vectors."""
        return F.normalize(self.projector(encode_crops(self.backbone, views)).float(), dim=1)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``views``: V batches of N crops (2 global + the local ones); ``index``: the N images' dataset ids."""
        if index is None:
            raise ValueError("deepclusterv2: forward needs index, the images' dataset ids (sslcore's loop gives "
                             "them to a method that declares uses_index)")
        if max(self.crops_for_assign) >= len(views):
            raise ValueError(f"deepclusterv2: crops_for_assign {self.crops_for_assign} names a view the "
                             f"augmentation does not make (it makes {len(views)})")
        n = views[0].shape[0]
        z = self.embed(views)  # (V N) x D
        with torch.autocast(z.device.type, enabled=False):  # cosines over tau = 0.1: float32
            scores = self.prototypes(z)  # per head: (V N) x K_h
        targets = self.assignments[:, index].repeat(1, len(views))  # H x (V N): row v N + i is image i's
        out = {"loss": self.loss(scores, targets)}
        out.update(self.loss.metrics())
        self.update_memory(z.detach(), index, n)
        return out

    @torch.no_grad()
    def update_memory(self, z: torch.Tensor, index: torch.Tensor, n: int) -> None:
        """M_j[i] = z of crop ``crops_for_assign[j]`` of image i, for the global batch (all workers')."""
        crops = torch.stack([z[c * n:(c + 1) * n] for c in self.crops_for_assign], dim=1)  # N x J x D
        self.memory[:, concat_all_gather(index)] = concat_all_gather(crops).transpose(0, 1)

    def before_optimizer_step(self, step: TrainingStep) -> None:
        if step.index < self.freeze_prototypes_steps:
            for parameter in self.prototypes.parameters():
                parameter.grad = None  # the official "cancel some gradients": no step, no weight decay

    # -- E-step -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, context: MethodContext) -> dict[str, Any]:
        """Fill the memories if they are empty (the first epoch), then cluster them on rank 0 and broadcast
        the assignments and prototypes, so every worker holds the same. The initial centroids are drawn from
        torch's default generator, which the engine seeds from the run's seed and the epoch beforehand."""
        start = time.perf_counter()
        images = self.assignments.shape[1]
        if max(self.num_prototypes) > images:
            raise TrainingError(f"deepclusterv2: {max(self.num_prototypes)} prototypes for {images} training "
                                f"images; set method.num_prototypes to at most {images} per head")
        if not self.memory_filled:
            self.fill_memory(context)
        sizes = []
        for h, k in enumerate(self.num_prototypes):
            weight = self.prototypes.heads[h].weight.detach()  # K_h x D
            if rank() == 0:
                centroids, assignments = spherical_kmeans(self.memory[h % len(self.crops_for_assign)], k,
                                                          self.kmeans_iterations)
                weight.copy_(centroids)
                self.assignments[h].copy_(assignments)
                sizes.append(torch.bincount(assignments, minlength=k).cpu())
            broadcast(weight, src=0)
        broadcast(self.assignments, src=0)
        if rank() != 0:
            return {}
        return {"e_step_seconds": time.perf_counter() - start, **self.cluster_metrics(sizes, context)}

    def cluster_metrics(self, sizes: list[torch.Tensor], context: MethodContext) -> dict[str, Any]:
        """Per head h: the cluster sizes (a distribution), the empty clusters and, when the training images
        have labels, the NMI between clusters and classes (DeepCluster's measure of what the clusters hold)."""
        from sklearn.metrics import normalized_mutual_info_score

        if self._labels is None and context.eval_context is not None:
            self._labels = context.eval_context.targets()  # read once: an ImageNet folder takes a while to list
        labels = self._labels
        labelled = labels is not None and len(labels) == self.assignments.shape[1] and bool((labels >= 0).all())
        metrics: dict[str, Any] = {}
        for h, head_sizes in enumerate(sizes):
            metrics[f"cluster_sizes_{h}"] = head_sizes.float()
            metrics[f"empty_clusters_{h}"] = float((head_sizes == 0).sum())
            if labelled:
                metrics[f"nmi_{h}"] = float(normalized_mutual_info_score(labels.numpy(),
                                                                         self.assignments[h].cpu().numpy()))
        return metrics

    @torch.no_grad()
    def fill_memory(self, context: MethodContext) -> None:
        """Every memory M_j = z of every training image under the eval transform, the network in training
        mode (BatchNorm on batch statistics, as the official init_memory runs it), through the eval
        context's ``embed_training_data`` (each worker a slice, all-gathered), PCL's E-step's too."""
        if context.eval_context is None:
            raise ValueError("deepclusterv2: filling the memory needs the run's eval context (sslcore's loop "
                             "provides it)")
        modes = [module.training for module in self.modules()]
        self.train()
        z, _ = context.eval_context.embed_training_data(lambda images: self.embed([images]), equal_batches=True)
        for module, mode in zip(self.modules(), modes):
            module.training = mode
        self.memory.copy_(z.to(self.memory.device).expand_as(self.memory))
        self.memory_filled.fill_(True)
