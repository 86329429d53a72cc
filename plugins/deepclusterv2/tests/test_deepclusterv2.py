"""DeepCluster v2: the loss and the k-means against the official code written out here, the E-step on real
CIFAR-10 images, the memory and the frozen prototypes, two real gloo workers against one process, the
official recipe that ``method: deepclusterv2`` resolves to, the plugin contract, and the CIFAR-10 example
through the CLI (also resumed inside and at the end of an epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslcore_deepclusterv2 import (
    UNASSIGNED,
    ClusterPredictionLoss,
    DeepClusterV2,
    DeepClusterV2Config,
    DeepClusterV2Loss,
    DeepClusterV2LossConfig,
    spherical_kmeans,
)
from sslcore_deepclusterv2.plugin import RECIPE, SLOTS
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.errors import ConfigError, TrainingError
from sslcore.api.recipe import TrainingStep
from sslcore.config import resolve
from sslcore.engine.context import EvalContext, MethodContext
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry
from sslcore.testing import (
    built_slots,
    check_entry_point,
    check_plugin,
    resume_repeats_the_run,
    run_distributed,
    tiny_encoder,
)

EXAMPLE = Path(__file__).parents[3] / "examples" / "deepclusterv2_cifar10.yaml"
BATCH, DATASET = 8, 16


def formula_loss(scores: list[torch.Tensor], targets: torch.Tensor, tau: float) -> float:
    """1/H sum_h of the mean over the assigned rows m of -log(exp(s_{m,y} / tau) / sum_k exp(s_{m,k} / tau))."""
    total = 0.0
    for head_scores, head_targets in zip(scores, targets):
        terms = []
        for row, target in zip(head_scores.tolist(), head_targets.tolist()):
            if target == UNASSIGNED:
                continue
            terms.append(-math.log(math.exp(row[target] / tau) / sum(math.exp(s / tau) for s in row)))
        total += sum(terms) / len(terms) if terms else 0.0
    return total / len(scores)


def official_cluster_memory(x: torch.Tensor, k: int, iterations: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_memory`` of facebookresearch/swav main_deepclusterv2.py for one head, one process, as written
    there: centroids from random memory entries, per-cluster sums of the members, empty clusters kept."""
    centroids = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]]
    for n_iter in range(iterations + 1):
        _, assignments = torch.mm(x, centroids.t()).max(dim=1)
        if n_iter == iterations:
            break
        counts = torch.zeros(k, dtype=torch.int)
        emb_sums = torch.zeros(k, x.shape[1])
        for cluster in range(k):
            members = torch.nonzero(assignments == cluster).flatten()
            if len(members) > 0:
                emb_sums[cluster] = x[members].sum(dim=0)
                counts[cluster] = len(members)
        mask = counts > 0
        centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)
        centroids = F.normalize(centroids, dim=1, p=2)
    return centroids, assignments


def build(dataset_size: int = DATASET, eval_context: EvalContext | None = None, **method) -> DeepClusterV2:
    config = DeepClusterV2Config(**{"dim": 8, "hidden_dim": 0, "num_prototypes": [4, 4, 4], **method})
    return DeepClusterV2(config, context=method_context(dataset_size, eval_context),
                         slots=built_slots(encoder=tiny_encoder(16), loss=DeepClusterV2Loss(DeepClusterV2LossConfig())))


def method_context(dataset_size: int = DATASET, eval_context: EvalContext | None = None) -> MethodContext:
    return MethodContext(world_size=1, rank=0, global_batch_size=BATCH, steps_per_epoch=2, epochs=2,
                         device=torch.device("cpu"), dataset_size=dataset_size, eval_context=eval_context)


def views(n: int = BATCH, seed: int = 0) -> list[torch.Tensor]:
    """2 global crops of 8 px and 2 local ones of 4 px."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=generator) for size in (8, 8, 4, 4)]


def step(index: int) -> TrainingStep:
    return TrainingStep(index=index, epoch=0, steps_per_epoch=2, total_steps=4)


def test_loss_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [F.normalize(torch.randn(12, k, generator=generator), dim=1) for k in (5, 7)]
    targets = torch.stack([torch.randint(0, 5, (12,), generator=generator),
                           torch.randint(0, 7, (12,), generator=generator)])
    targets[0, 3] = targets[1, 0] = UNASSIGNED  # left out, as the official ignore_index
    loss_fn = DeepClusterV2Loss(DeepClusterV2LossConfig(temperature=0.1))
    assert isinstance(loss_fn, ClusterPredictionLoss) and loss_fn.metrics() == {}
    assert loss_fn(scores, targets).item() == pytest.approx(formula_loss(scores, targets, 0.1), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn([s.bfloat16() for s in scores], targets)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_loss([s.bfloat16().float() for s in scores], targets, 0.1), rel=1e-5)
    # before the first E-step no image has a cluster: a loss of 0, finite, with a graph
    nothing = torch.full_like(targets, UNASSIGNED)
    scores[0].requires_grad_()
    empty = loss_fn(scores, nothing)
    empty.backward()
    assert empty.item() == 0.0 and scores[0].grad is not None


def test_spherical_kmeans_is_the_official_cluster_memory() -> None:
    generator = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(300, 6, generator=generator) + torch.randn(1, 6, generator=generator), dim=1)
    centroids, assignments = spherical_kmeans(x, 20, 10, generator=torch.Generator().manual_seed(7))
    expected_centroids, expected_assignments = official_cluster_memory(x, 20, 10, seed=7)
    torch.testing.assert_close(centroids, expected_centroids)
    assert torch.equal(assignments, expected_assignments)
    with pytest.raises(ValueError, match="num_prototypes must not exceed"):
        spherical_kmeans(x[:5], 6, 10)


def test_the_e_step_clusters_real_images(registry: Registry, cifar10_subset: dict[str, Path]) -> None:
    """60 real CIFAR-10 images, 2 heads of 10: the memories are filled from the images under the eval
    transform, every image is assigned, and the prototypes are the (normalised) k-means centroids."""
    augmentation = registry.build("augmentation", {"name": "swav", "size": 32})
    data = {"name": "image_folder", "root": str(cifar10_subset["train"]), "max_per_class": 6}
    eval_context = EvalContext(registry=registry, eval_transform=augmentation.eval, train_data=data,
                               device=torch.device("cpu"), batch_size=64, num_workers=0)
    torch.manual_seed(0)
    model = build(60, eval_context, num_prototypes=[10, 10])
    metrics = model.on_epoch_start(0, method_context(60, eval_context))

    images = torch.stack([image for image, _ in eval_context.dataset()])
    with torch.no_grad():
        expected = F.normalize(model.projector(model.backbone(images)), dim=1)
    assert bool(model.memory_filled)
    for memory in model.memory:
        torch.testing.assert_close(memory, expected)
    assert model.assignments.shape == (2, 60) and (model.assignments >= 0).all() and (model.assignments < 10).all()
    for h, head in enumerate(model.prototypes.heads):
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))
        assert torch.equal(model.assignments[h], (model.memory[h % 2] @ head.weight.T).argmax(dim=1))
    assert metrics["e_step_seconds"] >= 0 and 0 <= metrics["nmi_0"] <= 1
    assert int(metrics["cluster_sizes_1"].sum()) == 60 and metrics["empty_clusters_0"] >= 0

    # the next epoch clusters the memory as training left it; it is never filled again
    model.memory[1] = F.normalize(torch.randn(60, 8), dim=1)
    changed = model.memory.clone()
    torch.manual_seed(1)
    model.on_epoch_start(1, method_context(60, eval_context))
    assert torch.equal(model.memory, changed)
    assert torch.equal(model.assignments[1], (changed[1] @ model.prototypes.heads[1].weight.T).argmax(dim=1))
    # more prototypes than images: a one-line error that says what to set
    with pytest.raises(TrainingError, match=r"method\.num_prototypes to at most 60"):
        build(60, eval_context, num_prototypes=[10, 61]).on_epoch_start(0, method_context(60, eval_context))


def test_forward_writes_the_memory_and_the_prototypes_stay_frozen() -> None:
    torch.manual_seed(0)
    model = build(crops_for_assign=[1, 0], freeze_prototypes_steps=1)
    model.assignments.copy_(torch.randint(0, 4, (3, DATASET)))
    index = torch.tensor([3, 9, 0, 14, 7, 1, 12, 5])
    batch = views()
    out = model(batch, index)

    z = model.embed(batch).detach()  # (4 x 8) x 8, crop after crop
    torch.testing.assert_close(model.memory[0, index], z[BATCH:2 * BATCH])  # M_0: crop 1
    torch.testing.assert_close(model.memory[1, index], z[:BATCH])  # M_1: crop 0
    assert (model.memory[:, [2, 4]] == 0).all()  # images not in the batch are untouched
    scores = [(z @ head.weight.T).detach() for head in model.prototypes.heads]
    targets = model.assignments[:, index].repeat(1, 4)
    assert out["loss"].item() == pytest.approx(formula_loss(scores, targets, 0.1), rel=1e-5)

    out["loss"].backward()
    model.before_optimizer_step(step(0))  # within freeze_prototypes_steps: no step, no weight decay
    assert all(p.grad is None for p in model.prototypes.parameters())
    assert all(p.grad is not None for p in [*model.backbone.parameters(), *model.projector.parameters()])
    model(batch, index)["loss"].backward()
    model.before_optimizer_step(step(1))
    assert all(p.grad is not None for p in model.prototypes.parameters())


def _reference_state(model: DeepClusterV2) -> None:
    """The same memory and assignments on every worker, as a checkpoint would restore them."""
    generator = torch.Generator().manual_seed(3)
    model.memory.copy_(F.normalize(torch.randn(2, DATASET, 8, generator=generator), dim=2))
    model.memory_filled.fill_(True)
    model.assignments.copy_(torch.randint(0, 4, (3, DATASET), generator=generator))


INDEX = torch.tensor([3, 9, 0, 14, 7, 1, 12, 5])


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every worker, as the engine seeds them
    model = build()
    _reference_state(model)
    ddp = DistributedDataParallel(model)
    loss = ddp([v.chunk(world_size)[rank] for v in views()], INDEX.chunk(world_size)[rank])["loss"]
    loss.backward()
    torch.manual_seed(5)  # rank 0 draws the initial centroids; the others get the result
    model.on_epoch_start(1, method_context())
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()],
            "memory": model.memory.clone(), "assignments": model.assignments.clone(),
            "prototypes": [h.weight.detach().clone() for h in model.prototypes.heads]}


def test_two_workers_compute_the_loss_gradients_memory_and_clusters_of_one_process() -> None:
    torch.manual_seed(0)
    model = build()
    _reference_state(model)
    loss = model(views(), INDEX)["loss"]
    loss.backward()
    torch.manual_seed(5)
    model.on_epoch_start(1, method_context())

    results = run_distributed(_worker, world_size=2)

    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, loss.detach())
    for result in results:
        for got, expected in zip(result["grads"], [p.grad for p in model.parameters()], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["memory"], model.memory)  # the global batch, written on every worker
    first, second = results
    assert torch.equal(first["memory"], second["memory"]) and torch.equal(first["assignments"], second["assignments"])
    assert all(torch.equal(a, b) for a, b in zip(first["prototypes"], second["prototypes"]))
    assert torch.equal(first["assignments"], model.assignments)
    for got, expected in zip(first["prototypes"], model.prototypes.heads):
        torch.testing.assert_close(got, expected.weight)


def test_method_deepclusterv2_alone_is_the_official_recipe(registry: Registry, tmp_path: Path) -> None:
    """facebookresearch/swav @ 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, scripts/deepclusterv2_800ep_pretrain.sh:
    --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
    --crops_for_assign 0 1 --temperature 0.1 --feat_dim 128 --nmb_prototypes 3000 3000 3000 --epochs 800
    --batch_size 64 (x 64 GPUs) --base_lr 4.8 --final_lr 0.0048 --freeze_prototypes_niters 300000 --wd 0.000001
    --warmup_epochs 10 --start_warmup 0.3 --arch resnet50; main_deepclusterv2.py: SGD(momentum 0.9) in
    LARC(trust_coefficient 0.001, clip False) over model.parameters(), hidden_mlp 2048, nmb_kmeans_iters 10;
    src/multicropdataset.py: mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225). The lr is set as given."""
    registry.add_module("sslcore_deepclusterv2.plugin")
    experiment = resolve({"method": "deepclusterv2", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 4.8, "momentum": 0.9, "weight_decay": 1e-6,
                                  "trust_coefficient": 0.001, "clip_lr": False}
    assert (train["lr_scaling"], train["batch_size"], train["epochs"]) == ("none", 64 * 64, 800)
    assert (train["warmup_epochs"], train["warmup_start"]) == (10, pytest.approx(0.3 / 4.8))
    assert (train["schedule"], train["final_lr"]) == ("cosine", pytest.approx(0.0048 / 4.8))
    assert train["param_groups"] == {} and train["grad_clip"] is None and train["weight_decay_end"] is None
    assert experiment["method"] == {"name": "deepclusterv2", "dim": 128, "hidden_dim": 2048,
                                    "num_prototypes": [3000, 3000, 3000], "crops_for_assign": [0, 1],
                                    "kmeans_iterations": 10, "freeze_prototypes_steps": 300000}
    assert experiment["loss"] == {"name": "deepcluster_v2", "temperature": 0.1}
    assert experiment["encoder"]["name"] == "resnet50"
    augmentation = experiment["augmentation"]
    assert augmentation["name"] == "swav" and list(augmentation["mean"]) == [0.485, 0.456, 0.406]
    assert list(augmentation["std"]) == [0.228, 0.224, 0.225]
    assert (augmentation["global_crops"], augmentation["size"], tuple(augmentation["scale"])) == (2, 224, (0.14, 1.0))
    assert (augmentation["local_crops"], augmentation["local_size"], tuple(augmentation["local_scale"])) == \
        (6, 96, (0.05, 0.14))


def test_the_loss_slot_refuses_a_loss_of_another_call(registry: Registry, tmp_path: Path) -> None:
    registry.add_module("sslcore_deepclusterv2.plugin")
    with pytest.raises(ConfigError) as error:
        resolve({"method": "deepclusterv2", "loss": {"name": "info_nce"},
                 "data": {"name": "image_folder", "root": str(tmp_path)}}, registry)
    (line,) = error.value.args
    assert "\n" not in line and "loss.name" in line and line.endswith("losses that fit: deepcluster_v2"), line


def test_deepclusterv2_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_deepclusterv2.plugin", [("method", "deepclusterv2"), ("loss", "deepcluster_v2")])


def test_the_installed_entry_point_registers_deepclusterv2() -> None:
    check_entry_point("sslcore-deepclusterv2", [("method", "deepclusterv2"), ("loss", "deepcluster_v2")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "deepclusterv2"), registry.get("loss", "deepcluster_v2")
    assert method.factory is DeepClusterV2 and loss.factory is DeepClusterV2Loss
    assert method.slots == SLOTS and method.recipe == RECIPE


def test_cifar10_example_runs_and_resumes_bit_for_bit(tmp_path: Path, cifar10_dir: Path) -> None:
    """The example, tiny (100 images, batches of 16, 3 heads of 10 prototypes, the standard stem), run briefly
    and resumed inside epoch 1 and at its end: memory, assignments and prototypes survive the checkpoints."""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, "method.num_prototypes=[10, 10, 10]",
                           "train.batch_size=16", "encoder.cifar_stem=false")
    run = tmp_path / "straight" / "runs" / "deepclusterv2_cifar10"
    state = torch.load(RunDir(run).checkpoints()[-1], weights_only=True)["model"]
    assert state["memory_filled"] and state["memory"].shape == (2, 100, 128)
    torch.testing.assert_close(state["memory"].norm(dim=2), torch.ones(2, 100))
    assert state["assignments"].shape == (3, 100) and (state["assignments"] >= 0).all()
    for h in range(3):
        prototypes = state[f"prototypes.heads.{h}.weight"]
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(10))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    e_steps = [r for r in records if r["subset"] == "epoch_start"]
    assert [r["epoch"] for r in e_steps] == [0, 1] and all(0 <= r["nmi_2"] <= 1 for r in e_steps)
