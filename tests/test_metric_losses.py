"""contrastive_margin and triplet against their formulas written out one pair at a time, for every mining
option, with and without an exclusion mask; and fed by the built-in negative sources."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslcore.components.losses import ContrastiveMarginConfig, ContrastiveMarginLoss, TripletConfig, TripletLoss
from sslcore.registry import Registry

MININGS = ["all", "hard", "semi_hard", "easy"]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def kept(d_ap: float, d_an: float, margin: float, mining: str) -> bool:
    """FaceNet's categories of a negative, by its distance to the anchor against the positive's."""
    return {"all": True, "hard": d_an < d_ap, "semi_hard": d_ap <= d_an < d_ap + margin,
            "easy": d_an >= d_ap + margin}[mining]


def reference_contrastive(q, k, negatives, exclude, margin: float, mining: str) -> float:
    pull = sum(0.5 * distance(q[i], k[i]) ** 2 for i in range(len(q))) / len(q)
    push, count = 0.0, 0
    for i in range(len(q)):
        d_ap = distance(q[i], k[i])
        for j in range(len(negatives)):
            d_an = distance(q[i], negatives[j])
            if (exclude is None or not exclude[i, j]) and kept(d_ap, d_an, margin, mining):
                push += 0.5 * max(0.0, margin - d_an) ** 2
                count += 1
    return pull + (push / count if count else 0.0)


def reference_triplet(q, k, negatives, exclude, margin: float, mining: str) -> float:
    total, count = 0.0, 0
    for i in range(len(q)):
        d_ap = distance(q[i], k[i]) ** 2
        for j in range(len(negatives)):
            d_an = distance(q[i], negatives[j]) ** 2
            if (exclude is None or not exclude[i, j]) and kept(d_ap, d_an, margin, mining):
                total += max(0.0, d_ap - d_an + margin)
                count += 1
    return total / count if count else 0.0


def embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    k = F.normalize(q + 0.6 * torch.randn(6, 4, generator=generator), dim=1)  # near, not equal, to q
    negatives = F.normalize(torch.randn(9, 4, generator=generator), dim=1)
    exclude = torch.rand(6, 9, generator=generator) < 0.2
    return q, k, negatives, exclude


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("masked", [False, True])
def test_contrastive_margin_matches_the_formula(mining: str, masked: bool) -> None:
    q, k, negatives, exclude = embeddings()
    exclude = exclude if masked else None
    loss = ContrastiveMarginLoss(ContrastiveMarginConfig(margin=1.2, mining=mining))(q, k, negatives, exclude)
    assert float(loss) == pytest.approx(reference_contrastive(q, k, negatives, exclude, 1.2, mining), rel=1e-5)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("masked", [False, True])
def test_triplet_matches_the_formula(mining: str, masked: bool) -> None:
    q, k, negatives, exclude = embeddings()
    exclude = exclude if masked else None
    loss = TripletLoss(TripletConfig(margin=0.5, mining=mining))(q, k, negatives, exclude)
    assert float(loss) == pytest.approx(reference_triplet(q, k, negatives, exclude, 0.5, mining), rel=1e-5, abs=1e-7)


def test_each_mining_option_selects_a_different_nonempty_set() -> None:
    """The fixture has negatives of every kind, so the tests above check each branch on real selections."""
    q, k, negatives, _ = embeddings()
    d_ap = [distance(q[i], k[i]) ** 2 for i in range(6)]
    counts = {m: sum(kept(d_ap[i], distance(q[i], negatives[j]) ** 2, 0.5, m) for i in range(6) for j in range(9))
              for m in MININGS}
    assert counts["hard"] and counts["semi_hard"] and counts["easy"]
    assert counts["hard"] + counts["semi_hard"] + counts["easy"] == counts["all"] == 54


def test_nothing_selected_gives_zero_and_a_gradient() -> None:
    q = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    negatives = -q.detach()  # every negative as far as can be: no hard ones
    loss = TripletLoss(TripletConfig(mining="hard"))(q, q.detach(), negatives)
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad is not None


@pytest.mark.parametrize("source", [{"name": "in_batch"}, {"name": "queue", "size": 16},
                                    {"name": "memory_bank", "num_negatives": 16}])
@pytest.mark.parametrize("loss", ["contrastive_margin", "triplet"])
def test_metric_losses_take_negatives_from_any_source(source: dict, loss: str, registry: Registry) -> None:
    negatives_source = registry.build("negative_source", source, dim=4, global_batch_size=8, dataset_size=32)
    loss_fn = registry.build("loss", {"name": loss, "mining": "all"})
    q = F.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    k = F.normalize(torch.randn(8, 4), dim=1)
    index = torch.arange(8)  # the images' dataset indices
    negatives, exclude = negatives_source.negatives(q, k, index)
    value = loss_fn(q, k, negatives, exclude)
    value.backward()
    assert torch.isfinite(value) and q.grad is not None and q.grad.abs().sum() > 0
    negatives_source.update(k, index)
