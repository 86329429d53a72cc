"""SimCLR: NT-Xent against its formula written out here as the 2N x 2N loop, the contrastive accuracy, one
batch through the encoder and the head, two real gloo workers against one process (the method's loss, accuracy
and gradients), the official recipe that ``method: simclr`` resolves to, the loss slot that refuses a
contrastive loss, the plugin contract, and the CIFAR-10 example through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sslcore_simclr import NTXentConfig, NTXentLoss, SimCLR, SimCLRConfig, contrastive_accuracy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslcore.api.errors import ConfigError
from sslcore.api.hookspecs import PairedLoss, Slot
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import (
    built_slots,
    check_entry_point,
    check_plugin,
    check_workers_match_one_process,
    run_example_briefly,
    tiny_encoder,
)
from sslcore.toolkit.distributed import concat_all_gather
from sslcore.toolkit.heads import MLPHead

GLOBAL_BATCH = 8
TAU = 0.5


def context() -> MethodContext:
    return MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                         device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)


def build_simclr(temperature: float = TAU, **method) -> SimCLR:
    slots = built_slots(encoder=tiny_encoder(), loss=NTXentLoss(NTXentConfig(temperature=temperature)))
    return SimCLR(SimCLRConfig(**{"head_hidden_dim": 16, "dim": 8, **method}), context=context(), slots=slots)


def views(n: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=generator) for _ in range(2)]


def cosine(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def formula_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """The paper's L: z_1..z_N are the first views of the N images, z_{N+1}..z_{2N} the second ones;
    l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ), averaged over all 2N i."""
    z = z1.tolist() + z2.tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n  # the other view of image i
        denominator = sum(math.exp(cosine(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cosine(z[i], z[j]) / tau) / denominator)
    return total / (2 * n)


def formula_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """The fraction of the 2N views whose most similar other view is the other view of their image."""
    z = z1.tolist() + z2.tolist()
    n = len(z1)
    hits = 0
    for i in range(2 * n):
        others = [k for k in range(2 * n) if k != i]
        nearest = max(others, key=lambda k: cosine(z[i], z[k]))
        hits += nearest == (i + n if i < n else i - n)
    return hits / (2 * n)


def test_nt_xent_matches_the_formula_also_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 6, generator=generator) * 3, torch.randn(5, 6, generator=generator)
    for tau in (0.1, 0.5):
        loss = NTXentLoss(NTXentConfig(temperature=tau))(z1, z2)
        assert loss.item() == pytest.approx(formula_nt_xent(z1, z2, tau), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = NTXentLoss(NTXentConfig(temperature=0.1))(z1.bfloat16(), z2.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(formula_nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1), rel=1e-5)


def test_nt_xent_masks_the_anchor_itself_and_counts_both_directions() -> None:
    n, tau = 4, 0.5
    z = torch.eye(n) * 2  # N orthogonal images, both views identical up to scale: sim 1 to the positive, 0 else
    loss = NTXentLoss(NTXentConfig(temperature=tau))(z, z * 3)
    # each of the 2N anchors: the positive against 2N - 2 negatives at sim 0; itself in the denominator would
    # add another exp(1 / tau), log(2 + ...)
    assert loss.item() == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / tau)), rel=1e-5)
    # swapping the views relabels the anchors: the same 2N terms
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(n, 3, generator=generator), torch.randn(n, 3, generator=generator)
    loss_fn = NTXentLoss(NTXentConfig(temperature=tau))
    assert loss_fn(z1, z2).item() == pytest.approx(loss_fn(z2, z1).item(), rel=1e-6)


def test_contrastive_accuracy_matches_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=generator)
    z2 = z1 + torch.randn(6, 4, generator=generator)  # noisy second views: some anchors miss their positive
    accuracy = contrastive_accuracy(z1, z2).item()
    assert accuracy == pytest.approx(formula_accuracy(z1, z2))
    assert 0 < accuracy < 1
    assert contrastive_accuracy(z1, z1 * 2).item() == 1.0


def test_both_views_go_through_the_encoder_and_head_as_one_batch() -> None:
    torch.manual_seed(0)
    model = build_simclr().train()
    head = model.projector
    assert isinstance(head, MLPHead) and head.dims == [8, 16, 8]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert all(linear.bias is None for linear in linears)  # both are followed by a BatchNorm
    assert isinstance(head[-1], nn.BatchNorm1d) and head[-1].affine
    batches: list[int] = []
    model.backbone.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    projections: list[torch.Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: projections.append(out.detach()))
    v1, v2 = views()

    out = model([v1, v2])
    out["loss"].backward()

    assert batches == [2 * GLOBAL_BATCH]  # one forward: the BatchNorms see the 2N views together
    z1, z2 = projections[0][:GLOBAL_BATCH], projections[0][GLOBAL_BATCH:]
    assert out["loss"].item() == pytest.approx(formula_nt_xent(z1, z2, TAU), rel=1e-5)
    assert out["contrast_acc"].item() == pytest.approx(formula_accuracy(z1, z2))
    assert all(p.grad is not None for p in model.parameters())


def simclr_in_eval_mode() -> SimCLR:
    """Its BatchNorms on running statistics: no batch statistic couples a worker's rows."""
    return build_simclr().eval()


def loss_checking_the_accuracy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """The method's loss; and the mean of the workers' contrast_acc is the accuracy of the 2N views of the global
    batch (formula_accuracy on every worker's projections, gathered)."""
    method = model.module if isinstance(model, DistributedDataParallel) else model
    projections: list[torch.Tensor] = []
    hook = method.projector.register_forward_hook(lambda module, args, out: projections.append(out.detach()))
    out = model(batch)
    hook.remove()
    n = len(batch[0])
    z = concat_all_gather(projections[0]).unflatten(0, (-1, 2, n))  # workers x views x n x D
    accuracy = concat_all_gather(out["contrast_acc"][None]).mean()  # the mean over the workers
    assert accuracy.item() == pytest.approx(formula_accuracy(z[:, 0].flatten(0, 1), z[:, 1].flatten(0, 1)))
    return out["loss"]


def test_two_workers_compute_the_loss_accuracy_and_gradients_of_one_process() -> None:
    """Each worker's loss is the mean over its anchors against the 2N gathered views: their average is the mean
    over all 2N anchors, and DDP's mean of the gradients those of one process on the whole batch."""
    check_workers_match_one_process(simclr_in_eval_mode, views, loss=loss_checking_the_accuracy)


def test_the_head_is_as_wide_as_the_encoder_by_default() -> None:
    model = build_simclr(head_hidden_dim=None)  # the official code: hidden width = the encoder's
    assert model.projector.dims == [8, 8, 8]
    assert SimCLRConfig().head_hidden_dim is None and SimCLRConfig().dim == 128


def test_simclr_meets_the_method_and_loss_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_simclr.plugin", [("method", "simclr"), ("loss", "nt_xent")])


def test_the_installed_entry_point_registers_simclr() -> None:
    check_entry_point("sslcore-simclr", [("method", "simclr"), ("loss", "nt_xent")])
    registry = Registry(autoload=True)
    method, loss = registry.get("method", "simclr"), registry.get("loss", "nt_xent")
    assert method.factory is SimCLR and loss.factory is NTXentLoss
    assert method.slots["loss"] == Slot(PairedLoss, {"name": "nt_xent", "temperature": 0.1})
    assert method.slots["encoder"].default == {"name": "resnet50"}
    assert method.slots["augmentation"].default == {"name": "simclr"}


def registry_with_simclr() -> Registry:
    registry = Registry(autoload=False)
    registry.add_module("sslcore_simclr.plugin")
    return registry


DATA = {"name": "image_folder", "root": "/nowhere"}  # not read by resolve


def test_method_simclr_alone_is_the_papers_imagenet_recipe() -> None:
    """google-research/simclr run.py @ 85e8552 (v1), its flag defaults and the README's ImageNet command:
    --optimizer lars, --learning_rate 0.3 per 256 images (model_util.learning_rate_schedule: scaled_lr =
    lr x train_batch_size / 256), --momentum 0.9, --weight_decay 1e-6, eeta 0.001 (lars_optimizer.py),
    --warmup_epochs 10 then tf.train.cosine_decay to 0, --train_batch_size 4096, --train_epochs 100,
    --temperature 0.1; model.py excludes 'batch_normalization' and 'bias' from weight decay and from the
    trust ratio (exclude_from_layer_adaptation defaults to exclude_from_weight_decay)."""
    resolved = resolve({"method": "simclr", "data": DATA}, registry_with_simclr()).as_dict()
    train = resolved["train"]
    assert train["optimizer"] == {"name": "lars", "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-6,
                                  "trust_coefficient": 0.001, "clip_lr": False}
    assert train["lr_scaling"] == "linear" and train["warmup_epochs"] == 10
    assert train["schedule"] == "cosine" and train["final_lr"] == 0.0
    assert train["epochs"] == 100 and train["batch_size"] == 4096
    assert train["grad_clip"] is None and train["weight_decay_end"] is None
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": True,
                                                       "fixed_lr": False}}
    assert resolved["loss"] == {"name": "nt_xent", "temperature": 0.1}
    assert resolved["encoder"]["name"] == "resnet50"
    assert resolved["augmentation"]["name"] == "simclr" and resolved["augmentation"]["strength"] == 1.0
    assert resolved["method"] == {"name": "simclr", "head_hidden_dim": None, "dim": 128}


def test_the_loss_slot_refuses_a_contrastive_loss() -> None:
    with pytest.raises(ConfigError) as error:
        resolve({"method": "simclr", "loss": {"name": "info_nce"}, "data": DATA}, registry_with_simclr())
    (line,) = error.value.args  # one error, on one line
    assert "\n" not in line and "loss.name" in line and "info_nce" in line
    fitting = line.rsplit("that fit: ", 1)[1].split(", ")
    assert "nt_xent" in fitting and "info_nce" not in fitting


def test_cifar10_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    run_dir = run_example_briefly(Path(__file__).parents[3] / "examples" / "simclr_cifar10.yaml", cifar10_dir,
                                  tmp_path, "train.log_every_steps=1")
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["subset"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) and 0.0 <= m["contrast_acc"] <= 1.0 for m in steps)


def test_a_vit_encoder_block_trains_simclr(registry: Registry, tmp_path: Path) -> None:
    """SimCLR with a ViT, built from an experiment file that swaps the encoder block."""
    from sslcore.components.encoders import VisionTransformerEncoder
    from sslcore.config import load_experiment
    from sslcore.engine.build import build_method

    (tmp_path / "experiment.yaml").write_text(f"""
method: {{name: simclr, head_hidden_dim: 16, dim: 8}}
encoder: {{name: vit_tiny, image_size: 16, patch_size: 4, depth: 1}}
data: {{name: image_folder, root: {tmp_path}}}
""")
    registry.add_module("sslcore_simclr.plugin")
    try:
        experiment = load_experiment(tmp_path / "experiment.yaml", registry).as_dict()
        torch.manual_seed(0)
        model = build_method(experiment, registry, context()).train()
    finally:
        registry.remove_plugin("sslcore_simclr.plugin")
    assert isinstance(model.backbone, VisionTransformerEncoder)
    generator = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator) for _ in range(2))

    out = model([v1, v2])
    out["loss"].backward()

    assert torch.isfinite(out["loss"]) and 0.0 <= out["contrast_acc"].item() <= 1.0
    assert all(p.grad is not None for p in model.parameters())
