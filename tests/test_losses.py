"""InfoNCE against its formula written out independently, with and without an exclusion mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from sslcore.components.losses import InfoNCEConfig, InfoNCELoss

TAU = 0.2


def reference_info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                       exclude: torch.Tensor | None = None) -> torch.Tensor:
    """-log(exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.k_j/tau))), averaged over queries, one at a time."""
    losses = []
    for i in range(q.shape[0]):
        positive = torch.exp((q[i] * k[i]).sum() / TAU)
        denominator = positive
        for j in range(negatives.shape[0]):
            if exclude is None or not exclude[i, j]:
                denominator = denominator + torch.exp((q[i] * negatives[j]).sum() / TAU)
        losses.append(-torch.log(positive / denominator))
    return torch.stack(losses).mean()


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


@pytest.fixture
def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return unit(5, 8, generator=generator), unit(5, 8, generator=generator), unit(7, 8, generator=generator)


def loss_fn() -> InfoNCELoss:
    return InfoNCELoss(InfoNCEConfig(temperature=TAU))


def test_matches_the_formula(tensors):
    q, k, negatives = tensors
    expected = reference_info_nce(q, k, negatives)
    assert torch.allclose(loss_fn()(q, k, negatives).double(), expected, atol=1e-5)


def test_matches_the_formula_with_an_exclusion_mask(tensors):
    q, k, negatives = tensors
    exclude = torch.zeros(5, 7, dtype=torch.bool)
    exclude[0, :3] = exclude[2, 6] = exclude[4, :] = True
    expected = reference_info_nce(q, k, negatives, exclude)
    assert torch.allclose(loss_fn()(q, k, negatives, exclude).double(), expected, atol=1e-5)


def test_only_positive_left_gives_zero_loss(tensors):
    q, k, negatives = tensors
    loss = loss_fn()(q, k, negatives, torch.ones(5, 7, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_identical_keys_give_log_of_one_plus_k():
    q = F.normalize(torch.ones(3, 4), dim=1)
    assert loss_fn()(q, q, q.repeat(2, 1)).item() == pytest.approx(math.log(1 + 6), rel=1e-5)


def test_gradients_match_the_formula(tensors):
    q, k, negatives = (t.float().requires_grad_() for t in tensors)
    exclude = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.3
    loss_fn()(q, k, negatives, exclude).backward()
    grads = [t.grad.clone() for t in (q, k, negatives)]
    q_ref, k_ref, negatives_ref = (t.detach().double().requires_grad_() for t in (q, k, negatives))
    reference_info_nce(q_ref, k_ref, negatives_ref, exclude).backward()
    for grad, reference in zip(grads, (q_ref.grad, k_ref.grad, negatives_ref.grad), strict=True):
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad.double(), reference, atol=1e-5)


def test_float32_under_bfloat16_autocast(tensors):
    q, k, negatives = (t.bfloat16() for t in tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn()(q, k, negatives)
    assert loss.dtype == torch.float32
    expected = reference_info_nce(q.double(), k.double(), negatives.double())
    assert torch.allclose(loss.double(), expected, atol=1e-5)


def test_temperature_must_be_positive():
    with pytest.raises(ValidationError):
        InfoNCEConfig(temperature=0)
