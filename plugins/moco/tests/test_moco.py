"""MoCo v2 on real torch and torchvision ResNets, with sslcore's built-in queue and InfoNCE; a real 2-process
gloo group for the cross-worker shuffling BN."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sslcore_moco import MoCo, MoCoConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.errors import TrainingError
from sslcore.api.recipe import TrainingStep
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import built_slots, check_entry_point
from sslcore.toolkit.batchnorm import SplitBatchNorm

BATCH = 16  # per worker
SIZE = 16  # px


def build_moco(registry: Registry, *, world_size: int = 1, rank: int = 0, batch: int = BATCH,
               queue: int = 64, loss: dict | None = None, negatives: dict | None = None, dataset_size: int = 64,
               **method) -> MoCo:
    config = MoCoConfig(dim=16, head_hidden_dim=32, **method)
    context = MethodContext(world_size=world_size, rank=rank, global_batch_size=batch * world_size,
                            steps_per_epoch=1, epochs=1, device=torch.device("cpu"), dataset_size=dataset_size)
    encoder = registry.get("encoder", "resnet18").build({"cifar_stem": True})
    source = registry.build("negative_source", negatives or {"name": "queue", "size": queue}, dim=config.dim,
                            global_batch_size=context.global_batch_size, dataset_size=context.dataset_size)
    loss_fn = registry.build("loss", loss or {"name": "info_nce", "temperature": 0.2})
    return MoCo(config, context=context, slots=built_slots(encoder=encoder, negatives=source, loss=loss_fn))


def after_step(model: MoCo, index: int = 0) -> None:
    """What the engine calls after each optimizer step: the momentum update of f_k."""
    model.after_optimizer_step(TrainingStep(index=index, epoch=0, steps_per_epoch=1, total_steps=10))


def images(n: int = BATCH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=generator)


def query_parameters(model: MoCo) -> list[torch.Tensor]:
    return [*model.backbone.parameters(), *model.head.parameters()]


def key_parameters(model: MoCo) -> list[torch.Tensor]:
    return [*model.key_backbone.parameters(), *model.key_head.parameters()]


def test_key_encoder_starts_as_a_copy_and_gets_no_gradient(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_moco(registry)
    theta_q, theta_k = query_parameters(model), key_parameters(model)
    assert len(theta_q) == len(theta_k)
    for p_q, p_k in zip(theta_q, theta_k):
        assert torch.equal(p_q, p_k) and p_q.data_ptr() != p_k.data_ptr()
        assert p_q.requires_grad and not p_k.requires_grad

    model.train()
    model([images(seed=1), images(seed=2)])["loss"].backward()
    assert all(p.grad is not None for p in theta_q)
    assert all(p.grad is None for p in theta_k)


def test_momentum_update_follows_the_formula(registry: Registry) -> None:
    torch.manual_seed(0)
    m = 0.9
    model = build_moco(registry, momentum=m)
    with torch.no_grad():  # as after an optimizer step: theta_q moved away from theta_k
        for p in query_parameters(model):
            p.add_(torch.randn_like(p))
    theta_q = [p.clone() for p in query_parameters(model)]
    theta_k = [p.clone() for p in key_parameters(model)]

    model.momentum_update_key_encoder()

    for p_k, before_q, before_k in zip(key_parameters(model), theta_q, theta_k):
        torch.testing.assert_close(p_k, m * before_k + (1 - m) * before_q)
    for p_q, before_q in zip(query_parameters(model), theta_q):
        assert torch.equal(p_q, before_q)


def test_the_key_encoder_is_updated_after_each_step_before_it_encodes_the_next_keys(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_moco(registry, momentum=0.0)  # m = 0: theta_k becomes theta_q
    with torch.no_grad():  # as an optimizer step does
        for p in query_parameters(model):
            p.add_(torch.randn_like(p))
    after_step(model)
    seen: list[torch.Tensor] = []
    model.key_head.register_forward_hook(lambda module, args, out: seen.append(module[0].weight.clone()))
    model([images(seed=1), images(seed=2)])
    assert torch.equal(seen[0], model.head[0].weight)


def test_momentum_zero_encodes_keys_with_this_steps_query_encoder(registry: Registry) -> None:
    """The end-to-end mechanism: after an optimizer step, the next keys come from the updated f_q."""
    torch.manual_seed(0)
    model = build_moco(registry, momentum=0.0, shuffle_bn="off", negatives={"name": "in_batch"}).train()
    optimizer = torch.optim.SGD(query_parameters(model), lr=0.5)
    keys: list[torch.Tensor] = []
    model.key_head.register_forward_hook(lambda module, args, out: keys.append(out))
    for step in range(2):
        im_q, im_k = images(seed=2 * step), images(seed=2 * step + 1)
        theta_q = [p.clone() for p in query_parameters(model)]
        query_encoder = copy.deepcopy(nn.Sequential(model.backbone, model.head))  # f_q as this step starts

        model([im_q, im_k])["loss"].backward()
        assert all(torch.equal(p_k, p_q) for p_k, p_q in zip(key_parameters(model), theta_q))
        optimizer.step()
        optimizer.zero_grad()
        after_step(model, step)

        with torch.no_grad():
            torch.testing.assert_close(keys[step], query_encoder(im_k), rtol=0, atol=0)
    assert not all(torch.equal(p, q) for p, q in zip(query_parameters(model), theta_q)), "f_q did not move"


def test_memory_bank_negatives_train_moco(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_moco(registry, momentum=0.0, negatives={"name": "memory_bank", "num_negatives": 32}).train()
    optimizer = torch.optim.SGD(query_parameters(model), lr=0.1)
    bank = model.negative_source.bank
    initial = bank.clone()
    for step in range(2):
        index = torch.arange(BATCH) + BATCH * step  # images 0-15, then 16-31 of 64
        out = model([images(seed=2 * step), images(seed=2 * step + 1)], index=index)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert all(p.grad is not None for p in query_parameters(model))
        optimizer.step()
        optimizer.zero_grad()
        after_step(model, step)
    assert int(model.negative_source.step) == 2
    assert not (bank[:2 * BATCH] == initial[:2 * BATCH]).all(dim=1).any(), "an image's entry was not written"
    assert torch.equal(bank[2 * BATCH:], initial[2 * BATCH:])
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(64))
    with pytest.raises(TrainingError, match="memory_bank needs the dataset index"):
        model([images(seed=1), images(seed=2)])


@pytest.mark.parametrize("negatives", ["{name: in_batch}", "{name: queue, size: 4096}",
                                       "{name: memory_bank, num_negatives: 4096, momentum: 0.5}"])
def test_a_moco_experiment_validates_with_each_negative_source(negatives: str, tmp_path: Path,
                                                               cifar10_subset: dict) -> None:
    from sslcore.testing import run_cli

    (tmp_path / "experiment.yaml").write_text(f"""
method: {{name: moco, momentum: 0}}
encoder: {{name: resnet18, cifar_stem: true}}
negatives: {negatives}
data: {{name: image_folder, root: {cifar10_subset["train"]}}}
train: {{batch_size: 256}}
""")
    out = run_cli("validate", "experiment.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"negatives={negatives.split()[1].rstrip(',}')}" in out.stdout


def test_split_shuffle_returns_keys_in_the_order_of_their_images(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_moco(registry, shuffle_bn="split", bn_splits=4)
    im_k = images(seed=3)
    seen: list[torch.Tensor] = []
    model.key_backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.eval()  # running statistics: a key depends on its image alone, so the order can be checked

    k = model.keys(im_k)

    assert not torch.equal(seen[0], im_k), "the key encoder saw the batch unshuffled"
    torch.testing.assert_close(k, model.encode_keys(im_k))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_backward_on_tiny_images_advances_the_queue(registry: Registry, autocast) -> None:
    torch.manual_seed(0)
    model = build_moco(registry).train()  # auto -> split with one worker
    assert model.shuffle_bn == "split"
    views = [images(seed=s).contiguous(memory_format=torch.channels_last) for s in (1, 2)]
    model = model.to(memory_format=torch.channels_last)
    queue_before = model.negative_source.queue.clone()

    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(views)
    out["loss"].backward()

    loss = out["loss"]
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert int(model.negative_source.ptr) == BATCH
    queue = model.negative_source.queue
    assert queue.dtype == torch.float32
    assert not torch.equal(queue[:BATCH], queue_before[:BATCH])
    assert torch.equal(queue[BATCH:], queue_before[BATCH:])
    torch.testing.assert_close(queue[:BATCH].norm(dim=1), torch.ones(BATCH))


@pytest.mark.parametrize(("loss", "negatives"), [({"name": "triplet", "mining": "semi_hard"}, {"name": "in_batch"}),
                                                ({"name": "contrastive_margin", "mining": "hard"},
                                                 {"name": "queue", "size": 64})])
def test_metric_learning_losses_train_moco(registry: Registry, loss: dict, negatives: dict) -> None:
    torch.manual_seed(0)
    model = build_moco(registry, loss=loss, negatives=negatives)
    out = model([images(seed=1), images(seed=2)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in query_parameters(model))


def test_bn_splits_must_divide_the_per_worker_batch(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"per-worker batch size \(16\) divisible by bn_splits \(3\)"):
        build_moco(registry, bn_splits=3)


def test_bn_split_groups_need_two_images_each(registry: Registry) -> None:
    with pytest.raises(ValueError, match=r"groups of 1 image\(s\) of the per-worker batch of 8.*raise "
                                         r"train.batch_size to 16 or lower method.bn_splits to 4"):
        build_moco(registry, batch=8, bn_splits=8)


def test_gather_needs_several_workers(registry: Registry) -> None:
    with pytest.raises(ValueError, match="use shuffle_bn: auto or split"):
        build_moco(registry, shuffle_bn="gather")


def test_the_installed_entry_point_registers_moco() -> None:
    check_entry_point("sslcore-moco", [("method", "moco")])
    component = Registry(autoload=True).get("method", "moco")
    assert component.factory is MoCo
    assert set(component.slots) == {"encoder", "augmentation", "negatives", "loss"}


def test_method_moco_alone_is_the_official_imagenet_recipe(tmp_path: Path) -> None:
    """facebookresearch/moco main_moco.py @ 7397dfe with the README's v2 flags (--mlp --moco-t 0.2 --aug-plus
    --cos): SGD, lr 0.03 for batch 256 (the README scales it linearly), momentum 0.9, weight decay 1e-4 on every
    parameter, cosine without warmup, 200 epochs; ResNet-50, K 65536, m 0.999, T 0.2, MLP head, 128-d."""
    from sslcore.config import resolve

    registry = Registry(autoload=False, modules=["sslcore_moco.plugin"])
    experiment = resolve({"method": "moco", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4,
                                  "nesterov": False}
    assert (train["lr_scaling"], train["batch_size"], train["epochs"]) == ("linear", 256, 200)
    assert (train["warmup_epochs"], train["schedule"], train["final_lr"]) == (0, "cosine", 0.0)
    assert train["param_groups"] == {} and train["grad_clip"] is None
    assert experiment["encoder"]["name"] == "resnet50" and experiment["augmentation"]["scale"] == [0.2, 1.0]
    assert experiment["negatives"] == {"name": "queue", "size": 65536}
    assert experiment["loss"] == {"name": "info_nce", "temperature": 0.2}
    method = experiment["method"]
    assert (method["momentum"], method["dim"], method["mlp"], method["head_hidden_dim"]) == (0.999, 128, True, None)


def _gather_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial weights on both workers, as the engine seeds them
        model = build_moco(Registry(autoload=False), world_size=2, rank=rank, batch=8, queue=32)
        assert model.shuffle_bn == "gather"
        im_k = images(8, seed=10 + rank)  # each worker has its own images
        torch.manual_seed(100 + rank)  # different generators: only rank 0's permutation may count

        seen: list[torch.Tensor] = []
        model.key_backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        model.eval()
        k = model.keys(im_k)

        # Every image of both workers was encoded exactly once: one permutation, shared by both workers.
        everyone = torch.cat([images(8, seed=10), images(8, seed=11)])
        encoded = seen[0].new_empty((16, *seen[0].shape[1:]))
        dist.all_gather_into_tensor(encoded, seen[0].contiguous())
        order = torch.cdist(encoded.flatten(1), everyone.flatten(1)).argmin(dim=1)
        assert torch.equal(encoded, everyone[order])
        assert torch.equal(order.sort().values, torch.arange(16)), f"not one permutation: {order}"
        assert not torch.equal(order, torch.arange(16)), "keys were not shuffled across workers"
        # ... and each worker got back the key of its own image i in row i.
        torch.testing.assert_close(k, model.encode_keys(im_k))

        ddp = DistributedDataParallel(model.train().to(memory_format=torch.channels_last))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):
            views = [images(8, seed=seed + 2 * rank + step).contiguous(memory_format=torch.channels_last)
                     for seed in (20, 30)]
            ddp(views)["loss"].backward()
            optimizer.step()
            after_step(model, step)
        state = torch.cat([p.flatten() for p in key_parameters(model)] + [model.negative_source.queue.flatten()])
        other = [torch.empty_like(state) for _ in range(2)]
        dist.all_gather(other, state)
        assert torch.equal(other[0], other[1]), "key encoders or queues diverged across workers"
        assert int(model.negative_source.ptr) == 0  # 2 steps x 16 keys = the whole queue of 32
    finally:
        dist.destroy_process_group()


def test_gather_shuffles_keys_across_two_real_workers(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_moco_meets_the_method_contract(registry: Registry) -> None:
    from sslcore.testing import check_component

    registry.add_module("sslcore_moco.plugin")
    try:
        check_component(registry, "method", "moco")
    finally:
        registry.remove_plugin("sslcore_moco.plugin")


def test_a_vit_encoder_block_gives_moco_v3_style_training(registry: Registry, tmp_path: Path) -> None:
    """MoCo with a ViT (MoCo v3's encoder), built from an experiment file that swaps the encoder block: the
    split-BN conversion finds no BatchNorm in the ViT and leaves it as it is."""
    from sslcore.components.encoders import VisionTransformerEncoder, plain_torchvision_vit
    from sslcore.config import load_experiment
    from sslcore.engine.build import build_method

    (tmp_path / "experiment.yaml").write_text(f"""
method: {{name: moco, dim: 16, head_hidden_dim: 32}}
encoder: {{name: vit_tiny, image_size: {SIZE}, patch_size: 4, depth: 1}}
negatives: {{name: queue, size: 64}}
data: {{name: image_folder, root: {tmp_path}}}
""")
    registry.add_module("sslcore_moco.plugin")
    try:
        experiment = load_experiment(tmp_path / "experiment.yaml", registry).as_dict()
        context = MethodContext(world_size=1, rank=0, global_batch_size=BATCH, steps_per_epoch=1, epochs=1,
                                device=torch.device("cpu"), dataset_size=64)
        torch.manual_seed(0)
        model = build_method(experiment, registry, context).train()
    finally:
        registry.remove_plugin("sslcore_moco.plugin")
    assert model.shuffle_bn == "split" and isinstance(model.backbone, VisionTransformerEncoder)
    assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())
    plain_torchvision_vit("vit_tiny", SIZE, 4, depth=1).load_state_dict(model.backbone.state_dict(), strict=True)

    out = model([images(seed=1), images(seed=2)])
    out["loss"].backward()

    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in query_parameters(model))
    assert all(p.grad is None for p in key_parameters(model))
