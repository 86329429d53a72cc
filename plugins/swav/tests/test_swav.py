"""SwAV: the swapped prediction against its formula written out here, the Sinkhorn codes against a plain-loop
Sinkhorn and the equipartition, the prototypes (normalised before each forward, frozen for the first
steps), the queue (FIFO per worker block, from its epoch, in Sinkhorn once full), two real gloo workers
against one process with and without the queue, the official recipe through the engine, the plugin
contract, the CIFAR-10 example through the CLI and its bit-exact resume with the queue in use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslcore_swav import SwappedPredictionLoss, SwAV, SwAVConfig, SwAVLoss, SwAVLossConfig
from sslcore_swav.plugin import RECIPE, SLOTS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.errors import TrainingError
from sslcore.api.hookspecs import Augmentation, Encoder, Slot
from sslcore.api.recipe import TrainingStep
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

EXAMPLE = Path(__file__).parents[3] / "examples" / "swav_cifar10.yaml"
GLOBAL_BATCH = 8
DATA = {"name": "image_folder", "root": "/nonexistent"}  # not read: resolving does not open the data


def build_swav(world_size: int = 1, rank: int = 0, batch: int = GLOBAL_BATCH, **method) -> SwAV:
    config = SwAVConfig(**{"projector_hidden_dim": 16, "dim": 6, "num_prototypes": 5, **method})
    context = MethodContext(world_size=world_size, rank=rank, global_batch_size=batch, steps_per_epoch=10,
                            epochs=2, device=torch.device("cpu"), dataset_size=batch * 10)
    loss = SwAVLoss(SwAVLossConfig())
    return SwAV(config, context=context, slots=built_slots(encoder=tiny_encoder(), loss=loss))


def crops(n: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    """2 global crops of 8 px and 2 local crops of 6 px of the same n images."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, side, side, generator=generator) for side in (8, 8, 6, 6)]


def step_at(index: int, epoch: int) -> TrainingStep:
    return TrainingStep(index=index, epoch=epoch, steps_per_epoch=10, total_steps=20)


def capture_scores(model: SwAV) -> list[torch.Tensor]:
    """The prototype layer's input z and output scores of each forward, as [z, scores, z, scores, ...]."""
    seen: list[torch.Tensor] = []
    model.prototypes.register_forward_hook(lambda module, args, out: seen.extend([args[0], out[0]]))
    return seen


# -- formulas written out -----------------------------------------------------------------------------


def formula_loss(scores: list[list[list[float]]], codes: list[list[list[float]]], assigned: list[int],
                 tau: float) -> float:
    """1/|S| sum_s 1/(V-1) sum_{t != s} 1/N sum_n -sum_k q_ns,k log(exp(x_nt,k / tau) / sum_j exp(x_nt,j / tau))."""
    views, total = len(scores), 0.0
    for q, s in zip(codes, assigned):
        swapped = 0.0
        for t in range(views):
            if t == s:
                continue
            per_image = 0.0
            for q_n, x_n in zip(q, scores[t]):
                log_norm = math.log(sum(math.exp(x / tau) for x in x_n))
                per_image += -sum(q_k * (x_k / tau - log_norm) for q_k, x_k in zip(q_n, x_n))
            swapped += per_image / len(q)
        total += swapped / (views - 1)
    return total / len(assigned)


def plain_sinkhorn(scores: list[list[float]], epsilon: float, iterations: int) -> list[list[float]]:
    """main_swav.py's distributed_sinkhorn on one process, element by element: Q = exp(S / epsilon)^T (K x B),
    Q /= sum(Q); then, ``iterations`` times, each row k divided by K times its sum and each column b by B times
    its sum; the codes are B Q^T."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[j][i] / epsilon) for j in range(b)] for i in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for i in range(k):
            row_sum = sum(q[i])
            q[i] = [v / row_sum / k for v in q[i]]
        for j in range(b):
            column_sum = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / column_sum / b
    return [[q[i][j] * b for i in range(k)] for j in range(b)]


def test_the_swapped_prediction_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=generator) for _ in range(4)]  # V = 4 crops, N = 5, K = 7
    codes = [torch.softmax(torch.randn(5, 7, generator=generator), dim=1) for _ in range(2)]
    loss_fn = SwAVLoss(SwAVLossConfig(temperature=0.3, crops_for_assign=[0, 1]))
    assert isinstance(loss_fn, SwappedPredictionLoss) and loss_fn.metrics() == {}
    expected = formula_loss([s.tolist() for s in scores], [q.tolist() for q in codes], [0, 1], 0.3)
    assert loss_fn(scores, codes).item() == pytest.approx(expected, rel=1e-5)
    # another choice of assigned crops: crop 2 alone, predicted by crops 0, 1 and 3
    single = SwAVLoss(SwAVLossConfig(temperature=0.3, crops_for_assign=[2]))
    assert single(scores, codes[:1]).item() == pytest.approx(
        formula_loss([s.tolist() for s in scores], [codes[0].tolist()], [2], 0.3), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn([s.bfloat16() for s in scores], [q.bfloat16() for q in codes])
    assert low.dtype == torch.float32
    rounded = formula_loss([s.bfloat16().float().tolist() for s in scores],
                           [q.bfloat16().float().tolist() for q in codes], [0, 1], 0.3)
    assert low.item() == pytest.approx(rounded, rel=1e-5)


def test_sinkhorn_codes_match_a_plain_loop_and_meet_the_equipartition() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 6, generator=generator), dim=1) * 0.9  # B = 12 cosines, K = 6
    loss_fn = SwAVLoss(SwAVLossConfig(epsilon=0.05, sinkhorn_iterations=3))
    codes = loss_fn.codes(scores)
    assert codes.dtype == torch.float32 and not codes.requires_grad
    torch.testing.assert_close(codes, torch.tensor(plain_sinkhorn(scores.tolist(), 0.05, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))  # each code is a distribution
    # the equipartition the iterations approach: every prototype takes B / K of the samples
    converged = SwAVLoss(SwAVLossConfig(epsilon=0.05, sinkhorn_iterations=200)).codes(scores)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 12 / 6), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(12))
    # under bf16 scores too (the shift by the maximum keeps exp(s / epsilon) finite)
    low = loss_fn.codes(scores.bfloat16())
    torch.testing.assert_close(low, torch.tensor(plain_sinkhorn(scores.bfloat16().float().tolist(), 0.05, 3)),
                               rtol=1e-4, atol=1e-6)


# -- the method -----------------------------------------------------------------------------------------


def test_the_head_and_prototypes_of_the_official_code() -> None:
    """src/resnet50.py: projection_head Linear(f, hidden_mlp)-BN-ReLU-Linear(hidden_mlp, feat_dim) (a single
    Linear for hidden_mlp 0); prototypes a bias-free Linear(feat_dim, nmb_prototypes)."""
    model = build_swav(projector_hidden_dim=24, dim=12, num_prototypes=30)
    layers = [(type(m).__name__, getattr(m, "bias", None) is not None) for m in model.projector]
    assert layers == [("Linear", True), ("BatchNorm1d", True), ("ReLU", False), ("Linear", True)]
    assert [m.weight.shape for m in model.projector if isinstance(m, nn.Linear)] == [(24, 8), (12, 24)]
    assert len(model.prototypes.heads) == 1
    assert model.prototypes.heads[0].weight.shape == (30, 12) and model.prototypes.heads[0].bias is None
    linear = build_swav(projector_hidden_dim=0, dim=12)
    assert [type(m).__name__ for m in linear.projector] == ["Linear"]


def test_prototypes_are_normalised_before_each_forward_and_the_loss_is_the_formula() -> None:
    torch.manual_seed(0)
    model = build_swav().train()
    with torch.no_grad():
        model.prototypes.heads[0].weight.mul_(3.0)  # off the sphere, as an optimizer step leaves them
    seen = capture_scores(model)
    model.on_step_start(step_at(0, 0))
    out = model(crops())
    weight = model.prototypes.heads[0].weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(5))
    z, scores = seen
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4 * GLOBAL_BATCH))  # z on the unit sphere
    torch.testing.assert_close(scores, z @ weight.T)  # cosines with the normalised prototypes
    assert z.dtype == scores.dtype == torch.float32
    per_crop = scores.detach().split(GLOBAL_BATCH)
    codes = [plain_sinkhorn(per_crop[s].tolist(), 0.05, 3) for s in (0, 1)]
    expected = formula_loss([c.tolist() for c in per_crop], codes, [0, 1], 0.1)
    assert sorted(out) == ["loss"]  # no queue configured, no queue metric
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_prototypes_are_frozen_for_the_first_niters() -> None:
    torch.manual_seed(0)
    model = build_swav(freeze_prototypes_niters=3)
    for index, frozen in ((0, True), (2, True), (3, False), (11, False)):
        model.zero_grad()
        model.on_step_start(step_at(index, index // 10))
        model(crops(seed=index))["loss"].backward()
        model.before_optimizer_step(step_at(index, index // 10))
        assert (model.prototypes.heads[0].weight.grad is None) == frozen, index
        assert all(p.grad is not None for p in [*model.backbone.parameters(), *model.projector.parameters()])


def test_the_queue_is_a_fifo_from_its_epoch_and_joins_sinkhorn_once_full() -> None:
    torch.manual_seed(0)
    n = GLOBAL_BATCH
    model = build_swav(queue_length=2 * n, epoch_queue_starts=1)
    assert model.queue.shape == (2, 1, 2 * n, 6)  # crops for assign x workers x L / W x D
    seen = capture_scores(model)

    model.on_step_start(step_at(9, 0))  # before epoch_queue_starts: not filled, not used
    assert model(crops(seed=0))["queue_used"].item() == 0.0
    assert not model.queue.any()

    batches = []
    for index, seed in ((10, 1), (11, 2), (12, 3)):
        seen.clear()
        model.on_step_start(step_at(index, 1))
        before = model.queue.clone()
        out = model(crops(seed=seed))
        z, scores = seen
        batches.append(z.detach())
        # the newest embeddings of each assigned crop s are first, the oldest n leave
        for i, s in enumerate((0, 1)):
            torch.testing.assert_close(model.queue[i, 0, :n], z.detach()[s * n:(s + 1) * n])
            torch.testing.assert_close(model.queue[i, 0, n:], before[i, 0, :-n])
        # used from the step that finds the queue full: after 2 batches of n fill its 2n rows
        assert out["queue_used"].item() == float(index == 12)
        if index == 12:  # the codes come from Sinkhorn over the queue's scores then the batch's
            weight = model.prototypes.heads[0].weight.detach()
            per_crop = scores.detach().split(n)
            codes = [plain_sinkhorn(torch.cat([before[i, 0] @ weight.T, per_crop[s]]).tolist(), 0.05, 3)[-n:]
                     for i, s in enumerate((0, 1))]
            assert out["loss"].item() == pytest.approx(
                formula_loss([c.tolist() for c in per_crop], codes, [0, 1], 0.1), rel=1e-4)


def test_queue_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="queue_length 20 is not a multiple of the global batch 8: use 16 or 24"):
        build_swav(queue_length=20)
    with pytest.raises(ValueError, match=r"use 8$"):
        build_swav(queue_length=4)
    two_workers = build_swav(world_size=2, rank=0, queue_length=16).state_dict()
    refused = r"queues of 2 workers and this run has 1: resume with scaling\.num_workers: 2"
    with pytest.raises(TrainingError, match=refused):
        build_swav(queue_length=16).load_state_dict(two_workers)
    build_swav(world_size=2, rank=1, queue_length=16).load_state_dict(two_workers)


# -- two workers ----------------------------------------------------------------------------------------

QUEUE = 2 * GLOBAL_BATCH  # L over all workers


def filled_queue() -> torch.Tensor:
    """2 crops x L x D embeddings on the unit sphere: a full queue, as one process holds it."""
    generator = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(2, QUEUE, 6, generator=generator), dim=2)


def one_step(model: nn.Module, views: list[torch.Tensor], method: SwAV) -> dict:
    """``model``: the method itself, or the method wrapped in DDP."""
    method.on_step_start(step_at(20, 1))
    loss = model(views)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in method.parameters()],
            "queue": None if method.queue is None else method.queue.clone()}


def _worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, length in (("plain", 0), ("queue", QUEUE)):
        torch.manual_seed(0)  # the same initial weights on every worker, as the engine seeds them
        # eval mode: BatchNorm uses its running statistics, so no statistic couples the samples of a batch
        method = build_swav(world_size, rank, queue_length=length, epoch_queue_starts=1).eval()
        if length:  # block r holds worker r's half of the one process's queue
            method.queue.copy_(filled_queue().view(2, world_size, QUEUE // world_size, 6))
        mine = [v.chunk(world_size)[rank] for v in crops()]
        results[name] = one_step(DistributedDataParallel(method), mine, method)
    return results


def test_two_workers_compute_the_loss_and_gradients_of_one_process_with_and_without_the_queue() -> None:
    expected = {}
    for name, length in (("plain", 0), ("queue", QUEUE)):
        torch.manual_seed(0)
        method = build_swav(queue_length=length, epoch_queue_starts=1).eval()
        if length:
            method.queue.copy_(filled_queue()[:, None])
        expected[name] = one_step(method, crops(), method)

    results = run_distributed(_worker, world_size=2)

    n = GLOBAL_BATCH // 2
    for name in ("plain", "queue"):
        torch.testing.assert_close(sum(r[name]["loss"] for r in results) / 2, expected[name]["loss"])
        for result in results:
            assert len(result[name]["grads"]) == len(expected[name]["grads"])
            for got, want in zip(result[name]["grads"], expected[name]["grads"]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the queue changes the codes, so the loss: it was in Sinkhorn
    assert not torch.allclose(expected["queue"]["loss"], expected["plain"]["loss"])
    # every worker holds every block; block r is a FIFO of worker r's embeddings (of the one process's rows
    # r n .. (r + 1) n), followed by its own older ones
    queue, single, before = results[0]["queue"]["queue"], expected["queue"]["queue"], filled_queue()
    assert torch.equal(queue, results[1]["queue"]["queue"])
    for r in range(2):
        torch.testing.assert_close(queue[:, r, :n], single[:, 0, r * n:(r + 1) * n])
        torch.testing.assert_close(queue[:, r, n:], before[:, r * QUEUE // 2:(r + 1) * QUEUE // 2 - n])


# -- recipe, contract, entry point, example ------------------------------------------------------------


def test_method_swav_alone_resolves_to_the_official_recipe(registry: Registry) -> None:
    """facebookresearch/swav @ 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, scripts/swav_800ep_pretrain.sh:
    --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
    --crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128
    --nmb_prototypes 3000 --queue_length 0 --epochs 800 --batch_size 64 (x 64 GPUs = 4096) --base_lr 4.8
    --final_lr 0.0048 --freeze_prototypes_niters 313 --wd 0.000001 --warmup_epochs 10 --start_warmup 0.3
    --arch resnet50; main_swav.py: --hidden_mlp 2048, --epoch_queue_starts 15, SGD momentum 0.9 in
    LARC(trust_coefficient=0.001, clip=False) over model.parameters(), the lr not scaled by the batch;
    src/multicropdataset.py: ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, blur p 0.5 (radius
    0.1-2), flip 0.5, mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225)."""
    registry.add_module("sslcore_swav.plugin")
    experiment = resolve({"method": "swav", "data": DATA}, registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 4.8, "momentum": 0.9, "weight_decay": 1e-6,
                                  "trust_coefficient": 1e-3, "clip_lr": False}
    assert (train["lr_scaling"], train["warmup_epochs"], train["schedule"]) == ("none", 10, "cosine")
    assert train["warmup_start"] == pytest.approx(0.3 / 4.8) and train["final_lr"] == pytest.approx(0.0048 / 4.8)
    assert (train["epochs"], train["batch_size"], train["grad_clip"], train["weight_decay_end"]) == \
        (800, 4096, None, None)
    assert train["param_groups"] == {}  # LARC adapts and decays every parameter alike
    assert experiment["encoder"]["name"] == "resnet50"
    assert experiment["method"] == {"name": "swav", "projector_hidden_dim": 2048, "dim": 128, "num_prototypes": 3000,
                                    "queue_length": 0, "epoch_queue_starts": 15, "freeze_prototypes_niters": 313}
    assert experiment["loss"] == {"name": "swav", "temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3,
                                  "crops_for_assign": [0, 1]}
    augmentation = experiment["augmentation"]
    assert augmentation["name"] == "swav"
    assert (augmentation["size"], augmentation["global_crops"], tuple(augmentation["scale"])) == (224, 2, (0.14, 1.0))
    assert (augmentation["local_size"], augmentation["local_crops"], tuple(augmentation["local_scale"])) == \
        (96, 6, (0.05, 0.14))
    assert tuple(augmentation["color_jitter"]) == (0.8, 0.8, 0.8, 0.2)
    assert (augmentation["jitter_prob"], augmentation["grayscale_prob"]) == (0.8, 0.2)
    assert (augmentation["blur_prob"], augmentation["local_blur_prob"]) == ([0.5, 0.5], 0.5)
    assert augmentation["solarize_prob"] == [0.0, 0.0] and augmentation["local_solarize_prob"] == 0.0
    assert tuple(augmentation["mean"]) == (0.485, 0.456, 0.406) and tuple(augmentation["std"]) == (0.228, 0.224, 0.225)


def test_the_engine_runs_the_official_lr_schedule(registry: Registry) -> None:
    """main_swav.py: np.linspace(start_warmup, base_lr, warmup steps), then final_lr + (base_lr - final_lr)
    (1 + cos(pi t / T)) / 2 over the T remaining steps; the same lr for every parameter."""
    registry.add_module("sslcore_swav.plugin")
    steps_per_epoch, epochs = 2, 20  # warmup: 10 epochs = 20 steps of the 40
    data = {"method": {"name": "swav", "projector_hidden_dim": 16, "dim": 8, "num_prototypes": 10},
            "encoder": {"name": "resnet18"}, "data": DATA, "train": {"batch_size": 256}}
    method, optimization = build_for_training(resolve(data, registry).as_dict(), registry,
                                              steps_per_epoch=steps_per_epoch, epochs=epochs)
    assert [group["group"] for group in optimization.optimizer.param_groups] == ["rest"]
    group = optimization.optimizer.param_groups[0]
    assert (group["weight_decay"], group["lars_exclude"], group["trust_coefficient"]) == (1e-6, False, 1e-3)
    assert {id(p) for p in group["params"]} == {id(p) for p in method.parameters()}
    total, warmup = steps_per_epoch * epochs, 10 * steps_per_epoch
    for k in range(total):
        # sslcore's warmup reaches the peak at its last step as np.linspace does, starting one step above 0.3
        expected = 0.3 + (4.8 - 0.3) * (k + 1) / warmup if k < warmup else \
            0.0048 + (4.8 - 0.0048) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert group["lr"] == pytest.approx(expected), k  # 4.8 at batch 256 too: not scaled
        optimization.optimizer.step()
        optimization.scheduler.step()


def test_swav_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_swav.plugin", [("method", "swav"), ("loss", "swav")])


def test_the_installed_entry_point_registers_swav() -> None:
    check_entry_point("sslcore-swav", [("method", "swav"), ("loss", "swav")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "swav"), registry.get("loss", "swav")
    assert method.factory is SwAV and loss.factory is SwAVLoss
    assert method.slots == SLOTS
    assert SLOTS["encoder"] == Slot(Encoder, {"name": "resnet50"}) and SLOTS["augmentation"].needs is Augmentation
    assert SLOTS["loss"].needs is SwappedPredictionLoss and loss.meets(SwappedPredictionLoss)
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path, "train.log_every_steps=1")
    train = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["subset"] == "train"]
    # epoch 1 of 1000: the queue (from epoch 50) is not in use yet
    assert len(train) == 2 and all(math.isfinite(m["loss"]) and m["queue_used"] == 0.0 for m in train)


@pytest.mark.ray
def test_two_ray_workers_resume_multi_crop_with_the_queue_exactly(tmp_path: Path, cifar10_dir: Path) -> None:
    """The queue is filled from the first step and full after 2 (32 = 2 x 16): both resumes, at step 2 and 3,
    continue with a queue in Sinkhorn, restored from the checkpoint; the prototypes thaw at step 3. Through Ray
    Train with 2 gloo workers (DDP), bf16 autocast and channels_last as the example runs them: 2 global crops of
    32 px and 2 local crops of 24 px (one forward per resolution), the queue blocks of both workers in rank 0's
    checkpoint, and both resumes repeat the uninterrupted run. (No run in one process besides: its queue is the
    one block of this layout, and the engine's resume is the same on both backends. Not 16 px: torchvision's
    stem leaves a 1 x 1 map at layer4 there, whose bf16 weight gradient on this CPU differs between identical
    runs and now and then is NaN, with DDP or without; fp32 is exact.)"""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, "scaling.backend=ray", "scaling.num_workers=2",
                           "train.batch_size=16", "encoder.cifar_stem=false", "augmentation.local_crops=2",
                           "augmentation.local_size=24", "method.projector_hidden_dim=64", "method.dim=16",
                           "method.num_prototypes=30", "method.queue_length=32", "method.epoch_queue_starts=0",
                           "method.freeze_prototypes_niters=2")
