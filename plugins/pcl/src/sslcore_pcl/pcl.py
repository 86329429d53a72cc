"""PCL: Prototypical Contrastive Learning of unsupervised representations (Li, Zhou, Xiong, Hoi; ICLR 2021).

An EM loop on top of MoCo (``sslcore_moco``), following the official code (salesforce/PCL, ``pcl/builder.py``
and ``main_pcl.py``).

E-step, at the start of every epoch from ``warmup_epochs`` on (InfoNCE alone before): the momentum encoder
embeds every training image under the eval transform, v'_i = f_k(x_i) (L2-normalised, N x D; each worker
embeds a slice and the slices are gathered). The ``clustering`` slot clusters {v'_i} M times, granularity m
into K_m prototypes c^m (L2-normalised), on rank 0, and rank 0 broadcasts the result, so every worker holds
the same assignments whatever its hardware (faiss on several ranks agrees only where their float results
agree bit for bit). Each prototype gets a concentration, as the official ``run_kmeans``::

    phi_c = mean_{z in c} ||v'_z - c||_2 / log(Z_c + 10)       (Z_c: the cluster's size)
    clusters with Z_c <= 1 get max(phi); phi is clipped to its 10th-90th percentiles; phi = T phi / mean(phi)

with T the loss's temperature. Assignments, prototypes and phi are buffers: checkpointed and restored.

M-step: the ``loss`` slot, a :class:`PrototypicalLoss` (``proto_nce``, :class:`ProtoNCELoss`), on the query q_i
of image i::

    L = InfoNCE(q, k, queue) + 1/M sum_m -log exp(q_i . c^m_s / phi^m_s) / sum_{j in {s} u R} exp(q_i . c^m_j / phi^m_j)

where s is image i's prototype at granularity m and R holds r prototypes drawn from the others.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sslcore_moco import MoCo, MoCoConfig

from sslcore.api.hookspecs import ClusterResult, ContrastiveLoss, Slots
from sslcore.components.losses import InfoNCEConfig, InfoNCELoss
from sslcore.toolkit.distributed import broadcast, rank

if TYPE_CHECKING:
    from PIL import Image

    from sslcore.engine.context import MethodContext


class PCLConfig(MoCoConfig):
    """The ``method: {name: pcl, ...}`` block: MoCo's parameters and the EM schedule."""

    warmup_epochs: int = Field(20, ge=0, description="epochs of InfoNCE alone before the first E-step "
                                                     "(official: 20 of 200)")
    grid_prototypes: int = Field(8, ge=0, description="prototypes shown in the PNG written after each E-step "
                                                      "(their 5 nearest images each); 0: no picture")


# -- the M-step loss ------------------------------------------------------------------------------------


class ProtoNCEConfig(InfoNCEConfig):
    """Parameters of ProtoNCE: InfoNCE's temperature and the number of negative prototypes."""

    num_negative_prototypes: int = Field(16384, ge=1, description="r, negative prototypes per query "
                                                                  "(official: 16384); all others when fewer")


@dataclass
class Prototypes:
    """One granularity for a batch: ``positive`` N (each query's prototype s), ``centroids`` K x D
    (L2-normalised c), ``phi`` K (concentrations)."""

    positive: torch.Tensor
    centroids: torch.Tensor
    phi: torch.Tensor


def sample_negative_prototypes(positive: torch.Tensor, num_prototypes: int, r: int,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """N x min(r, K - 1) prototype ids for each query: distinct, uniformly drawn, never its ``positive``.

    With r >= K - 1 every other prototype, in order. Drawn with torch (the official ``random.sample`` over a
    set fails on Python >= 3.11): the r largest of K uniform numbers per row, the positive's set to -1.
    """
    n, k = positive.shape[0], num_prototypes
    if r >= k - 1:
        others = torch.arange(k - 1, device=positive.device).expand(n, k - 1)
        return others + (others >= positive[:, None]).long()  # skip over the positive
    scores = torch.rand(n, k, generator=generator, device=positive.device)
    scores[torch.arange(n, device=positive.device), positive] = -1.0
    return scores.topk(r, dim=1).indices  # N x r


@runtime_checkable
class PrototypicalLoss(ContrastiveLoss, Protocol):
    """A contrastive loss with prototypes, PCL's M-step: loss(q, k, negatives, exclude, prototype_logits).

    Called as a contrastive loss (no ``prototype_logits``) it is the instance term alone, as in PCL's warm-up;
    after an E-step the method adds, for each granularity, the logits of :meth:`prototype_logits`.
    """

    temperature: float  #: tau of the instance term; the E-step scales the concentrations to mean(phi) = tau

    def prototype_logits(self, q: torch.Tensor, granularities: list[Prototypes],
                         generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """For each granularity, N x (1 + r) logits of each query against its prototype (column 0) and r
        negative prototypes."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None,
                prototype_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The contrastive call, plus the prototype term over ``prototype_logits`` when given."""


class ProtoNCELoss(InfoNCELoss, PrototypicalLoss):
    """ProtoNCE (PCL, eq. 11): InfoNCE over the instance negatives plus, per granularity, the cross-entropy of
    each query against its prototype and r negative prototypes, each logit divided by that prototype's phi.

    Called as InfoNCE is (``loss(q, k, negatives, exclude)``) it is InfoNCE, as in PCL's warm-up; after an
    E-step the method passes ``prototype_logits`` from :meth:`prototype_logits`. Computed in float32.
    """

    def __init__(self, config: ProtoNCEConfig) -> None:
        super().__init__(config)
        self.r = config.num_negative_prototypes

    def prototype_logits(self, q: torch.Tensor, granularities: list[Prototypes],
                         generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """For each granularity, N x (1 + r) logits [q.c_s / phi_s, q.c_j / phi_j for j in R]: the positive in
        column 0, then the r sampled negatives."""
        out = []
        with torch.autocast(q.device.type, enabled=False):
            q = q.float()
            for protos in granularities:
                negative = sample_negative_prototypes(protos.positive, protos.centroids.shape[0], self.r, generator)
                logits = (q @ protos.centroids.float().T) / protos.phi.float()  # N x K: q.c_j / phi_j
                chosen = torch.cat([protos.positive[:, None], negative], dim=1)  # N x (1 + r)
                out.append(logits.gather(1, chosen))
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None,
                prototype_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        loss = super().forward(q, k, negatives, exclude)
        if prototype_logits:
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive prototype
            proto = sum(F.cross_entropy(logits.float(), target) for logits in prototype_logits)
            loss = loss + proto / len(prototype_logits)
        return loss


# -- the E-step -------------------------------------------------------------------------------------------


def concentration(distances: torch.Tensor, assignments: torch.Tensor, num_clusters: int,
                  temperature: float) -> torch.Tensor:
    """phi: K, from each sample's squared L2 ``distances`` to its centroid (N) and its ``assignments`` (N);
    the official formula (see the module docstring)."""
    size = torch.bincount(assignments, minlength=num_clusters).double()  # Z: K
    mean_distance = torch.zeros(num_clusters, dtype=torch.float64).index_add_(
        0, assignments, distances.double().sqrt()) / size.clamp(min=1)
    phi = mean_distance / torch.log(size + 10)
    phi = torch.where(size > 1, phi, phi[size > 1].max() if (size > 1).any() else phi.new_tensor(1.0))
    phi = phi.clamp(torch.quantile(phi, 0.1), torch.quantile(phi, 0.9))  # clip extreme values, for stability
    return (temperature * phi / phi.mean()).float()


class PCL(MoCo):
    """MoCo with an E-step between epochs and ProtoNCE; see the module docstring."""

    assignments: torch.Tensor
    clustered: torch.Tensor

    loss: PrototypicalLoss  # the loss slot needs it (plugin.SLOTS), so validate refuses another loss

    def __init__(self, config: PCLConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__(config, context=context, slots=slots)
        self.clustering = slots.build("clustering")
        self.warmup_epochs = config.warmup_epochs
        self.grid_prototypes = config.grid_prototypes
        self.num_clusters = list(self.clustering.num_clusters)  # K_m of each granularity m
        self.temperature = self.loss.temperature
        # E-step state; buffers so that checkpoints carry it. assignments[m, i]: image i's prototype at m.
        self.register_buffer("assignments", torch.full((len(self.num_clusters), context.dataset_size), -1))
        for m, k in enumerate(self.num_clusters):
            self.register_buffer(f"prototypes_{m}", torch.zeros(k, config.dim))  # c^m: K_m x D
            self.register_buffer(f"phi_{m}", torch.ones(k))  # phi^m: K_m
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))
        self._use_prototypes = False
        # a checkpoint taken inside an epoch resumes without this epoch's E-step: the flag follows the state
        self.register_load_state_dict_post_hook(_after_load)

    def prototypes(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"prototypes_{m}"), getattr(self, f"phi_{m}")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``index``: the N images' dataset indices, to look up their prototypes and for a negative source with an
        entry per image (given by sslcore's loop)."""
        q, k = self.queries_and_keys(views)
        negatives, exclude = self.negative_source.negatives(q, k, index)
        positive = self.negative_source.positive(k, index)  # N x D: k, or a memory bank's entries v_i
        out: dict[str, torch.Tensor] = {}
        proto_logits = []
        if self._use_prototypes and index is not None:
            granularities = [Prototypes(self.assignments[m, index], *self.prototypes(m))
                             for m in range(len(self.num_clusters))]
            proto_logits = self.loss.prototype_logits(q, granularities)
            for kk, logits in zip(self.num_clusters, proto_logits):
                out[f"acc_proto_{kk}"] = (logits.argmax(dim=1) == 0).float().mean().detach()  # Acc@Proto
        out["loss"] = self.loss(q, positive, negatives, exclude, prototype_logits=proto_logits)
        out.update(self.loss.metrics())
        self.negative_source.update(k, index)
        return out

    # -- E-step -------------------------------------------------------------------------------------------

    def on_epoch_start(self, epoch: int, context: MethodContext) -> dict[str, Any]:
        self._use_prototypes = bool(self.clustered)
        if epoch < self.warmup_epochs:
            return {}
        start = time.perf_counter()
        features, labels = self.training_features(context)  # N x D, N: every worker has all of them
        results: list[ClusterResult] = []
        if rank() == 0:
            results = self.clustering.fit(features)
            for m, result in enumerate(results):
                self.assignments[m].copy_(result.assignments)
                centroids, phi = self.prototypes(m)
                centroids.copy_(result.centroids)
                phi.copy_(concentration(result.distances, result.assignments, result.num_clusters,
                                        self.temperature))
        for buffer in [self.assignments, *(t for m in range(len(self.num_clusters)) for t in self.prototypes(m))]:
            broadcast(buffer, src=0)
        self.clustered.fill_(True)
        self._use_prototypes = True
        if rank() != 0:
            return {}
        metrics: dict[str, Any] = {"e_step_seconds": time.perf_counter() - start}
        metrics.update(cluster_metrics(results, labels))
        if self.grid_prototypes and context.run_dir is not None and context.eval_context is not None:
            write_prototype_grid(context, features, results[0], self.grid_prototypes, epoch,
                                 Path(context.run_dir) / f"prototypes_epoch{epoch + 1:03d}.png")
        return metrics

    @torch.no_grad()
    def training_features(self, context: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        """v' = f_k(x) of every training image under the eval transform (N x D, float32, CPU) and the labels
        (N, -1 when unlabeled). Worker w embeds the w-th contiguous slice; the slices are all-gathered."""
        if context.eval_context is None:
            raise ValueError("pcl: the E-step needs the run's eval context (sslcore's loop provides it)")
        modes = self.key_backbone.training, self.key_head.training
        self.key_backbone.eval()
        self.key_head.eval()
        features, labels = context.eval_context.embed_training_data(self.encode_keys)
        self.key_backbone.train(modes[0])
        self.key_head.train(modes[1])
        return features, labels


def cluster_metrics(results: list[ClusterResult], labels: torch.Tensor) -> dict[str, Any]:
    """Per granularity: the cluster sizes (a distribution), empty and singleton clusters, and with labels the
    adjusted mutual information and NMI between clusters and classes (the paper's analysis)."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    metrics: dict[str, Any] = {}
    labelled = bool((labels >= 0).all()) and len(labels) > 0
    for result in results:
        k = result.num_clusters
        sizes = result.sizes()
        metrics[f"cluster_sizes_{k}"] = sizes.float()
        metrics[f"empty_clusters_{k}"] = float((sizes == 0).sum())
        metrics[f"singleton_clusters_{k}"] = float((sizes == 1).sum())
        if labelled:
            metrics[f"ami_{k}"] = float(adjusted_mutual_info_score(labels.numpy(), result.assignments.numpy()))
            metrics[f"nmi_{k}"] = float(normalized_mutual_info_score(labels.numpy(), result.assignments.numpy()))
    return metrics


def write_prototype_grid(context: MethodContext, features: torch.Tensor, result: ClusterResult, count: int,
                         epoch: int, path: Path, neighbours: int = 5, cell: int = 64) -> None:
    """A PNG with one row per prototype (``count`` drawn at random among the non-empty ones): the
    ``neighbours`` training images whose embeddings are nearest (cosine) to it, as in the paper's figure."""
    from sslcore.engine.data import EvalDataset

    sizes = result.sizes()
    candidates = torch.nonzero(sizes > 0).flatten().tolist()
    chosen = random.Random(epoch).sample(candidates, min(count, len(candidates)))
    similarity = result.centroids[chosen] @ F.normalize(features, dim=1).T  # count x N
    nearest = similarity.topk(min(neighbours, features.shape[0]), dim=1).indices  # count x neighbours
    # the raw uint8 images, unreadable ones replaced as in training
    dataset = EvalDataset(context.registry.build("dataset", context.eval_context.train_data), lambda image: image)
    image_grid([[np.asarray(dataset[i][0]) for i in ids] for ids in nearest.tolist()], cell).save(path)


def image_grid(rows: list[list[np.ndarray]], cell: int) -> Image.Image:
    """One row of cells per list of ``rows`` (all as long; H x W x 3 uint8 images), each image resized to
    ``cell`` x ``cell`` pixels (bicubic), side by side without gaps (torchvision's ``make_grid``)."""
    from PIL import Image
    from torchvision.utils import make_grid

    cells = [torch.from_numpy(np.array(Image.fromarray(image).resize((cell, cell), Image.BICUBIC)))
             for row in rows for image in row]  # cell x cell x 3 each
    grid = make_grid(torch.stack(cells).permute(0, 3, 1, 2), nrow=len(rows[0]), padding=0)  # 3 x H x W
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def _after_load(module: PCL, incompatible_keys: object) -> None:
    module._use_prototypes = bool(module.clustered)
