"""The classifier protocols: linear probe (fast and MoCo), low-shot SVM, fine-tuning.

On features of a known structure the right answer is known: well-separated Gaussian blobs are classified
almost perfectly, random labels at chance. The evaluators then run end to end on real CIFAR-10 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslcore.api.errors import UserError
from sslcore.components.augmentations import MoCoV2Augmentation, MoCoV2Config
from sslcore.components.encoders import ResNetConfig, resnet18
from sslcore.components.probes import (
    FinetuneConfig,
    FinetuneEvaluator,
    LinearProbeConfig,
    LinearProbeEvaluator,
    LowShotSVMConfig,
    LowShotSVMEvaluator,
    fit_logistic_regression,
    linear_probe_fast,
    low_shot_svm,
    sample_per_class,
)
from sslcore.engine.context import EvalContext
from sslcore.toolkit.batchnorm import plain_batchnorm

torch.set_num_threads(1)


def blobs(num_classes: int, per_class: int, dim: int, separation: float, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` points around each of ``num_classes`` random centres at distance ~``separation``."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * separation
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_sample_per_class_draws_exactly_k_of_each_class():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 12 + [5] * 4)[torch.randperm(26)]
    for k in (1, 2, 3):
        chosen = sample_per_class(labels, k, torch.Generator().manual_seed(k))
        assert len(set(chosen.tolist())) == len(chosen) == 4 * k  # no image twice
        counts = torch.bincount(labels[chosen], minlength=6)
        assert counts.tolist() == [k, k, k, 0, 0, k]
    again = sample_per_class(labels, 2, torch.Generator().manual_seed(2))
    assert torch.equal(again, sample_per_class(labels, 2, torch.Generator().manual_seed(2)))
    assert not all(torch.equal(again, sample_per_class(labels, 2, torch.Generator().manual_seed(s)))
                   for s in range(3, 8))
    with pytest.raises(ValueError, match="class 1 has 3 labelled images, fewer than the 4"):
        sample_per_class(labels, 4, torch.Generator().manual_seed(0))


def test_fast_linear_probe_separates_blobs_and_is_at_chance_on_random_labels():
    train_x, train_y = blobs(10, 60, 32, separation=3.0, seed=0)
    test_x, test_y = blobs(10, 40, 32, separation=3.0, seed=1)
    metrics = linear_probe_fast(train_x, train_y, test_x, test_y, 10, [0.0, 1e-4, 1e-2], max_iter=200)
    assert metrics["linear_fast_top1"] > 0.97
    assert metrics["linear_fast_top5"] == 1.0
    assert metrics["linear_fast_weight_decay"] in (0.0, 1e-4, 1e-2)

    generator = torch.Generator().manual_seed(0)  # features that carry nothing about the labels
    noise = torch.randn(1600, 32, generator=generator)
    labels = torch.randint(0, 10, (1600,), generator=generator)
    chance = linear_probe_fast(noise[:600], labels[:600], noise[600:], labels[600:], 10, [1e-3], max_iter=200)
    assert abs(chance["linear_fast_top1"] - 0.1) < 0.04  # 1000 test points: std of chance ~0.01
    assert abs(chance["linear_fast_top5"] - 0.5) < 0.06


def test_fast_linear_probe_chooses_the_penalty_on_held_out_data():
    """The penalty kept is the one whose fit on the rest scores best on the held-out split, recomputed here
    step by step: standardise, split with the seed, fit each penalty, compare, and ties go to the stronger."""
    train_x, train_y = blobs(4, 15, 100, separation=0.3, seed=0)
    test_x, test_y = blobs(4, 50, 100, separation=0.3, seed=1)
    grid = [0.0, 0.03, 0.3, 3.0]
    metrics = linear_probe_fast(train_x, train_y, test_x, test_y, 4, grid, validation_fraction=0.5, seed=7,
                                max_iter=100)
    standardised = (train_x - train_x.mean(0)) / train_x.std(0)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(7))
    held, rest = order[:30], order[30:]
    accuracy = {}
    for weight_decay in grid:
        linear = fit_logistic_regression(standardised[rest], train_y[rest], 4, weight_decay, max_iter=100)
        accuracy[weight_decay] = (linear(standardised[held]).argmax(1) == train_y[held]).float().mean().item()
    best = max(accuracy.values())
    assert len(set(accuracy.values())) > 1, accuracy  # the grid matters on this data
    assert metrics["linear_fast_weight_decay"] == max(w for w, a in accuracy.items() if a == best)


def test_low_shot_svm_on_blobs_and_random_labels():
    train_x, train_y = blobs(5, 30, 16, separation=4.0, seed=0)
    test_x, test_y = blobs(5, 40, 16, separation=4.0, seed=1)
    metrics = low_shot_svm(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), shots=[1, 4],
                           draws=3)
    assert set(metrics) == {f"svm_k{k}_{m}{s}" for k in (1, 4) for m in ("top1", "map") for s in ("", "_std")}
    assert metrics["svm_k4_top1"] > 0.95 and metrics["svm_k4_map"] > 0.95
    assert metrics["svm_k1_top1"] > 0.8
    assert 0 <= metrics["svm_k1_top1_std"] < 0.2

    rng = np.random.default_rng(0)  # features that carry nothing about the labels
    noise_x, noise_y = rng.normal(size=(200, 16)), rng.integers(0, 5, 200)
    chance = low_shot_svm(noise_x, noise_y, rng.normal(size=(1000, 16)), rng.integers(0, 5, 1000), shots=[8],
                          draws=5)
    assert abs(chance["svm_k8_top1"] - 0.2) < 0.05  # 5 classes, 1000 test points


def test_low_shot_svm_draws_differ_and_repeat_with_the_seed():
    train_x, train_y = blobs(3, 20, 8, separation=1.0, seed=0)
    test_x, test_y = blobs(3, 20, 8, separation=1.0, seed=1)
    args = (train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), [2])
    first, again = low_shot_svm(*args, draws=4, seed=3), low_shot_svm(*args, draws=4, seed=3)
    assert first == again
    assert first["svm_k2_top1_std"] > 0  # 4 different draws of 2 noisy points per class


class OddBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass that cannot normalise odd batches, as MoCo's SplitBatchNorm with 2 groups."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if len(input) % 2:
            raise ValueError("odd batch")
        return super().forward(input)


def test_plain_batchnorm_keeps_parameters_and_statistics():
    split = OddBatchNorm(4)
    split.running_mean.fill_(0.5)
    split.weight.data.fill_(2.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), split)
    plain_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d
    assert model[1].running_mean.eq(0.5).all() and model[1].weight.eq(2.0).all()
    model(torch.randn(3, 3, 2, 2))


def image_folder(root: Path) -> dict[str, str]:
    return {"name": "image_folder", "root": str(root)}


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(ResNetConfig()).eval()


def eval_context(registry, train_root: Path) -> EvalContext:
    augmentation = MoCoV2Augmentation(MoCoV2Config(size=32))
    return EvalContext(registry=registry, eval_transform=augmentation.eval, labelled_transform=augmentation.labelled,
                       train_data=image_folder(train_root), device=torch.device("cpu"), batch_size=100,
                       num_workers=0)


def test_linear_probe_protocols_on_real_images(registry, cifar10_subset, backbone):
    context = eval_context(registry, cifar10_subset["train"])
    test = image_folder(cifar10_subset["test"])
    fast = LinearProbeEvaluator(LinearProbeConfig(data=test, weight_decays=[1e-3], max_iter=50))
    assert fast.every_epochs == 10
    metrics = fast.evaluate(backbone, context)
    assert 0.1 <= metrics["linear_fast_top1"] <= metrics["linear_fast_top5"] <= 1  # 10 classes; beats chance

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    moco = LinearProbeEvaluator(LinearProbeConfig(protocol="moco", data=test, epochs=2, batch_size=64,
                                                  milestones=[1]))
    assert moco.every_epochs == 0
    metrics = moco.evaluate(backbone, context)
    assert set(metrics) == {"linear_top1", "linear_top5"}
    assert 0 <= metrics["linear_top1"] <= metrics["linear_top5"] <= 1
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: BatchNorm statistics too


def test_low_shot_svm_and_finetune_on_real_images(registry, cifar10_subset, backbone):
    context = eval_context(registry, cifar10_subset["train"])
    test = image_folder(cifar10_subset["test"])
    svm = LowShotSVMEvaluator(LowShotSVMConfig(data=test, shots=[1, 2], draws=2)).evaluate(backbone, context)
    assert 0 <= svm["svm_k1_top1"] <= 1 and 0 <= svm["svm_k2_map"] <= 1
    with pytest.raises(UserError, match=r"low_shot_svm \(evaluators\[low_shot_svm\]\.shots\).*fewer than the 21"):
        LowShotSVMEvaluator(LowShotSVMConfig(data=test, shots=[21])).evaluate(backbone, context)

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    finetune = FinetuneEvaluator(FinetuneConfig(data=test, fractions=[0.05, 0.5], epochs=2, batch_size=32))
    metrics = finetune.evaluate(backbone, context)
    assert metrics["finetune_5pct_images"] == 10 and metrics["finetune_50pct_images"] == 100  # 200 images
    assert 0 <= metrics["finetune_50pct_top1"] <= metrics["finetune_50pct_top5"] <= 1
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # a copy was tuned
