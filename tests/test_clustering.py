"""faiss k-means and Sinkhorn clustering on real CIFAR-10 features, and the clustering-quality evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslcore.engine.context import EvalContext
from sslcore.registry import Registry


@pytest.fixture(scope="module")
def real_features(cifar10_subset: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features of 200 real CIFAR-10 training images from a (seeded, random) ResNet-18."""
    registry = Registry(autoload=False)
    torch.manual_seed(0)
    encoder = registry.build("encoder", {"name": "resnet18", "cifar_stem": True}).eval()
    augmentation = registry.build("augmentation", {"name": "moco_v2", "size": 32})
    block = {"name": "image_folder", "root": str(cifar10_subset["train"])}
    context = EvalContext(registry=registry, eval_transform=augmentation.eval, train_data=block,
                          device=torch.device("cpu"), batch_size=100, num_workers=0)
    features, labels = context.features(encoder)
    return F.normalize(features, dim=1), labels


def test_faiss_kmeans_assigns_each_feature_to_its_nearest_centroid(registry: Registry, real_features) -> None:
    features, _ = real_features
    results = registry.build("clustering", {"name": "faiss_kmeans", "num_clusters": [5, 12], "nredo": 2}).fit(features)
    assert [r.num_clusters for r in results] == [5, 12]
    for result in results:
        centroids = result.centroids * result.norms[:, None]  # the k-means centroids, before normalisation
        squared = torch.cdist(features.double(), centroids.double()).pow(2)  # N x K
        torch.testing.assert_close(result.assignments, squared.argmin(dim=1))
        torch.testing.assert_close(result.distances.double(), squared.min(dim=1).values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(result.num_clusters))
        assert int(result.sizes().sum()) == len(features)


def test_faiss_kmeans_is_reproducible_and_seeded_per_granularity(registry: Registry, real_features) -> None:
    features, _ = real_features
    block = {"name": "faiss_kmeans", "num_clusters": [8], "nredo": 1}
    first = registry.build("clustering", block).fit(features)[0]
    again = registry.build("clustering", block).fit(features)[0]
    other_seed = registry.build("clustering", {**block, "seed": 7}).fit(features)[0]
    assert torch.equal(first.assignments, again.assignments)
    assert not torch.equal(first.centroids, other_seed.centroids)


def test_more_clusters_than_samples_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="num_clusters must not exceed"):
        registry.build("clustering", {"name": "faiss_kmeans", "num_clusters": [20]}).fit(torch.randn(10, 4))


def test_sinkhorn_gives_balanced_clusters(registry: Registry, real_features) -> None:
    features, _ = real_features
    clustering = registry.build("clustering", {"name": "sinkhorn", "num_clusters": [4], "sinkhorn_iterations": 20})
    (result,) = clustering.fit(features)
    sizes = result.sizes()
    assert int(sizes.sum()) == len(features)
    assert int(sizes.min()) >= 0.5 * len(features) / 4  # equipartition: no cluster far below N / K
    # the assignment is the equipartition's argmax: rows and columns of Q sum to 1/N and 1/K
    q = clustering.equipartition(features @ result.centroids.T)
    torch.testing.assert_close(q.sum(dim=1), torch.full((len(features),), 1 / len(features)), atol=1e-3, rtol=0.1)


def test_clustering_quality_scores_clusters_against_labels(registry: Registry, cifar10_subset, tmp_path) -> None:
    from sklearn.metrics import adjusted_mutual_info_score

    evaluator = registry.build("evaluator", {"name": "clustering_quality",
                                              "data": {"name": "image_folder", "root": str(cifar10_subset["test"])}})
    augmentation = registry.build("augmentation", {"name": "moco_v2", "size": 32})
    context = EvalContext(registry=registry, eval_transform=augmentation.eval, train_data={},
                          device=torch.device("cpu"), batch_size=50, num_workers=0, run_dir=tmp_path)
    torch.manual_seed(0)
    encoder = registry.build("encoder", {"name": "resnet18", "cifar_stem": True}).eval()
    scores = evaluator.evaluate(encoder, context)
    assert set(scores) == {"ami", "nmi", "ari"}
    assert -0.1 < scores["ami"] < 1.0
    # the same k-means by hand gives the same AMI
    features, labels = context.features(encoder, evaluator.config.data)
    clusters = registry.build("clustering", {"name": "faiss_kmeans", "num_clusters": [10], "nredo": 5}).fit(
        F.normalize(features, dim=1))[0].assignments
    assert scores["ami"] == pytest.approx(adjusted_mutual_info_score(labels.numpy(), clusters.numpy()))
    assert adjusted_mutual_info_score(labels.numpy(), labels.numpy()) == pytest.approx(1.0)
