"""NNCLR: the support set's nearest neighbour against a brute-force search, its FIFO update, the loss against
eq. 2 of the paper written out here (also under bf16 autocast), two real gloo workers against one process
(loss, gradients through the gathered predictions, the support set), the recipe that ``method: nnclr``
resolves to, the plugin contract, the entry point, and the CIFAR-10 example through the CLI, also resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslcore_nnclr import NNCLR, NNCLRConfig, SupportSet, SupportSetConfig
from sslcore_nnclr.plugin import RECIPE, SLOTS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.hookspecs import Augmentation, ContrastiveLoss, Encoder, NegativeSource, Slot
from sslcore.components.losses import InfoNCEConfig, InfoNCELoss
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_entry_point,
    check_plugin,
    resume_repeats_the_run,
    run_distributed,
    run_example_briefly,
    tiny_encoder,
)

GLOBAL_BATCH = 8
SUPPORT = 16  # |Q|: two global batches
DIM = 4
TAU = 0.1
EXAMPLE = Path(__file__).parents[3] / "examples" / "nnclr_cifar10.yaml"


def support_set(size: int = SUPPORT, dim: int = DIM, batch: int = GLOBAL_BATCH) -> SupportSet:
    return SupportSet(SupportSetConfig(size=size), dim=dim, global_batch_size=batch, dataset_size=100)


def build_nnclr(**method) -> NNCLR:
    config = NNCLRConfig(**{"projector_hidden_dim": 16, "dim": DIM, "predictor_hidden_dim": 16, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    slots = built_slots(encoder=tiny_encoder(), negatives=support_set(),
                        loss=InfoNCELoss(InfoNCEConfig(temperature=TAU)))
    return NNCLR(config, context=context, slots=slots)


def views(n: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=generator) for _ in range(2)]


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def nearest(z: list[float], support: list[list[float]]) -> list[float]:
    """Eq. 1, NN(z, Q) = argmin_{q in Q} ||z - q||_2, over the unit-normalised z, one entry at a time."""
    z = unit(z)
    return min(support, key=lambda q: math.sqrt(sum((a - b) ** 2 for a, b in zip(z, q))))


def formula_loss(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, support: torch.Tensor,
                 tau: float, transposed: bool) -> float:
    """Eq. 2 for the view pair (1, 2) and (2, 1), and with ``transposed`` the paper's transposed terms
    -log( exp(NN(z_i).p_i / tau) / sum_k exp(NN(z_k).p_i / tau) ), averaged over the terms and the n images."""
    queue = support.tolist()
    n = len(z1)
    neighbours = {1: [nearest(z, queue) for z in z1.tolist()], 2: [nearest(z, queue) for z in z2.tolist()]}
    predictions = {1: [unit(p) for p in p1.tolist()], 2: [unit(p) for p in p2.tolist()]}
    terms = []
    for a, b in ((1, 2), (2, 1)):  # NN of view a, predictions of view b
        nn_a, p_b = neighbours[a], predictions[b]
        terms.append(sum(-math.log(math.exp(dot(nn_a[i], p_b[i]) / tau)
                                   / sum(math.exp(dot(nn_a[i], p_b[k]) / tau) for k in range(n)))
                         for i in range(n)) / n)
        if transposed:
            terms.append(sum(-math.log(math.exp(dot(nn_a[i], p_b[i]) / tau)
                                       / sum(math.exp(dot(nn_a[k], p_b[i]) / tau) for k in range(n)))
                             for i in range(n)) / n)
    return sum(terms) / len(terms)


def test_the_positive_is_the_nearest_neighbour_in_the_support_set_also_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    source = support_set(size=24, dim=5)
    z = F.normalize(torch.randn(8, 5), dim=1)
    expected = [nearest(row, source.queue.tolist()) for row in z.tolist()]

    neighbours = source.positive(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = source.positive(z)

    assert neighbours.shape == (8, 5) and neighbours.dtype == torch.float32 and not neighbours.requires_grad
    assert neighbours.tolist() == expected
    assert torch.equal(low, neighbours)  # the search runs in float32
    assert torch.equal(source.positive(z * 3.0), neighbours)  # a cosine search: the scale of z does not count
    source.queue.zero_()
    assert neighbours.tolist() == expected  # a copy: the enqueue after the loss cannot change it


def test_negatives_are_the_batch_keys_with_gradient_and_each_row_excludes_its_own() -> None:
    k = F.normalize(torch.randn(4, DIM), dim=1).requires_grad_()
    keys, exclude = support_set(batch=4).negatives(k.detach(), k)
    assert keys.requires_grad and torch.equal(keys, k)
    assert torch.equal(exclude, torch.eye(4, dtype=torch.bool))


def test_the_support_set_is_a_fifo_queue_of_the_latest_embeddings() -> None:
    source = support_set(size=6, dim=2, batch=2)
    batches = [torch.full((2, 2), float(t)) + torch.tensor([[0.0], [0.5]]) for t in range(4)]
    for batch in batches:
        source.update(batch)
    # 4 batches of 2 into 6 places: the oldest (batch 0) is gone, batch 3 took its place
    assert source.queue.tolist() == [*batches[3].tolist(), *batches[1].tolist(), *batches[2].tolist()]
    assert int(source.ptr) == 2
    assert {"queue", "ptr"} <= set(source.state_dict())


def test_the_support_set_size_must_be_a_multiple_of_the_global_batch() -> None:
    with pytest.raises(ValueError, match=r"queue size 20 is not a multiple of the global batch size 8 "
                                         r"\(train\.batch_size\): use 16 or 24"):
        support_set(size=20)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_loss_is_eq_2_symmetrised_also_under_bf16_autocast(transposed: bool, autocast: bool) -> None:
    torch.manual_seed(0)
    model = build_nnclr(transposed_terms=transposed).train()
    support = model.support_set.queue.clone()  # random unit vectors
    z: list[torch.Tensor] = []
    p: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: z.append(out.detach().float()))
    model.predictor.register_forward_hook(lambda module, args, out: p.append(out.detach().float()))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(views())
    out["loss"].backward()

    assert out["loss"].dtype == torch.float32
    expected = formula_loss(z[0], z[1], p[0], p[1], support, TAU, transposed)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert all(param.grad is not None for param in model.parameters())
    # after the loss, view 1's embeddings took the oldest places
    assert torch.allclose(model.support_set.queue[:GLOBAL_BATCH], F.normalize(z[0], dim=1))
    assert torch.equal(model.support_set.queue[GLOBAL_BATCH:], support[GLOBAL_BATCH:])
    neighbours = torch.tensor([nearest(row, support.tolist()) for row in z[0].tolist() + z[1].tolist()])
    cosines = (F.normalize(torch.cat(z), dim=1) * neighbours).sum(dim=1)
    assert out["nn_similarity"].item() == pytest.approx(cosines.mean().item(), rel=1e-5)


def test_no_gradient_goes_through_the_nearest_neighbours() -> None:
    """The gradient of z is the one of a loss whose NN(z, Q) are constants: z reaches L only through p = g(z).
    The reference is eq. 2 as cross-entropies over the n x n logits NN(z_a) p_b^T / tau, row-wise, and
    column-wise for the transposed terms."""
    torch.manual_seed(0)
    model = build_nnclr().train()
    support = model.support_set.queue.clone()
    z: list[torch.Tensor] = []
    p: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: z.append(out))
    model.predictor.register_forward_hook(lambda module, args, out: p.append(out))

    out = model(views())

    neighbours = [support[(F.normalize(z_a.detach(), dim=1) @ support.T).argmax(dim=1)] for z_a in z]  # constants
    predictions = [F.normalize(p_b, dim=1) for p_b in p]
    labels = torch.arange(GLOBAL_BATCH)
    logits = [neighbours[0] @ predictions[1].T / TAU, neighbours[1] @ predictions[0].T / TAU]  # n x n each
    reference = torch.stack([F.cross_entropy(m, labels) for m in logits] +
                            [F.cross_entropy(m.T, labels) for m in logits]).mean()
    torch.testing.assert_close(out["loss"], reference)
    got = torch.autograd.grad(out["loss"], z, retain_graph=True)
    expected = torch.autograd.grad(reference, z)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
        assert g.abs().sum() > 0


def _worker(rank: int, world_size: int, images: torch.Tensor) -> dict:
    n = GLOBAL_BATCH // world_size
    mine = slice(rank * n, (rank + 1) * n)
    torch.manual_seed(0)  # the same weights and initial support set on every worker, as the engine seeds them
    # eval mode: BatchNorm uses its running statistics, so no statistic couples the samples of a batch
    # (per-worker batch statistics are the SyncBatchNorm question, not the loss's)
    model = DistributedDataParallel(build_nnclr().eval())
    out = model([v[mine] for v in images])
    out["loss"].backward()
    source = model.module.support_set
    result = {"loss": out["loss"].detach(), "nn_similarity": out["nn_similarity"],
              "grads": [p.grad.clone() for p in model.module.parameters()],
              "queue": source.queue.clone(), "ptr": source.ptr.clone()}
    # the FIFO update alone: each worker enqueues its own keys, every worker ends with the same queue
    fifo = support_set(size=12, dim=2, batch=4)
    states = []
    for t in range(4):
        fifo.update(torch.tensor([[t, rank], [t, rank + 0.5]], dtype=torch.float32))
        states.append(fifo.queue.clone())
    result["fifo"] = states
    return result


@pytest.fixture(scope="module")
def two_workers() -> tuple[dict, list[dict]]:
    """One process on the global batch, and two gloo workers on one half each."""
    images = views()
    torch.manual_seed(0)
    model = build_nnclr().eval()
    out = model(images)
    out["loss"].backward()
    single = {"loss": out["loss"].detach(), "nn_similarity": out["nn_similarity"],
              "grads": [p.grad for p in model.parameters()], "queue": model.support_set.queue,
              "ptr": model.support_set.ptr}
    return single, run_distributed(_worker, torch.stack(images), world_size=2)


def test_two_workers_compute_the_loss_and_gradients_of_one_process(two_workers: tuple[dict, list[dict]]) -> None:
    single, results = two_workers
    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, single["loss"])
    torch.testing.assert_close(sum(r["nn_similarity"] for r in results) / 2, single["nn_similarity"])
    for result in results:  # DDP averages the workers' gradients: those of one process on the whole batch
        for got, expected in zip(result["grads"], single["grads"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_two_workers_keep_the_same_support_set_as_one_process(two_workers: tuple[dict, list[dict]]) -> None:
    single, results = two_workers
    for result in results:  # view 1 of the global batch, in rank order, in the place of the oldest entries
        torch.testing.assert_close(result["queue"], single["queue"])
        assert int(result["ptr"]) == int(single["ptr"]) == GLOBAL_BATCH
    keys = [torch.tensor([[t, 0], [t, 0.5], [t, 1], [t, 1.5]]) for t in range(4)]  # batch t: rank 0, then 1
    expected = [torch.cat([keys[0], keys[1], keys[2]])[:4 * (t + 1)] for t in range(3)] + \
        [torch.cat([keys[3], keys[1], keys[2]])]  # the fourth global batch replaces the first
    for result in results:
        for got, want in zip(result["fifo"], expected, strict=True):
            torch.testing.assert_close(got[:len(want)], want)


DATA = {"name": "image_folder", "root": "/nowhere"}  # not read by resolve


def test_method_nnclr_alone_resolves_to_the_papers_imagenet_recipe(registry: Registry) -> None:
    """arXiv 2104.14548 Sec. 3.2, as clane9/vissl configs/config/pretrain/nnclr/nnclr_8node_resnet.yaml @
    fc6cd41ccf1d2a43951ce23c056a0e772ba8abb7 writes it: ResNet-50, BYOL's augmentation, projection MLP
    [2048, 2048, 256] with BN, prediction MLP [4096, 256], queue_size 98304, temperature 0.1; LARS eta 0.001,
    momentum 0.9, weight_decay 1e-6, exclude_bias_and_norm, base lr 0.3 per 256 (4.8 at 4096), 10 warmup
    epochs (lengths [0.01, 0.99] of 1000) then cosine to 0, num_epochs 1000, 64 x 64 = 4096 images a step."""
    registry.add_module("sslcore_nnclr.plugin")
    experiment = resolve({"method": "nnclr", "data": DATA}, registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-6,
                                  "trust_coefficient": 1e-3, "clip_lr": False}
    assert (train["lr_scaling"], train["warmup_epochs"], train["schedule"], train["final_lr"]) == \
        ("linear", 10, "cosine", 0.0)
    assert (train["epochs"], train["batch_size"], train["grad_clip"], train["weight_decay_end"]) == \
        (1000, 4096, None, None)
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": True,
                                                       "fixed_lr": False}}
    assert experiment["encoder"]["name"] == "resnet50" and experiment["augmentation"]["name"] == "byol"
    assert experiment["negatives"] == {"name": "support_set", "size": 98304}
    assert experiment["loss"] == {"name": "info_nce", "temperature": 0.1}
    assert experiment["method"] == {"name": "nnclr", "projector_hidden_dim": 2048, "dim": 256,
                                    "predictor_hidden_dim": 4096, "transposed_terms": True}


def test_the_engine_exempts_biases_and_norms_and_scales_the_lr(registry: Registry) -> None:
    registry.add_module("sslcore_nnclr.plugin")
    batch = 512
    data = {"method": {"name": "nnclr", "projector_hidden_dim": 16, "dim": 8, "predictor_hidden_dim": 16},
            "encoder": {"name": "resnet18", "cifar_stem": True}, "negatives": {"name": "support_set", "size": 1024},
            "data": DATA, "train": {"batch_size": batch}}
    method, optimization = build_for_training(resolve(data, registry).as_dict(), registry, epochs=20)
    groups = {group["group"]: group for group in optimization.optimizer.param_groups}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert {id(p) for p in groups["bias_and_norm"]["params"]} == {id(p) for p in trainable if p.ndim <= 1}
    assert (groups["rest"]["weight_decay"], groups["rest"]["lars_exclude"]) == (1e-6, False)
    assert (groups["bias_and_norm"]["weight_decay"], groups["bias_and_norm"]["lars_exclude"]) == (0.0, True)
    # the paper's 0.3 x B/256, reached at the end of the 10 warmup epochs
    assert optimization.scheduler.base_lrs == [pytest.approx(0.3 * batch / 256)] * 2
    assert method.support_set.queue.shape == (1024, 8)


def test_nnclr_meets_the_method_and_negative_source_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_nnclr.plugin", [("method", "nnclr"), ("negative_source", "support_set")])


def test_the_installed_entry_point_registers_nnclr() -> None:
    check_entry_point("sslcore-nnclr", [("method", "nnclr"), ("negative_source", "support_set")])
    registry = Registry(autoload=True)
    method, source = registry.get("method", "nnclr"), registry.get("negative_source", "support_set")
    assert method.factory is NNCLR and source.factory is SupportSet
    assert method.slots == SLOTS == {
        "encoder": Slot(Encoder, {"name": "resnet50"}), "augmentation": Slot(Augmentation, {"name": "byol"}),
        "negatives": Slot(NegativeSource, {"name": "support_set", "size": 98304}),
        "loss": Slot(ContrastiveLoss, {"name": "info_nce", "temperature": 0.1})}
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path, "train.log_every_steps=1")
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["subset"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) and -1.0 <= m["nn_similarity"] <= 1.0 for m in steps)


def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path: Path, cifar10_dir: Path) -> None:
    """The support set (queue and pointer) is in the checkpoint: 6 steps of 16 images wrap a support set of 32."""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, "train.batch_size=16", "negatives.size=32",
                           "encoder.cifar_stem=false", "method.projector_hidden_dim=64",
                           "method.predictor_hidden_dim=64", "method.dim=16")


def test_heads_are_those_of_the_paper() -> None:
    """Sec. 3.2: projection MLP [2048, 2048, d], every Linear followed by BN, ReLU after all but the last;
    prediction MLP [4096, d], BN and ReLU after the hidden layer only."""
    model = build_nnclr(projector_hidden_dim=24, dim=12, predictor_hidden_dim=20)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [m.weight.shape for m in model.projector if isinstance(m, nn.Linear)] == [(24, 8), (24, 24), (12, 24)]
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))  # each before a BN
    assert [type(m).__name__ for m in model.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.weight.shape for m in model.predictor if isinstance(m, nn.Linear)] == [(20, 12), (12, 20)]
    assert model.predictor[-1].bias is not None
