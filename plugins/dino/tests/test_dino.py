"""DINO: the loss and the center update against the formulas written out here, the DINO head, multi-crop (the
student sees every crop, the teacher the global ones), the per-epoch teacher temperature, the last layer frozen
in epoch 0, the EMA teacher without drop path, two real gloo workers against one process, the recipe of the
official README through the engine, the ResNet-50 example, the plugin contract, and the CIFAR-10 example
through the CLI, also across resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sslcore_dino import DINO, DINOConfig, DINOHead, DINOLoss, DINOLossConfig, SelfDistillationLoss
from sslcore_dino.plugin import RECIPE, SLOTS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.hookspecs import Augmentation, Encoder, Slot
from sslcore.api.recipe import TrainingStep
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_entry_point,
    check_plugin,
    check_workers_match_one_process,
    resume_repeats_the_run,
    run_example_briefly,
    tiny_encoder,
)
from sslcore.toolkit.distributed import concat_all_gather

EXAMPLES = Path(__file__).parents[3] / "examples"
EXAMPLE = EXAMPLES / "dino_cifar10.yaml"
GLOBAL_BATCH = 8
COMMIT = "7c446df5b9f45747937fb0d72314eb9f7b66930a"  # facebookresearch/dino


def build_dino(encoder: nn.Module | None = None, **method) -> DINO:
    config = DINOConfig(**{"out_dim": 16, "hidden_dim": 12, "bottleneck_dim": 6, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=4, epochs=2,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    loss = DINOLoss(DINOLossConfig(), dim=config.out_dim)
    return DINO(config, context=context, slots=built_slots(encoder=encoder or tiny_encoder(), loss=loss))


def crops(n: int = GLOBAL_BATCH, seed: int = 0, local: int = 3) -> list[torch.Tensor]:
    """2 global crops of 16 px and ``local`` crops of 8 px of the same n images."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=generator) for _ in range(2)] + \
        [torch.randn(n, 3, 8, 8, generator=generator) for _ in range(local)]


def student_parameters(model: DINO) -> list[torch.Tensor]:
    return [*model.backbone.parameters(), *model.head.parameters()]


def teacher_parameters(model: DINO) -> list[torch.Tensor]:
    return [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def formula_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: list[float], tau_s: float,
                 tau_t: float) -> float:
    """sum over the pairs (teacher crop t, student crop s != t) of the batch mean of
    -sum_k softmax((teacher_t - c) / tau_t)_k log softmax(student_s / tau_s)_k, divided by the number of pairs."""
    total, pairs = 0.0, 0
    for t, teacher_crop in enumerate(teacher):
        for s, student_crop in enumerate(student):
            if s == t:
                continue
            batch = 0.0
            for teacher_row, student_row in zip(teacher_crop.tolist(), student_crop.tolist()):
                p = softmax([(x - c) / tau_t for x, c in zip(teacher_row, center)])
                q = softmax([x / tau_s for x in student_row])
                batch += -sum(p_k * math.log(q_k) for p_k, q_k in zip(p, q))
            total += batch / len(teacher_crop)
            pairs += 1
    return total / pairs


def formula_center(center: list[float], teacher: list[torch.Tensor], m: float) -> list[float]:
    """c <- m c + (1 - m) (the mean of every teacher row of every global crop)."""
    rows = [row for crop in teacher for row in crop.tolist()]
    return [m * c + (1 - m) * sum(row[k] for row in rows) / len(rows) for k, c in enumerate(center)]


def formula_momentum(k: int, total: int, base: float) -> float:
    """utils.cosine_scheduler(base, 1, epochs, niter) at iteration k: 1 + (base - 1)(1 + cos(pi k / total)) / 2."""
    return 1 + 0.5 * (base - 1) * (1 + math.cos(math.pi * k / total))


def step_at(model: DINO, index: int, epoch: int, steps_per_epoch: int = 4, epochs: int = 2) -> TrainingStep:
    total = steps_per_epoch * epochs
    return TrainingStep(index=index, epoch=epoch, steps_per_epoch=steps_per_epoch, total_steps=total,
                        values={k: s.at(index, steps_per_epoch, total) for k, s in model.schedules().items()})


def test_loss_and_center_match_the_formulas_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    n, k = 5, 7
    student = [torch.randn(n, k, generator=generator) * 2 for _ in range(5)]  # 2 global + 3 local crops
    teacher = [torch.randn(n, k, generator=generator) for _ in range(2)]
    center = torch.randn(1, k, generator=generator) * 0.3
    loss_fn = DINOLoss(DINOLossConfig(student_temp=0.1, center_momentum=0.9), dim=k)
    assert isinstance(loss_fn, SelfDistillationLoss) and loss_fn.metrics() == {}
    loss_fn.center.copy_(center)

    loss = loss_fn([s.requires_grad_() for s in student], teacher, 0.05)

    assert loss.item() == pytest.approx(formula_loss(student, teacher, center[0].tolist(), 0.1, 0.05), rel=1e-5)
    torch.testing.assert_close(loss_fn.center[0], torch.tensor(formula_center(center[0].tolist(), teacher, 0.9)))
    loss.backward()
    assert all(s.grad is not None for s in student)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn([s.detach().bfloat16() for s in student], [t.bfloat16() for t in teacher], 0.05)
    assert low.dtype == torch.float32
    expected = formula_loss([s.bfloat16().float() for s in student], [t.bfloat16().float() for t in teacher],
                            formula_center(center[0].tolist(), teacher, 0.9), 0.1, 0.05)
    assert low.item() == pytest.approx(expected, rel=1e-5)


def test_the_head_is_the_official_dino_head() -> None:
    """vision_transformer.py DINOHead: Linear-GELU-Linear-GELU-Linear to the bottleneck (trunc_normal 0.02, zero
    biases), L2 normalisation, weight-normalised bias-free last layer with g = 1, fixed with norm_last_layer."""
    torch.manual_seed(0)
    head = DINOHead(384, 1000, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 384), (2048, 2048), (256, 2048)]
    for m in linears:
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.02) and not m.bias.any()
    last = head.last_layer
    assert sorted(name for name, _ in last.named_parameters()) == ["weight_g", "weight_v"]  # no bias
    assert last.weight_v.shape == (1000, 256) and torch.equal(last.weight_g, torch.ones(1000, 1))
    assert not last.weight_g.requires_grad and last.weight_v.requires_grad
    torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(1000))  # every row of W has norm g

    x = torch.randn(4, 384)
    bottleneck = nn.functional.normalize(head.mlp(x), dim=-1)
    weight = last.weight_v / last.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), bottleneck @ weight.T)

    trained = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, norm_last_layer=False, use_bn=True, layers=4)
    assert [type(m).__name__ for m in trained.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 3 + ["Linear"]
    trained(torch.randn(3, 8)).square().sum().backward()
    assert trained.last_layer.weight_g.requires_grad and trained.last_layer.weight_g.grad is not None
    assert isinstance(DINOHead(8, 10, bottleneck_dim=4, layers=1).mlp, nn.Linear)


def test_the_student_sees_every_crop_and_the_teacher_the_global_ones() -> None:
    """MultiCropWrapper: one backbone forward per resolution, the head once over all the features."""
    torch.manual_seed(0)
    model = build_dino().train()
    calls: dict[str, list[tuple[int, ...]]] = {"backbone": [], "head": [], "teacher_backbone": [],
                                                "teacher_head": []}
    for name in calls:
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: calls[name].append(tuple(args[0].shape)))
    n = GLOBAL_BATCH

    out = model(crops(local=3))

    assert calls["backbone"] == [(2 * n, 3, 16, 16), (3 * n, 3, 8, 8)]
    assert calls["head"] == [(5 * n, 8)]
    assert calls["teacher_backbone"] == [(2 * n, 3, 16, 16)]
    assert calls["teacher_head"] == [(2 * n, 8)]
    assert sorted(out) == ["loss", "teacher_temperature"]  # teacher_momentum is the engine's to log
    out["loss"].backward()
    assert all(p.grad is None for p in teacher_parameters(model))
    assert all(p.grad is not None for p in student_parameters(model) if p.requires_grad)


def test_the_teacher_temperature_follows_the_official_per_epoch_schedule() -> None:
    """DINOLoss.teacher_temp_schedule: np.linspace(0.04, 0.07, 30) over the first 30 epochs, then 0.07; the same
    at every step of an epoch."""
    model = build_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(300 - 30) * 0.07))
    for epoch in (0, 1, 2, 15, 28, 29, 30, 31, 100, 299):
        for index in (epoch * 5, epoch * 5 + 4):
            model.on_step_start(TrainingStep(index=index, epoch=epoch, steps_per_epoch=5, total_steps=1500))
            assert model.teacher_temperature == pytest.approx(official[epoch], rel=1e-12)
    model.on_step_start(TrainingStep(index=7, epoch=1, steps_per_epoch=5, total_steps=1500))
    out = model(crops(local=0))
    assert out["teacher_temperature"].item() == pytest.approx(official[1])
    constant = build_dino(teacher_temp=0.04, warmup_teacher_temp_epochs=0)
    constant.on_step_start(TrainingStep(index=0, epoch=0, steps_per_epoch=5, total_steps=1500))
    assert constant.teacher_temperature == 0.04


def test_the_last_layer_is_frozen_in_the_first_epoch_only() -> None:
    """utils.cancel_gradients_last_layer with freeze_last_layer 1: no gradient for last_layer (g and V) in
    epoch 0, after the clipping; every other parameter keeps its gradient."""
    for epoch, frozen in ((0, True), (1, False)):
        torch.manual_seed(0)
        model = build_dino(norm_last_layer=False, freeze_last_layer=1).train()
        model(crops())["loss"].backward()
        model.before_optimizer_step(step_at(model, index=4 * epoch, epoch=epoch))
        last = list(model.head.last_layer.parameters())
        assert len(last) == 2 and all((p.grad is None) == frozen for p in last)
        others = [p for p in student_parameters(model) if all(p is not q for q in last)]
        assert others and all(p.grad is not None for p in others)


def test_the_teacher_moves_only_by_the_ema_with_the_cosine_momentum() -> None:
    torch.manual_seed(0)
    base, total = 0.5, 8
    model = build_dino(momentum_teacher=base, norm_last_layer=False).train()
    assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr()
               for p, q in zip(student_parameters(model), teacher_parameters(model)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for k in range(3):
        step = step_at(model, index=k, epoch=1)  # epoch 1: the last layer trains too
        before = [p.detach().clone() for p in teacher_parameters(model)]
        model.on_step_start(step)
        out = model(crops(seed=k))
        optimizer.zero_grad()
        out["loss"].backward()
        model.before_optimizer_step(step)
        optimizer.step()
        assert all(torch.equal(p, q) for p, q in zip(teacher_parameters(model), before)), "only the EMA moves it"
        student = [p.detach().clone() for p in student_parameters(model)]
        m = formula_momentum(k, total, base)
        assert step.values["teacher_momentum"] == pytest.approx(m)
        model.after_optimizer_step(step)
        for got, old, new in zip(teacher_parameters(model), before, student):
            torch.testing.assert_close(got, m * old + (1 - m) * new)
    assert model.schedules()["teacher_momentum"].at(total, 4, total) == pytest.approx(1.0)


def test_drop_path_is_in_the_student_only(registry: Registry) -> None:
    """main_dino.py builds the student with drop_path_rate and the teacher without."""
    encoder = registry.build("encoder", {"name": "vit_tiny", "image_size": 16, "patch_size": 4, "depth": 2,
                                         "dynamic_img_size": True, "drop_path_rate": 0.5})
    model = build_dino(encoder).train()
    from torchvision.ops import StochasticDepth

    student_rates = [m.p for m in model.backbone.modules() if isinstance(m, StochasticDepth)]
    teacher_rates = [m.p for m in model.teacher_backbone.modules() if isinstance(m, StochasticDepth)]
    assert max(student_rates) == 0.5 and teacher_rates == [0.0] * len(student_rates)  # linear over blocks: 0.5 last
    torch.manual_seed(0)
    x = torch.randn(GLOBAL_BATCH, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.teacher_backbone(x), model.teacher_backbone(x))
        assert not torch.equal(model.backbone(x), model.backbone(x))
    model.eval()
    with torch.no_grad():  # the same weights: without drop path, the same features
        torch.testing.assert_close(model.backbone(x), model.teacher_backbone(x))


def dino_with_a_trainable_last_layer() -> DINO:
    return build_dino(norm_last_layer=False).train()


def loss_checking_the_center(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """The method's loss; and the center after it, on every worker, is the EMA of the mean teacher output over
    the teacher rows of all workers (formula_center of every worker's, gathered: the official all_reduce)."""
    method = model.module if isinstance(model, DistributedDataParallel) else model
    before = method.loss.center[0].tolist()
    teacher: list[torch.Tensor] = []
    hook = method.teacher_head.register_forward_hook(lambda module, args, out: teacher.append(out.detach()))
    loss = model(batch)["loss"]
    hook.remove()
    expected = formula_center(before, [concat_all_gather(teacher[0])], method.loss.center_momentum)
    torch.testing.assert_close(method.loss.center[0], torch.tensor(expected))
    return loss


def test_two_workers_compute_the_loss_gradients_and_center_of_one_process() -> None:
    """Each worker's loss is the mean over its rows, DDP averages the gradients, and the center is the EMA of
    the mean teacher output over both workers' rows (the official all_reduce): as one process on the batch."""
    check_workers_match_one_process(dino_with_a_trainable_last_layer, crops, loss=loss_checking_the_center)


def test_method_dino_alone_resolves_to_the_readme_recipe(registry: Registry, tmp_path: Path) -> None:
    """facebookresearch/dino @ 7c446df: README "Boosting DINO performance", full command: --arch vit_small
    --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false, run_with_submitit.py
    (2 nodes x 8 GPUs) x batch_size_per_gpu 64 = 1024; main_dino.py defaults otherwise: patch_size 16, out_dim
    65536, momentum_teacher 0.996, use_bn_in_head False, warmup_teacher_temp 0.04, weight_decay 0.04 ->
    weight_decay_end 0.4, clip_grad 3.0, freeze_last_layer 1, lr 0.0005 (x B/256), warmup_epochs 10, min_lr 1e-6,
    optimizer adamw, drop_path_rate 0.1, global_crops_scale (0.4, 1), local_crops_number 8, local_crops_scale
    (0.05, 0.4); DINOLoss student_temp 0.1, center_momentum 0.9; DINOHead hidden 2048, bottleneck 256, nlayers 3."""
    registry.add_module("sslcore_dino.plugin")
    experiment = resolve({"method": "dino", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04, "betas": [0.9, 0.999],
                                  "eps": 1e-8}
    peak = 5e-4 * 1024 / 256
    assert (train["lr_scaling"], train["warmup_epochs"], train["warmup_start"], train["schedule"]) == \
        ("linear", 10, 0.0, "cosine")
    assert train["final_lr"] * peak == pytest.approx(1e-6)  # the official absolute min_lr at B = 1024
    assert (train["epochs"], train["batch_size"], train["weight_decay_end"]) == (300, 1024, 0.4)
    assert (train["grad_clip"], train["grad_clip_mode"]) == (3.0, "per_parameter")
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": False,
                                                       "fixed_lr": False}}
    assert experiment["method"] == {"name": "dino", "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
                                    "head_layers": 3, "use_bn_in_head": False, "norm_last_layer": False,
                                    "momentum_teacher": 0.996, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07,
                                    "warmup_teacher_temp_epochs": 30, "freeze_last_layer": 1, "global_crops": 2}
    encoder = experiment["encoder"]
    assert {k: encoder[k] for k in ("name", "image_size", "patch_size", "position_embedding", "pool",
                                    "dynamic_img_size", "drop_path_rate", "depth")} == \
        {"name": "vit_small", "image_size": 224, "patch_size": 16, "position_embedding": "learned", "pool": "cls",
         "dynamic_img_size": True, "drop_path_rate": 0.1, "depth": None}
    augmentation = experiment["augmentation"]  # DataAugmentationDINO
    assert {k: augmentation[k] for k in ("name", "size", "scale", "global_crops", "local_size", "local_scale",
                                         "local_crops", "blur_prob", "solarize_prob", "local_blur_prob",
                                         "local_solarize_prob", "color_jitter", "jitter_prob", "grayscale_prob",
                                         "interpolation", "mean", "std")} == \
        {"name": "dino", "size": 224, "scale": [0.4, 1.0], "global_crops": 2, "local_size": 96,
         "local_scale": [0.05, 0.4], "local_crops": 8, "blur_prob": [1.0, 0.1], "solarize_prob": [0.0, 0.2],
         "local_blur_prob": 0.5, "local_solarize_prob": 0.0, "color_jitter": [0.4, 0.4, 0.2, 0.1],
         "jitter_prob": 0.8, "grayscale_prob": 0.2, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
         "std": [0.229, 0.224, 0.225]}
    assert experiment["loss"] == {"name": "dino", "student_temp": 0.1, "center_momentum": 0.9}


def test_the_engine_builds_the_official_groups_and_schedules(registry: Registry, tmp_path: Path) -> None:
    """utils.get_params_groups (no weight decay on biases and 1-D parameters; weight_g, K x 1, is regularized),
    the teacher outside the optimizer, utils.cosine_scheduler for the lr (linear warmup, cosine to min_lr) and
    the weight decay (0.04 -> 0.4 over every step), clip_grad 3.0 per parameter."""
    registry.add_module("sslcore_dino.plugin")
    batch, steps_per_epoch, epochs = 1024, 2, 20  # warmup: 10 epochs = 20 steps of the 40
    data = {"method": {"name": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
            "encoder": {"name": "vit_tiny", "image_size": 32, "patch_size": 16, "depth": 1},
            "data": {"name": "image_folder", "root": str(tmp_path)}}
    experiment = resolve(data, registry).as_dict()
    method, optimization = build_for_training(experiment, registry, steps_per_epoch=steps_per_epoch, epochs=epochs)
    groups = {group["group"]: group for group in optimization.optimizer.param_groups}
    assert sorted(groups) == ["bias_and_norm", "rest"]
    trainable = [p for p in [*method.backbone.parameters(), *method.head.parameters()] if p.requires_grad]
    assert {id(p) for p in groups["bias_and_norm"]["params"]} == {id(p) for p in trainable if p.ndim <= 1}
    assert {id(p) for p in groups["rest"]["params"]} == {id(p) for p in trainable if p.ndim > 1}
    assert any(p is method.head.last_layer.weight_g for p in groups["rest"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)  # nothing of the teacher
    assert (groups["rest"]["scheduled_weight_decay"], groups["bias_and_norm"]["weight_decay"]) == (True, 0.0)
    assert (optimization.grad_clip, optimization.grad_clip_mode) == (3.0, "per_parameter")
    total, warmup, peak = steps_per_epoch * epochs, 10 * steps_per_epoch, 5e-4 * batch / 256
    for k in range(total):
        # cosine_scheduler(peak, 1e-6, ..., warmup_epochs=10): linspace(0, peak, warmup) then the cosine;
        # sslcore's warmup reaches the peak one step earlier, (k + 1) / warmup
        expected = peak * (k + 1) / warmup if k < warmup else \
            1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert [g["lr"] for g in optimization.optimizer.param_groups] == [pytest.approx(expected)] * 2
        weight_decay = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * k / total))
        assert optimization.weight_decay.at(k, steps_per_epoch, total) == pytest.approx(weight_decay)
        optimization.optimizer.step()
        optimization.scheduler.step()


def test_the_resnet50_example_is_the_readme_command(registry: Registry, tmp_path: Path) -> None:
    """README "ResNet-50 and other convnets trainings": --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay
    1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 on 8 GPUs x 64."""
    registry.add_module("sslcore_dino.plugin")
    text = (EXAMPLES / "dino_resnet50.yaml").read_text().replace("~/.cache/sslcore/cifar10", str(tmp_path))
    experiment = resolve(yaml.safe_load(text), registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4,
                                  "nesterov": False}
    assert (train["epochs"], train["batch_size"], train["weight_decay_end"], train["warmup_epochs"]) == \
        (100, 512, 1e-4, 10)
    assert train["final_lr"] * 0.03 * 512 / 256 == pytest.approx(1e-6, rel=1e-4)
    assert (train["grad_clip"], train["grad_clip_mode"], train["param_groups"]["bias_and_norm"]["weight_decay"]) \
        == (3.0, "per_parameter", 0.0)
    assert experiment["encoder"]["name"] == "resnet50" and experiment["data"]["root"] == f"{tmp_path}/train"
    augmentation = experiment["augmentation"]
    assert (augmentation["scale"], augmentation["local_scale"], augmentation["local_crops"]) == \
        ([0.14, 1.0], [0.05, 0.14], 8)
    method = experiment["method"]
    assert (method["out_dim"], method["norm_last_layer"], method["use_bn_in_head"], method["teacher_temp"],
            method["warmup_teacher_temp"], method["momentum_teacher"]) == (65536, True, False, 0.04, 0.04, 0.996)


def test_dino_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_dino.plugin", [("method", "dino"), ("loss", "dino")])


def test_the_installed_entry_point_registers_dino() -> None:
    check_entry_point("sslcore-dino", [("method", "dino"), ("loss", "dino")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "dino"), registry.get("loss", "dino")
    assert method.factory is DINO and loss.factory is DINOLoss
    assert method.slots == SLOTS
    assert [(slot, s.needs) for slot, s in SLOTS.items()] == [("encoder", Encoder), ("augmentation", Augmentation),
                                                              ("loss", SelfDistillationLoss)]
    assert SLOTS["loss"] == Slot(SelfDistillationLoss, {"name": "dino"})
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path, "train.log_every_steps=1")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["subset"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and r["teacher_temperature"] == pytest.approx(0.07)
                                 for r in train)
    assert train[-1]["teacher_momentum"] == pytest.approx(formula_momentum(1, 2, 0.9995))
    model = torch.load(RunDir(run_dir).checkpoints()[0], weights_only=True)["model"]
    assert model["loss.center"].shape == (1, 4096) and model["loss.center"].abs().sum() > 0
    assert "teacher_head.last_layer.weight_v" in model and "teacher_backbone.conv1.weight" in model


def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path: Path, cifar10_dir: Path) -> None:
    """The center and the teacher are in the checkpoint, and tau_t (2 warmup epochs here) and the frozen last
    layer (epoch 0) come from the step: resumed inside epoch 0 and at its end, the runs end bit for bit alike."""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, "train.batch_size=16", "encoder.cifar_stem=false",
                           "method.out_dim=64", "method.hidden_dim=64", "method.bottleneck_dim=16",
                           "method.norm_last_layer=false", "method.warmup_teacher_temp_epochs=2",
                           "augmentation.local_crops=2", "augmentation.local_size=24")
    straight = tmp_path / "straight" / "runs" / "dino_cifar10"
    records = map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
    train = [record for record in records if record["subset"] == "train"]
    # np.linspace(0.04, 0.07, 2): 0.04 in epoch 0, 0.07 in epoch 1, at every step of the epoch
    assert [round(r["teacher_temperature"], 6) for r in train] == [0.04] * 3 + [0.07] * 3
