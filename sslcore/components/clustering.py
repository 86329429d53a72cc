"""Clustering of feature sets, for methods with an E-step such as PCL (Li et al., ICLR 2021).

A clustering's ``fit(features: N x D) -> list[ClusterResult]`` returns one result per granularity (number
of clusters): each sample's cluster, the L2-normalised centroids, and each sample's squared L2 distance to
its centroid (grouped by ``assignments``, these are the per-cluster distances PCL's concentration uses).

- ``faiss_kmeans``: k-means by faiss, as in the official PCL code (``run_kmeans`` in main_pcl.py):
  niter 20, nredo, at most/at least ``max/min_points_per_centroid`` training points per centroid, the
  seed of granularity m being ``seed + m``. On a GPU when faiss-gpu and a GPU are there (``device``).
- ``sinkhorn``: balanced clusters: prototypes refined by alternating an equipartition assignment
  (Sinkhorn-Knopp, as SwAV computes its codes) with a centroid update.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sslcore import hookimpl
from sslcore.api.hookspecs import Clustering, ClusterResult, RegisterClustering
from sslcore.toolkit.prototypes import sinkhorn


class FaissKMeansConfig(BaseModel):
    """Parameters of ``faiss_kmeans`` (defaults: the official PCL code)."""

    model_config = ConfigDict(extra="forbid")

    num_clusters: list[int] = Field([100], min_length=1, description="K of each granularity, e.g. "
                                    "[25000, 50000, 100000] on ImageNet, [100, 250, 500] on CIFAR-10")
    niter: int = Field(20, ge=1, description="k-means iterations")
    nredo: int = Field(5, ge=1, description="runs from different initialisations; the best objective is kept")
    seed: int = Field(0, description="granularity m uses seed + m")
    max_points_per_centroid: int = Field(1000, ge=1, description="faiss trains on at most K times this many "
                                                                "points (a random subset)")
    min_points_per_centroid: int = Field(10, ge=1, description="faiss warns below K times this many points")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="'auto': a GPU index when faiss-gpu is installed and a GPU is visible, else CPU")


class FaissKMeans(Clustering):
    """k-means of the official PCL code on faiss (see the module docstring)."""

    def __init__(self, config: FaissKMeansConfig) -> None:
        self.config = config
        self.num_clusters = list(config.num_clusters)

    def fit(self, features: torch.Tensor) -> list[ClusterResult]:
        import faiss

        x = np.ascontiguousarray(features.detach().float().cpu().numpy())  # N x D
        n, d = x.shape
        results = []
        for m, k in enumerate(self.config.num_clusters):
            if k > n:
                raise ValueError(f"faiss_kmeans: {k} clusters for {n} samples; num_clusters must not exceed "
                                 f"the number of training images")
            clustering = faiss.Clustering(d, k)
            clustering.niter = self.config.niter
            clustering.nredo = self.config.nredo
            clustering.seed = self.config.seed + m
            clustering.max_points_per_centroid = self.config.max_points_per_centroid
            clustering.min_points_per_centroid = self.config.min_points_per_centroid
            index = self._index(faiss, d)
            clustering.train(x, index)
            squared, nearest = index.search(x, 1)  # N x 1 each: squared L2 to, and id of, the nearest centroid
            centroids = torch.from_numpy(faiss.vector_to_array(clustering.centroids).reshape(k, d))
            results.append(ClusterResult(assignments=torch.from_numpy(nearest[:, 0].astype(np.int64)),
                                         centroids=F.normalize(centroids, dim=1), norms=centroids.norm(dim=1),
                                         distances=torch.from_numpy(squared[:, 0].astype(np.float32))))
        return results

    def _index(self, faiss, d: int):
        use_gpu = self.config.device == "gpu" or (
            self.config.device == "auto" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        if not use_gpu:
            return faiss.IndexFlatL2(d)
        if not hasattr(faiss, "StandardGpuResources"):
            raise ValueError("faiss_kmeans: device 'gpu' needs faiss-gpu (pip install 'sslcore[gpu]')")
        self._gpu_resources = getattr(self, "_gpu_resources", None) or faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return faiss.GpuIndexFlatL2(self._gpu_resources, d, config)


class SinkhornConfig(BaseModel):
    """Parameters of ``sinkhorn`` clustering."""

    model_config = ConfigDict(extra="forbid")

    num_clusters: list[int] = Field([100], min_length=1, description="K of each granularity")
    epsilon: float = Field(0.05, gt=0, description="entropic regularisation of the assignment (SwAV: 0.05)")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp normalisations per assignment (SwAV: 3)")
    niter: int = Field(10, ge=1, description="assignment / centroid-update rounds")
    seed: int = Field(0, description="granularity m starts from the samples drawn with seed + m")


class SinkhornClustering(Clustering):
    """Equal-size clusters on the unit sphere.

    Start from K random samples as prototypes; each round computes the soft assignment Q (N x K) whose
    rows sum to 1/N and columns to 1/K that maximises tr(Q^T X C^T) + epsilon H(Q) (Sinkhorn-Knopp, as
    SwAV's codes), assigns each sample to argmax Q, and moves each prototype to the normalised mean of its
    samples. Features are L2-normalised first.
    """

    def __init__(self, config: SinkhornConfig) -> None:
        self.config = config
        self.num_clusters = list(config.num_clusters)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> list[ClusterResult]:
        x = F.normalize(features.detach().float(), dim=1)  # N x D
        n = x.shape[0]
        results = []
        for m, k in enumerate(self.config.num_clusters):
            if k > n:
                raise ValueError(f"sinkhorn: {k} clusters for {n} samples; num_clusters must not exceed "
                                 f"the number of training images")
            generator = torch.Generator(device=x.device).manual_seed(self.config.seed + m)
            centroids = x[torch.randperm(n, generator=generator, device=x.device)[:k]].clone()  # K x D
            for _ in range(self.config.niter):
                assignments = self.equipartition(x @ centroids.T).argmax(dim=1)  # N
                sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
                empty = torch.bincount(assignments, minlength=k) == 0
                centroids = torch.where(empty[:, None], centroids, F.normalize(sums, dim=1))
            assignments = self.equipartition(x @ centroids.T).argmax(dim=1)
            distances = (x - centroids[assignments]).pow(2).sum(dim=1)
            results.append(ClusterResult(assignments=assignments.cpu(), centroids=centroids.cpu(),
                                         norms=torch.ones(k), distances=distances.cpu()))
        return results

    def equipartition(self, scores: torch.Tensor) -> torch.Tensor:
        """Q: N x K, rows summing to 1/N and columns to 1/K, from similarities ``scores`` (N x K): SwAV's
        Sinkhorn-Knopp (:func:`sslcore.toolkit.prototypes.sinkhorn`) on this process's samples."""
        q = sinkhorn(scores, self.config.epsilon, self.config.sinkhorn_iterations, global_batch=False)
        return q / scores.shape[0]


@hookimpl
def register_clusterings(register: RegisterClustering) -> None:
    register("faiss_kmeans", FaissKMeans, config=FaissKMeansConfig)
    register("sinkhorn", SinkhornClustering, config=SinkhornConfig)
