"""gather_with_grad in one process (tests/test_library_equivalence.py checks it in a real 2-process gloo group,
under DDP, against one process on the whole batch and against torch's all_gather)."""

from __future__ import annotations

import torch

from sslcore.toolkit.distributed import gather_with_grad


def test_gather_with_grad_is_the_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
