"""MAE: patchify, the random masking and its unshuffling, the loss on masked patches (with and without
norm_pix_loss) against formulas written out here, the encoder seeing only the visible patches, the ``mae``
augmentation, the official recipe that ``method: mae`` resolves to and its weight decay and lr through the
engine's optimizer, the encoder slot that refuses a ResNet, the plugin contract and entry point, and the
CIFAR-10 example through the CLI with its reconstruction pictures and a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from sslcore_mae import MAE, MAEConfig, patchify, random_masking, reconstruction_loss, unpatchify

from sslcore.api.errors import ConfigError
from sslcore.api.hookspecs import PatchEncoder, Slot
from sslcore.config import load_experiment, resolve
from sslcore.engine.console import Console
from sslcore.engine.context import MethodContext
from sslcore.engine.loop import Trainer, WorkerSpec
from sslcore.engine.session import LocalSession
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_component,
    check_entry_point,
    check_plugin,
    run_example_briefly,
)

torch.set_num_threads(1)

SIZE, PATCH = 16, 4  # L = 16 patches of 4 x 4 x 3 = 48 values
EXAMPLE = Path(__file__).parents[3] / "examples" / "mae_cifar10.yaml"


def build_mae(registry: Registry, **method) -> MAE:
    context = MethodContext(world_size=1, rank=0, global_batch_size=4, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=4)
    encoder = registry.build("encoder", {"name": "vit_tiny", "image_size": SIZE, "patch_size": PATCH, "depth": 2})
    config = MAEConfig(**{"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2, **method})
    return MAE(config, context=context, slots=built_slots(encoder=encoder))


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_patchify_orders_patches_by_row_and_pixels_by_row_column_channel() -> None:
    x = images(2)
    patches = patchify(x, PATCH)
    assert patches.shape == (2, 16, 48)
    for i in range(2):
        for row in range(4):
            for column in range(4):
                for py in range(PATCH):
                    for px in range(PATCH):
                        for c in range(3):
                            value = patches[i, row * 4 + column, (py * PATCH + px) * 3 + c]
                            assert value == x[i, c, row * PATCH + py, column * PATCH + px]
    assert torch.equal(unpatchify(patches, PATCH), x)


@pytest.mark.parametrize(("length", "ratio", "kept"), [(64, 0.75, 16), (16, 0.75, 4), (10, 0.6, 4), (49, 0.9, 4)])
def test_each_sample_keeps_int_l_times_1_minus_r_patches(length: int, ratio: float, kept: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, length, 8)
    visible, mask, ids_restore = random_masking(x, ratio)
    assert kept == int(length * (1 - ratio))  # the official rounding (49 x 0.1 = 4.9 -> 4)
    assert visible.shape == (6, kept, 8) and mask.shape == ids_restore.shape == (6, length)
    assert mask.sum(dim=1).tolist() == [length - kept] * 6
    assert len({tuple(row.tolist()) for row in mask}) == 6  # every sample its own mask


def test_the_smallest_noise_is_kept_and_ids_restore_unshuffles() -> None:
    generator = torch.Generator().manual_seed(1)
    n, length, keep = 3, 8, 2
    x = torch.randn(n, length, 5, generator=generator)
    noise = torch.rand(n, length, generator=generator)
    visible, mask, ids_restore = random_masking(x, 0.75, noise)
    for i in range(n):
        order = sorted(range(length), key=lambda token: noise[i, token].item())  # the shuffled order: ascending noise
        for j in range(keep):
            assert torch.equal(visible[i, j], x[i, order[j]])
        for place, token in enumerate(order):
            assert ids_restore[i, token] == place
            assert mask[i, token] == (1.0 if place >= keep else 0.0)
    shuffled = torch.stack([x[i, sorted(range(length), key=lambda token: noise[i, token].item())] for i in range(n)])
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 5))
    assert torch.equal(restored, x)


def formula_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    """sum over masked (i, l) of mean_k (pred_ilk - t_ilk)^2, divided by the number of masked patches; with
    norm_pix, t_il = (t_il - mean) / sqrt(var + 1e-6), mean and unbiased var over the patch's P values."""
    total, count = 0.0, 0
    n, length, values = pred.shape
    for i in range(n):
        for patch in range(length):
            if mask[i, patch] == 0:
                continue
            t = target[i, patch].tolist()
            if norm_pix:
                mean = sum(t) / values
                var = sum((v - mean) ** 2 for v in t) / (values - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            total += sum((a - b) ** 2 for a, b in zip(pred[i, patch].tolist(), t)) / values
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_loss_is_the_mean_squared_error_on_masked_patches_only(norm_pix: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 6, 12, generator=generator), torch.randn(3, 6, 12, generator=generator) * 2 + 1
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.float32)
    loss = reconstruction_loss(pred, target, mask, norm_pix)
    assert loss.item() == pytest.approx(formula_loss(pred, target, mask, norm_pix), rel=1e-5)
    visible_changed = torch.where(mask[..., None].bool(), pred, torch.randn(3, 6, 12, generator=generator))
    assert reconstruction_loss(visible_changed, target, mask, norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = reconstruction_loss(pred.bfloat16(), target.bfloat16(), mask, norm_pix)
    assert low.dtype == torch.float32


def test_the_encoder_sees_the_visible_patches_and_the_loss_is_on_the_masked_ones(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_mae(registry)
    seen: list[torch.Tensor] = []
    model.backbone.blocks.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    decoded: list[torch.Tensor] = []
    model.decoder.pred.register_forward_hook(lambda module, args, out: decoded.append(out))
    x = images()
    torch.manual_seed(1)
    out = model([x])
    out["loss"].backward()
    assert seen[0].shape == (4, 1 + 4, 192)  # the CLS token and int(16 x 0.25) = 4 visible patches
    torch.manual_seed(1)  # the same masks again
    _, mask, _ = random_masking(torch.zeros(4, 16, 1), 0.75)
    pred = decoded[0][:, 1:].detach()  # N x L x 48, the CLS token's prediction dropped
    assert out["loss"].item() == pytest.approx(formula_loss(pred, patchify(x, PATCH), mask, True), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_the_decoder_puts_each_token_back_at_its_patch(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_mae(registry)
    x = images(2)
    noise = torch.rand(2, 16)
    latent, _, ids_restore = model.encode_visible(x, noise)
    inputs: list[torch.Tensor] = []
    model.decoder.blocks.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    model.decoder(latent, ids_restore)
    embedded = model.decoder.embed(latent)  # N x (1 + 4) x D'
    position = model.decoder.position_embedding[0]  # (1 + L) x D'
    for i in range(2):
        kept = sorted(range(16), key=lambda token: noise[i, token].item())[:4]
        torch.testing.assert_close(inputs[0][i, 0], embedded[i, 0] + position[0])  # the CLS token
        for patch in range(16):
            token = embedded[i, 1 + kept.index(patch)] if patch in kept else model.decoder.mask_token[0, 0]
            torch.testing.assert_close(inputs[0][i, 1 + patch], token + position[1 + patch])


def registry_with_mae() -> Registry:
    registry = Registry(autoload=False)
    registry.add_module("sslcore_mae.plugin")
    return registry


DATA = {"name": "image_folder", "root": "/nowhere"}  # not read by resolve


def test_the_encoder_slot_refuses_an_encoder_without_patches() -> None:
    with pytest.raises(ConfigError) as error:
        resolve({"method": "mae", "encoder": {"name": "resnet18"}, "data": DATA}, registry_with_mae())
    (line,) = error.value.args  # one error, on one line
    assert "\n" not in line and "encoder.name" in line and "resnet18" in line
    assert line.rsplit("that fit: ", 1)[1].split(", ") == ["timm", "vit_base", "vit_small", "vit_tiny"]


def test_a_mask_ratio_that_leaves_no_patch_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="leaves none of the 16 patches visible"):
        build_mae(registry, mask_ratio=0.95)


def test_method_mae_alone_is_the_official_recipe() -> None:
    """facebookresearch/mae @ efb2a80: PRETRAIN.md's command (--blr 1.5e-4 --weight_decay 0.05 --epochs 800
    --warmup_epochs 40 --norm_pix_loss --mask_ratio 0.75, effective batch 64 x 8 x 8 = 4096, --model
    mae_vit_base_patch16 for ViT-B), main_pretrain.py (torch.optim.AdamW(param_groups, lr=args.lr,
    betas=(0.9, 0.95)), args.lr = args.blr * eff_batch_size / 256, --min_lr 0, timm's add_weight_decay),
    util/lr_sched.py (warmup, then half-cycle cosine), models_mae.py (decoder_embed_dim=512, decoder_depth=8,
    decoder_num_heads=16)."""
    resolved = resolve({"method": "mae", "data": DATA}, registry_with_mae()).as_dict()
    train = resolved["train"]
    assert train["optimizer"] == {"name": "adamw", "lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05,
                                  "eps": 1e-8}
    assert train["lr_scaling"] == "linear" and train["warmup_epochs"] == 40
    assert train["schedule"] == "cosine" and train["final_lr"] == 0.0
    assert train["epochs"] == 800 and train["batch_size"] == 4096
    assert train["grad_clip"] is None and train["weight_decay_end"] is None
    assert train["param_groups"] == {"bias_and_norm": {"lr": None, "weight_decay": 0.0, "lars_exclude": False,
                                                       "fixed_lr": False}}
    method = resolved["method"]
    assert (method["decoder_width"], method["decoder_depth"], method["decoder_heads"]) == (512, 8, 16)
    assert method["mask_ratio"] == 0.75 and method["norm_pix_loss"] is True
    assert resolved["encoder"] == {"name": "vit_base", "image_size": 224, "patch_size": 16,
                                   "position_embedding": "sincos", "pool": "cls", "depth": None,
                                   "dynamic_img_size": False, "drop_path_rate": 0.0}
    assert resolved["augmentation"]["name"] == "mae" and resolved["augmentation"]["scale"] == [0.2, 1.0]


def official_lr(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """The lr at optimizer step t (0-based): linear warmup reaching the peak at the last warmup step, then
    half-cycle cosine from the peak to 0 over the remaining steps (util/lr_sched.py per iteration)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def test_the_example_decays_every_weight_but_no_bias_or_norm_through_the_schedule() -> None:
    """Through the engine: every 1-D parameter (biases, LayerNorms) at weight decay 0, every other trainable
    one at 0.05, the CLS and mask tokens included (timm's add_weight_decay), for every step of a short run
    whose lr follows the warmup and the cosine."""
    registry = registry_with_mae()
    batch, steps_per_epoch, epochs, warmup = 4, 2, 5, 2
    resolved = load_experiment(EXAMPLE, registry, [
        "encoder.depth=1", "method.decoder_depth=1", f"train.batch_size={batch}", f"train.epochs={epochs}",
        f"train.warmup_epochs={warmup}"]).as_dict()
    total = steps_per_epoch * epochs
    torch.manual_seed(0)
    method, optimization = build_for_training(resolved, registry, steps_per_epoch=steps_per_epoch)
    optimizer, scheduler = optimization.optimizer, optimization.scheduler
    assert optimization.grad_clip is None and optimization.weight_decay is None
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(method.named_parameters())
    trainable = {name: p for name, p in named.items() if p.requires_grad}
    assert len(decay_of) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)
    for name, p in trainable.items():
        assert decay_of[id(p)] == (0.0 if p.ndim == 1 else 0.05), name
    assert decay_of[id(named["backbone.class_token"])] == 0.05 and decay_of[id(named["decoder.mask_token"])] == 0.05
    assert any(name.endswith(".bias") for name, p in trainable.items() if decay_of[id(p)] == 0.0)

    peak = 1.5e-4 * batch / 256  # base lr x B / 256
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for step in range(total):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(official_lr(step, peak, warmup * steps_per_epoch, total), rel=1e-9,
                                                abs=1e-15), (step, group["group"])
            assert group["weight_decay"] == (0.0 if group["group"] == "bias_and_norm" else 0.05)
        optimizer.zero_grad(set_to_none=True)
        method([x])["loss"].backward()
        optimizer.step()
        scheduler.step()


def test_the_mae_augmentation_makes_one_cropped_and_flipped_view(registry: Registry) -> None:
    augmentation = registry.build("augmentation", {"name": "mae", "size": 32})
    image = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    views = augmentation.views(image)
    assert list(augmentation.view_sizes) == [32] and len(views) == 1 and views[0].shape == (3, 32, 32)
    names = [type(t).__name__ for t in augmentation.view_transforms[0].transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]
    assert augmentation.view_transforms[0].transforms[0].scale == (0.2, 1.0)
    moco = registry.build("augmentation", {"name": "moco_v2", "size": 32})
    assert torch.equal(augmentation.eval(image), moco.eval(image))  # the same eval transform
    check_component(registry, "augmentation", "mae")


def test_mae_meets_the_method_contract(registry: Registry) -> None:
    check_plugin(registry, "sslcore_mae.plugin", [("method", "mae")])


def test_the_installed_entry_point_registers_mae() -> None:
    check_entry_point("sslcore-mae", [("method", "mae")])
    method = Registry(autoload=True).get("method", "mae")
    assert method.factory is MAE
    assert method.slots["encoder"] == Slot(PatchEncoder, {"name": "vit_base", "patch_size": 16, "image_size": 224})
    assert method.slots["augmentation"].default == {"name": "mae"}


def test_cifar10_example_runs_draws_reconstructions_and_resumes(tmp_path: Path, cifar10_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_example_briefly(EXAMPLE, cifar10_dir, tmp_path, "encoder.depth=2")
    with Image.open(run_dir / "reconstructions_epoch000.png") as picture:  # before epoch 1: the untrained model
        assert picture.size == (8 * 128, 3 * 128)  # 8 images in 3 rows, the 32 px cells enlarged 4x
    assert (run_dir / "reconstructions_epoch001.png").is_file()  # at the end of training (on_train_end)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["subset"] for r in records if r["subset"] in ("epoch_start", "train_end")] == ["epoch_start", "train_end"]

    # resumed in this process (as the local backend runs it), for a second epoch with a picture before it
    monkeypatch.chdir(tmp_path)  # the example's aim repository, runs/.aim, is relative to it
    experiment = yaml.safe_load((run_dir / "config.yaml").read_text())
    experiment["train"]["epochs"] = 2
    experiment["method"]["picture_every_epochs"] = 1
    spec = WorkerSpec(experiment=experiment, run_dir=str(run_dir), plugins=("sslcore_mae.plugin",), autoload=False,
                      source="test")
    trainer = Trainer(spec, LocalSession(use_gpu=False), Console(interactive=False))
    last = trainer.fit()
    assert trainer.start_epoch == 1 and last["epoch"] == 1 and last["step"] == 4
    assert math.isfinite(last["loss"]) and 0.0 <= last["knn_top1"] <= 1.0
    assert (run_dir / "reconstructions_epoch002.png").is_file()
