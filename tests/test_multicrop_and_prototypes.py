"""The pieces multi-crop and clustering methods share (SwAV, DeepCluster v2, DINO): one forward per crop
resolution, prototype layers on the unit sphere, and Sinkhorn-Knopp against a plain-loop version written out
here, on one process and over two real gloo workers."""

from __future__ import annotations

import torch
from torch import nn

from sslcore.testing import run_distributed
from sslcore.toolkit.multicrop import encode_crops
from sslcore.toolkit.prototypes import PrototypeLayer, sinkhorn


def test_crops_of_one_size_go_through_as_one_batch_in_view_order() -> None:
    calls: list[tuple[int, ...]] = []

    def module(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.mean(dim=(1, 2, 3))[:, None]  # N x 1

    views = [torch.randn(3, 3, s, s) for s in (8, 8, 4, 4, 4)]
    out = encode_crops(module, views)
    assert calls == [(6, 3, 8, 8), (9, 3, 4, 4)]
    torch.testing.assert_close(out, torch.cat([v.mean(dim=(1, 2, 3))[:, None] for v in views]))


def test_prototypes_are_bias_free_heads_put_back_on_the_unit_sphere() -> None:
    layer = PrototypeLayer(8, [5, 3])
    assert [tuple(head.weight.shape) for head in layer.heads] == [(5, 8), (3, 8)]
    assert all(head.bias is None for head in layer.heads)
    layer.normalize_()
    assert all(torch.allclose(head.weight.norm(dim=1), torch.ones(head.out_features)) for head in layer.heads)
    z = nn.functional.normalize(torch.randn(4, 8), dim=1)
    scores = layer(z)
    torch.testing.assert_close(scores[1], z @ layer.heads[1].weight.T)
    assert float(scores[0].detach().abs().max()) <= 1 + 1e-6  # cosines


def formula_sinkhorn(scores: list[list[float]], epsilon: float, iterations: int) -> list[list[float]]:
    """SwAV's distributed_sinkhorn on one process, in plain floats: Q = exp(S / eps)^T (K x B), Q /= sum(Q);
    then `iterations` times: each row (prototype) divided by its sum times K, each column (sample) by its sum
    times B; finally Q x B, transposed back to B x K."""
    import math

    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / epsilon) for i in range(b)] for j in range(k)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / (sum(row) * k) for x in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / (columns[i] * b) for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def scores(seed: int = 0, b: int = 12, k: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(b, 6, generator=generator), dim=1) @ \
        nn.functional.normalize(torch.randn(k, 6, generator=generator), dim=1).T


def test_sinkhorn_matches_the_official_iterations_and_equipartitions() -> None:
    s = scores()
    q = sinkhorn(s, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q, torch.tensor(formula_sinkhorn(s.tolist(), 0.05, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # every sample's code sums to 1
    # with many iterations every prototype receives B / K of the codes' mass
    balanced = sinkhorn(s, epsilon=0.05, iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((5,), 12 / 5), rtol=1e-3, atol=1e-3)
    assert sinkhorn(s.bfloat16(), 0.05, 3).dtype == torch.float32


def _sinkhorn_worker(rank: int, world_size: int) -> dict:
    mine = scores().chunk(world_size)[rank]
    return {"global": sinkhorn(mine, 0.05, 3), "alone": sinkhorn(mine, 0.05, 3, global_batch=False)}


def test_two_workers_get_the_codes_of_the_global_batch() -> None:
    results = run_distributed(_sinkhorn_worker, world_size=2)
    torch.testing.assert_close(torch.cat([r["global"] for r in results]), sinkhorn(scores(), 0.05, 3))
    for rank, result in enumerate(results):  # global_batch=False: this worker's samples alone, no collective
        torch.testing.assert_close(result["alone"], sinkhorn(scores().chunk(2)[rank], 0.05, 3))
