"""Evaluators that measure a backbone's features during and after training.

- ``knn`` is the weighted k-nearest-neighbour classifier of InstDisc (Wu et al. 2018, "Unsupervised
  Feature Learning via Non-Parametric Instance Discrimination"), the monitor used by lightly and
  solo-learn: each test image takes the k training images whose features are most similar (cosine),
  and each neighbour votes for its class with weight exp(s / tau).
- ``clustering_quality``: k-means (faiss) of the L2-normalised test features into as many clusters as
  classes, scored against the labels by adjusted mutual information, NMI and adjusted Rand index (the
  analysis of PCL, Li et al. 2021, Table 5).
- ``embedding_plot``: 2-D maps of the test features coloured by class, as PNGs in the run folder: t-SNE
  (scikit-learn) and UMAP (McInnes et al. 2018; umap-learn, the optional extra ``sslcore[umap]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.api.errors import UserError
from sslcore.api.hookspecs import RegisterEvaluator

if TYPE_CHECKING:
    from sslcore.engine.context import EvalContext


#: Marks a parameter that is itself a dataset block, validated by the config layer like ``data:``.
DATASET_BLOCK = {"sslcore_kind": "dataset"}


class KNNConfig(BaseModel):
    """Parameters of the weighted kNN evaluator."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(200, gt=0, description="Number of neighbours that vote (200 in InstDisc).")
    temperature: float = Field(0.1, gt=0, description="tau: a neighbour at cosine similarity s votes "
                                                      "with weight exp(s / tau).")
    every_epochs: int = Field(10, ge=0, description="Evaluate every this many epochs; 0: only at the end.")
    data: dict[str, Any] = Field(description="The labelled test set, a dataset block such as "
                                             "{name: image_folder, root: .../test}.",
                                 json_schema_extra=DATASET_BLOCK)
    train_data: dict[str, Any] | None = Field(
        None, description="The labelled memory bank, a dataset block; None: the experiment's training data.",
        json_schema_extra=DATASET_BLOCK)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1,
                chunk_size: int = 256) -> torch.Tensor:
    """Class scores (num_test x num_classes) of the weighted kNN vote.

    ``train_features``: M x D, ``train_labels``: M (ints in [0, num_classes)), ``test_features``: T x D.
    Features are L2-normalized here. Test features go ``chunk_size`` at a time, so memory stays
    chunk_size x M. With fewer than ``k`` training images, all of them vote.
    """
    train = F.normalize(train_features.float(), dim=1)  # M x D
    train_labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    scores = []
    for chunk in test_features.split(chunk_size):
        similarity = F.normalize(chunk.float(), dim=1).to(train.device) @ train.T  # n x M
        top_similarity, top_index = similarity.topk(k, dim=1)  # n x k
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=train.device)  # n x C
        scores.append(votes.scatter_add_(1, train_labels[top_index], weights))
    return torch.cat(scores)  # T x C


class KNNEvaluator:
    """Top-1 and top-5 accuracy of :func:`knn_predict` on the test set, with the training set as memory."""

    def __init__(self, config: KNNConfig) -> None:
        self.config = config
        self.every_epochs = config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        memory_classes, test_classes = context.classes(self.config.train_data), context.classes(self.config.data)
        if memory_classes and test_classes and memory_classes != test_classes:
            raise UserError(f"knn: the test set's classes {test_classes} (evaluators[knn].data) differ from the "
                            f"memory bank's {memory_classes}; labels would not mean the same class in both")
        train_features, train_labels = self._labelled_features(backbone, context, "train_data")  # M x D, M
        test_features, test_labels = self._labelled_features(backbone, context, "data")  # T x D, T
        num_classes = int(train_labels.max()) + 1
        scores = knn_predict(train_features.to(context.device), train_labels, test_features, num_classes,
                             k=self.config.k, temperature=self.config.temperature)  # T x C
        ranked = scores.topk(min(5, num_classes), dim=1).indices.cpu()  # T x 5
        hits = (ranked == test_labels.unsqueeze(1)).double()  # T x 5
        return {"knn_top1": hits[:, 0].mean().item(), "knn_top5": hits.sum(dim=1).mean().item()}

    def _labelled_features(self, backbone: nn.Module, context: EvalContext, key: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        block = getattr(self.config, key)  # None: the experiment's training data
        where = f"knn (evaluators[knn].{key})" if block is not None else "knn (the experiment's data)"
        return context.labelled_features(backbone, block, where)


class ClusteringQualityConfig(BaseModel):
    """Parameters of the clustering-quality evaluator."""

    model_config = ConfigDict(extra="forbid")

    num_clusters: int | None = Field(None, ge=2, description="k of k-means; None: the number of classes")
    seed: int = Field(0, description="k-means seed")
    every_epochs: int = Field(10, ge=0, description="Evaluate every this many epochs; 0: only at the end.")
    data: dict[str, Any] = Field(description="The labelled test set, a dataset block.",
                                 json_schema_extra=DATASET_BLOCK)


class ClusteringQualityEvaluator:
    """AMI, NMI and ARI between k-means clusters of the test features and the test labels."""

    def __init__(self, config: ClusteringQualityConfig) -> None:
        self.config = config
        self.every_epochs = config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

        features, labels = context.labelled_features(backbone, self.config.data,
                                                     "clustering_quality (evaluators[clustering_quality].data)")
        k = self.config.num_clusters or int(labels.max()) + 1
        kmeans = context.registry.build("clustering", {"name": "faiss_kmeans", "num_clusters": [k],
                                                       "seed": self.config.seed, "nredo": 5})
        clusters = kmeans.fit(F.normalize(features, dim=1))[0].assignments.numpy()
        labels = labels.numpy()
        return {"ami": float(adjusted_mutual_info_score(labels, clusters)),
                "nmi": float(normalized_mutual_info_score(labels, clusters)),
                "ari": float(adjusted_rand_score(labels, clusters))}


class EmbeddingPlotConfig(BaseModel):
    """Parameters of the embedding plot."""

    model_config = ConfigDict(extra="forbid")

    methods: list[Literal["tsne", "umap"]] = Field(["tsne"], min_length=1, description="Maps to draw, one PNG "
                                                   "each; 'umap' needs umap-learn (pip install 'sslcore[umap]')")
    max_points: int = Field(2000, ge=10, description="Plot a fixed random subset of this many test images "
                                                     "(t-SNE is quadratic in the points)")
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity")
    n_neighbors: int = Field(15, ge=2, description="UMAP neighbourhood size")
    min_dist: float = Field(0.1, ge=0, description="UMAP minimum distance between embedded points")
    seed: int = Field(0, description="Seed of the subset, t-SNE and UMAP")
    every_epochs: int = Field(0, ge=0, description="Plot every this many epochs; 0: only at the end.")
    data: dict[str, Any] = Field(description="The test set, a dataset block (labelled: coloured by class).",
                                 json_schema_extra=DATASET_BLOCK)


class EmbeddingPlotEvaluator:
    """t-SNE and/or UMAP of L2-normalised test features (cosine geometry), coloured by class, written to
    ``RUN_DIR/embedding_<method>_<epoch>.png``; returns t-SNE's final KL divergence (how well the map fits)."""

    def __init__(self, config: EmbeddingPlotConfig) -> None:
        self.config = config
        self.every_epochs = config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        if context.run_dir is None:
            raise UserError("embedding_plot writes a PNG into the run folder, and this evaluation has none")
        features, labels = context.features(backbone, self.config.data)
        generator = torch.Generator().manual_seed(self.config.seed)
        subset = torch.randperm(len(features), generator=generator)[:self.config.max_points]
        features, labels = F.normalize(features[subset], dim=1).numpy(), labels[subset].numpy()
        epoch = "init" if context.epoch < 0 else f"epoch{context.epoch + 1:03d}"
        classes = context.classes(self.config.data)
        metrics = {}
        for method in self.config.methods:
            points, title = self._tsne(features, metrics) if method == "tsne" else self._umap(features)
            self._plot(points, labels, classes, f"{title} of {len(features)} test features, {epoch}",
                       context.run_dir / f"embedding_{method}_{epoch}.png")
        return metrics

    def _tsne(self, features: np.ndarray, metrics: dict[str, float]) -> tuple[np.ndarray, str]:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=min(self.config.perplexity, (len(features) - 1) / 3),
                    init="pca", random_state=self.config.seed)
        points = tsne.fit_transform(features)
        metrics["tsne_kl_divergence"] = float(tsne.kl_divergence_)
        return points, "t-SNE"

    def _umap(self, features: np.ndarray) -> tuple[np.ndarray, str]:
        try:
            import umap
        except ImportError:
            raise UserError("embedding_plot: methods 'umap' needs umap-learn; pip install 'sslcore[umap]' or "
                            "drop 'umap' from evaluators[embedding_plot].methods") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(self.config.n_neighbors, len(features) - 1),
                            min_dist=self.config.min_dist, random_state=self.config.seed, n_jobs=1)
        return reducer.fit_transform(features), "UMAP"

    @staticmethod
    def _plot(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path) -> None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 6), dpi=100)
        axes = figure.add_subplot()
        for label in sorted(set(labels.tolist())):
            chosen = labels == label
            name = classes[label] if 0 <= label < len(classes) else "unlabeled"
            axes.scatter(points[chosen, 0], points[chosen, 1], s=4, label=name)
        axes.set_title(title)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.legend(markerscale=3, fontsize=7, loc="best")
        figure.tight_layout()
        figure.savefig(path)


@hookimpl
def register_evaluators(register: RegisterEvaluator) -> None:
    register("knn", KNNEvaluator, config=KNNConfig)
    register("clustering_quality", ClusteringQualityEvaluator, config=ClusteringQualityConfig)
    register("embedding_plot", EmbeddingPlotEvaluator, config=EmbeddingPlotConfig)
