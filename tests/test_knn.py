"""Weighted kNN: knn_predict against a brute-force vote, and the evaluator end to end on real images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sslcore.api.errors import UserError
from sslcore.components.augmentations import MoCoV2Augmentation, MoCoV2Config
from sslcore.components.encoders import ResNetConfig, resnet18
from sslcore.components.evaluators import KNNConfig, KNNEvaluator, knn_predict
from sslcore.engine.context import EvalContext

torch.set_num_threads(1)


def brute_force_knn(train_features, train_labels, test_features, num_classes, k, temperature):
    """For each test point: cosine similarity to every training point, the k largest vote exp(s / T)."""
    scores = torch.zeros(len(test_features), num_classes, dtype=torch.float64)
    for i, x in enumerate(test_features.double()):
        similarities = []
        for y, label in zip(train_features.double(), train_labels.tolist(), strict=True):
            similarities.append(((x @ y / (x.norm() * y.norm())).item(), label))
        similarities.sort(key=lambda pair: pair[0], reverse=True)
        for similarity, label in similarities[:k]:
            scores[i, label] += math.exp(similarity / temperature)
    return scores


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 256), (5, 7), (40, 3), (500, 256)])
def test_knn_predict_matches_brute_force(k, chunk_size):
    generator = torch.Generator().manual_seed(k)
    train = torch.randn(60, 8, generator=generator) * 3  # not normalized: knn_predict normalizes
    labels = torch.randint(0, 4, (60,), generator=generator)
    labels[:3] = 4  # a class with fewer members than k
    test = torch.randn(17, 8, generator=generator)
    scores = knn_predict(train, labels, test, num_classes=6, k=k, temperature=0.1, chunk_size=chunk_size)
    expected = brute_force_knn(train, labels, test, num_classes=6, k=k, temperature=0.1)
    assert scores.shape == (17, 6)
    assert torch.allclose(scores.double(), expected, rtol=1e-4)
    assert (scores[:, 5] == 0).all()  # a class with no training image gets no vote


def test_knn_predict_is_exact_on_separated_clusters():
    centers = torch.eye(3) * 10
    train = centers.repeat_interleave(5, dim=0) + torch.randn(15, 3) * 0.1
    labels = torch.arange(3).repeat_interleave(5)
    test = centers + torch.randn(3, 3) * 0.1
    scores = knn_predict(train, labels, test, num_classes=3, k=5)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]


def image_folder(root: Path) -> dict[str, str]:
    return {"name": "image_folder", "root": str(root)}


def eval_context(registry, train_root: Path) -> EvalContext:
    augmentation = MoCoV2Augmentation(MoCoV2Config(size=32))
    return EvalContext(registry=registry, eval_transform=augmentation.eval,
                       train_data=image_folder(train_root), device=torch.device("cpu"), batch_size=100,
                       num_workers=0)


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(ResNetConfig()).eval()  # the standard stem: 16x cheaper than the CIFAR stem at 32 px


def test_evaluate_on_real_cifar10_images(registry, cifar10_subset, backbone):
    evaluator = KNNEvaluator(KNNConfig(k=20, every_epochs=5, data=image_folder(cifar10_subset["test"])))
    assert evaluator.every_epochs == 5
    metrics = evaluator.evaluate(backbone, eval_context(registry, cifar10_subset["train"]))
    assert set(metrics) == {"knn_top1", "knn_top5"}
    assert 0 <= metrics["knn_top1"] <= metrics["knn_top5"] <= 1
    assert metrics["knn_top5"] > 0.5  # 10 classes: chance is 0.5; even random features do better


def test_evaluate_uses_its_own_memory_bank(registry, cifar10_subset, backbone):
    """train_data given: the memory bank is the test set itself, so every image finds itself (k=1)."""
    test = image_folder(cifar10_subset["test"])
    evaluator = KNNEvaluator(KNNConfig(k=1, data=test, train_data=test))
    metrics = evaluator.evaluate(backbone, eval_context(registry, cifar10_subset["train"]))
    assert metrics["knn_top1"] == 1.0


def test_unlabelled_data_is_a_user_error(registry, cifar10_subset, backbone, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((cifar10_subset["test"] / "cat").iterdir())[:4]:
        (flat / image.name).symlink_to(image)
    evaluator = KNNEvaluator(KNNConfig(k=2, data=image_folder(flat)))
    with pytest.raises(UserError, match=r"knn \(evaluators\[knn\]\.data\) needs labelled data"):
        evaluator.evaluate(backbone, eval_context(registry, cifar10_subset["train"]))


def test_knn_refuses_test_classes_that_differ_from_the_memory_bank(cifar10_subset, tmp_path) -> None:
    from sslcore.api.errors import UserError
    from sslcore.engine.context import EvalContext
    from sslcore.registry import Registry

    registry = Registry(autoload=False)
    partial = tmp_path / "test"
    partial.mkdir()
    for name in ("airplane", "cat"):  # two of the ten classes: label 1 would be 'cat' here, 'automobile' there
        (partial / name).symlink_to((cifar10_subset["test"] / name).resolve(), target_is_directory=True)
    aug = registry.get("augmentation", "moco_v2").build({"size": 32})
    context = EvalContext(registry=registry, eval_transform=aug.eval,
                          train_data={"name": "image_folder", "root": str(cifar10_subset["train"])},
                          device=torch.device("cpu"), batch_size=64, num_workers=0)
    knn = registry.get("evaluator", "knn").build({"data": {"name": "image_folder", "root": str(partial)}})
    encoder = registry.get("encoder", "resnet18").build({}).eval()
    with pytest.raises(UserError, match="differ from the memory bank"):
        knn.evaluate(encoder, context)
