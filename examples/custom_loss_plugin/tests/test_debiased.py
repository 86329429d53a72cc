import math

import torch

from sslcore.config import resolve
from sslcore.registry import Registry
from sslcore.testing import check_component


def reference(q, k, negatives, t, tau_plus):
    """The paper's formula, one query at a time."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in negatives)
        n_count = negatives.shape[0]
        ng = max((neg - n_count * tau_plus * pos) / (1 - tau_plus), n_count * math.exp(-1 / t))
        total += -math.log(pos / (pos + ng))
    return total / q.shape[0]


def test_loss_matches_the_paper() -> None:
    registry = Registry(autoload=False, modules=["sslcore_debiased"])
    loss = registry.get("loss", "debiased_info_nce").build({"temperature": 0.5, "tau_plus": 0.1})
    torch.manual_seed(0)
    q, k, negatives = (torch.nn.functional.normalize(torch.randn(n, 16), dim=1) for n in (6, 6, 30))
    assert math.isclose(float(loss(q, k, negatives)), reference(q, k, negatives, 0.5, 0.1), rel_tol=1e-5)


def test_contract_and_usable_from_an_experiment(tmp_path) -> None:
    registry = Registry(autoload=False, modules=["sslcore_debiased", "sslcore_moco.plugin"])
    check_component(registry, "loss", "debiased_info_nce")
    resolved = resolve({"method": "moco", "loss": {"name": "debiased_info_nce", "tau_plus": 0.05},
                        "data": {"name": "image_folder", "root": str(tmp_path)}}, registry)
    assert resolved.blocks["loss"] == {"name": "debiased_info_nce", "temperature": 0.2, "tau_plus": 0.05}
