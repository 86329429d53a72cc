"""The debiased loss against the paper's formula written out here (with and without excluded negatives, on
the CPU and on a GPU), the plugin contract, the installed entry point, and an experiment that uses it."""

import math

import pytest
import torch

from sslcore.config import resolve
from sslcore.registry import Registry
from sslcore.testing import check_entry_point, check_plugin


def reference(q, k, negatives, t, tau_plus, exclude=None):
    """The paper's formula, one query at a time, over the negatives that count for it."""
    total = 0.0
    for i in range(q.shape[0]):
        counted = [n for j, n in enumerate(negatives) if exclude is None or not exclude[i, j]]
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in counted)
        ng = max((neg - len(counted) * tau_plus * pos) / (1 - tau_plus), len(counted) * math.exp(-1 / t))
        total += -math.log(pos / (pos + ng))
    return total / q.shape[0]


def build_loss(registry: Registry):
    registry.add_module("sslcore_debiased")
    return registry.get("loss", "debiased_info_nce").build({"temperature": 0.5, "tau_plus": 0.1})


def inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (6 x 16), 30 negatives, all L2-normalised, and a mask excluding negative i for query i."""
    generator = torch.Generator().manual_seed(0)
    q, k, negatives = (torch.nn.functional.normalize(torch.randn(n, 16, generator=generator), dim=1)
                       for n in (6, 6, 30))
    exclude = torch.eye(6, 30, dtype=torch.bool)
    return q.to(device), k.to(device), negatives.to(device), exclude.to(device)


def test_loss_matches_the_paper(registry: Registry) -> None:
    loss = build_loss(registry)
    q, k, negatives, exclude = inputs()
    assert math.isclose(float(loss(q, k, negatives)), reference(q, k, negatives, 0.5, 0.1), rel_tol=1e-5)
    assert math.isclose(float(loss(q, k, negatives, exclude)), reference(q, k, negatives, 0.5, 0.1, exclude),
                        rel_tol=1e-5)


@pytest.mark.gpu
def test_loss_matches_the_paper_on_a_gpu(registry: Registry) -> None:
    loss = build_loss(registry)
    q, k, negatives, exclude = inputs("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(q, k, negatives, exclude)
    assert value.device.type == "cuda" and value.dtype == torch.float32
    expected = reference(q.cpu(), k.cpu(), negatives.cpu(), 0.5, 0.1, exclude.cpu())
    assert math.isclose(float(value), expected, rel_tol=1e-5)


def test_the_plugin_meets_the_loss_contract(registry: Registry) -> None:
    check_plugin(registry, "sslcore_debiased", [("loss", "debiased_info_nce")])


def test_the_installed_entry_point_registers_the_loss() -> None:
    check_entry_point("sslcore-debiased", [("loss", "debiased_info_nce")])


def test_usable_from_an_experiment(tmp_path) -> None:
    registry = Registry(autoload=False, modules=["sslcore_debiased", "sslcore_moco.plugin"])
    resolved = resolve({"method": "moco", "loss": {"name": "debiased_info_nce", "tau_plus": 0.05},
                        "data": {"name": "image_folder", "root": str(tmp_path)}}, registry)
    assert resolved.blocks["loss"] == {"name": "debiased_info_nce", "temperature": 0.2, "tau_plus": 0.05}
