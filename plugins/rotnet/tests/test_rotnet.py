"""RotNet: the rotations against index arithmetic written out here (and the official ``rotate_img``), the loss
against the cross-entropy written out, the 4N batch and the rotation accuracy, the official CIFAR transform,
two real gloo workers against one process, the recipe of the official code through the engine, the plugin
contract, and the CIFAR-10 example through the CLI (briefly, and resumed bit for bit)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sslcore_rotnet import RotNet, RotNetAugmentation, RotNetAugmentationConfig, RotNetConfig, rotate
from sslcore_rotnet.plugin import RECIPE, SLOTS

from sslcore.api.hookspecs import Augmentation, Encoder, Slot
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_entry_point,
    check_plugin,
    check_workers_match_one_process,
    resume_repeats_the_run,
    tiny_encoder,
)

EXAMPLE = Path(__file__).parents[3] / "examples" / "rotnet_cifar10.yaml"
GLOBAL_BATCH = 8
#: the example shrunk further for its 3 runs: 3 steps of 8 images (32 rotated) from 30, the kNN on 20 test ones
TINY = ("train.batch_size=8", "data.max_per_class=3", "evaluators.0.data.max_per_class=2")
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # the official dataloader.py, GenericDataset('cifar10')
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def build_rotnet(**method) -> RotNet:
    context = MethodContext(world_size=1, rank=0, global_batch_size=GLOBAL_BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=GLOBAL_BATCH)
    return RotNet(RotNetConfig(**method), context=context, slots=built_slots(encoder=tiny_encoder()))


def images(n: int = GLOBAL_BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def rotated_by_hand(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: C x S x S rotated by 90 k degrees counter-clockwise, pixel by pixel."""
    s = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(s):
        for j in range(s):
            source = {0: (i, j), 1: (j, s - 1 - i), 2: (s - 1 - i, s - 1 - j), 3: (s - 1 - j, i)}[k]
            out[:, i, j] = x[:, source[0], source[1]]
    return out


def official_rotate_img(img: np.ndarray, rot: int) -> np.ndarray:
    """gidariss/FeatureLearningRotNet dataloader.py rotate_img, on an H x W x C array, as written there."""
    if rot == 0:
        return img
    if rot == 90:
        return np.flipud(np.transpose(img, (1, 0, 2)))
    if rot == 180:
        return np.fliplr(np.flipud(img))
    return np.transpose(np.flipud(img), (1, 0, 2))


def formula_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """-(1/M) sum_m log softmax(logits_m)[label_m], one row at a time."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(logits)


def test_the_four_rotations_are_exact_and_labelled_in_the_official_order() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    rotated, labels = rotate(x)
    assert rotated.shape == (8, 3, 5, 5)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for i in range(2):
        for k in range(4):
            assert torch.equal(rotated[4 * i + k], rotated_by_hand(x[i], k))
            official = official_rotate_img(x[i].permute(1, 2, 0).numpy(), 90 * k)
            assert torch.equal(rotated[4 * i + k], torch.from_numpy(official.copy()).permute(2, 0, 1))


def test_one_forward_classifies_4n_rotated_images_with_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = build_rotnet().train()
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(out))
    x = images()

    out = model([x])

    batch, logits = seen
    assert batch.shape == (4 * GLOBAL_BATCH, 3, 8, 8) and logits.shape == (4 * GLOBAL_BATCH, 4)
    assert torch.equal(batch, rotate(x)[0])
    labels = torch.arange(4).repeat(GLOBAL_BATCH)
    assert out["loss"].item() == pytest.approx(formula_loss(logits, labels), rel=1e-6)
    right = sum(int(max(range(4), key=lambda c: row[c]) == label) for row, label in zip(logits.tolist(),
                                                                                          labels.tolist()))
    assert out["rotation_accuracy"].item() == pytest.approx(right / (4 * GLOBAL_BATCH))
    assert sorted(out) == ["loss", "rotation_accuracy"] and not out["rotation_accuracy"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_loss_is_computed_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = build_rotnet()
    logits: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda module, args, out: logits.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model([images()])["loss"]
    assert logits[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    labels = torch.arange(4).repeat(GLOBAL_BATCH)
    assert loss.item() == pytest.approx(formula_loss(logits[0].float(), labels), rel=1e-5)


def test_the_classifier_is_a_linear_layer_or_the_alexnet_fc_block() -> None:
    assert [type(m).__name__ for m in build_rotnet().classifier] == ["Linear"]
    layers = build_rotnet(hidden_dims=[16, 12]).classifier
    assert [(type(m).__name__, getattr(m, "bias", None) is not None) for m in layers] == [
        ("Linear", False), ("BatchNorm1d", True), ("ReLU", False),
        ("Linear", False), ("BatchNorm1d", True), ("ReLU", False), ("Linear", True)]
    assert layers[-1].out_features == 4


def test_the_cifar_transform_is_a_random_crop_of_the_zero_padded_image_and_a_flip() -> None:
    """dataloader.py: RandomCrop(32, padding=4), RandomHorizontalFlip, then Normalize(mean_pix, std_pix)."""
    augmentation = RotNetAugmentation(RotNetAugmentationConfig(size=32, crop="padded", padding=4, mean=CIFAR_MEAN,
                                                               std=CIFAR_STD))
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.zeros((40, 40, 3), dtype=np.float32)
    padded[4:36, 4:36] = image
    normalised = torch.from_numpy((padded / 255 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)).permute(2, 0, 1)
    candidates = {(dy, dx, flip): crop.flip(-1) if flip else crop
                  for dy in range(9) for dx in range(9) for flip in (False, True)
                  for crop in [normalised[:, dy:dy + 32, dx:dx + 32].float()]}
    found = set()
    for seed in range(40):
        augmentation.set_seed(seed)
        (view,) = augmentation.views(image)
        assert view.shape == (3, 32, 32) and view.dtype == torch.float32
        matches = [key for key, crop in candidates.items() if torch.allclose(view, crop, atol=1e-5)]
        assert matches, f"seed {seed}: the view is no crop of the padded image"
        found.update(matches)
    assert len({key[:2] for key in found}) > 10 and {key[2] for key in found} == {False, True}
    # the test transform of the official code is none at all: the image, normalised
    expected = torch.from_numpy((image / 255 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)).permute(2, 0, 1)
    torch.testing.assert_close(augmentation.eval(image), expected.float(), atol=1e-5, rtol=0)


def one_batch() -> list[torch.Tensor]:
    return [images()]


def test_two_workers_compute_the_loss_and_gradients_of_one_process() -> None:
    """Nothing is gathered: each worker's loss is the mean over its own 4N/2 images, and DDP's mean of the
    gradients is the gradient of one process on the global batch."""
    check_workers_match_one_process(build_rotnet, one_batch)


def test_method_rotnet_alone_resolves_to_the_official_imagenet_recipe(registry: Registry, tmp_path: Path) -> None:
    """gidariss/FeatureLearningRotNet @ edafaba6561003292017d0a44272414356c959ff config/ImageNet_RotNet_AlexNet.py:
    batch_size 192, max_num_epochs 50, 'optim_type': 'sgd', 'momentum': 0.9, 'weight_decay': 5e-4,
    'nesterov': True, 'LUT_lr': [(15, 0.01), (30, 0.001), (45, 0.0001), (50, 0.00001)] (applied from epoch 0
    by Algorithm.adjust_learning_rates, so 'lr': 0.1 is never used); random_sized_crop True."""
    registry.add_module("sslcore_rotnet.plugin")
    experiment = resolve({"method": "rotnet", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                                  "nesterov": True}
    assert (train["epochs"], train["batch_size"], train["lr_scaling"], train["warmup_epochs"]) == (50, 192, "none", 0)
    assert (train["schedule"], train["milestones"], train["gamma"]) == ("step", [15, 30, 45], 0.1)
    assert (train["grad_clip"], train["weight_decay_end"], train["param_groups"]) == (None, None, {})
    assert experiment["method"] == {"name": "rotnet", "hidden_dims": []}
    assert experiment["encoder"]["name"] == "resnet50"
    assert experiment["augmentation"] == {"name": "rotnet", "size": 224, "crop": "resized", "scale": [0.08, 1.0],
                                          "padding": 4, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

    method, optimization = build_for_training({**experiment, "encoder": {"name": "resnet18", "cifar_stem": True}},
                                              registry, steps_per_epoch=2)
    official_lut = [(15, 0.01), (30, 0.001), (45, 0.0001), (50, 0.00001)]
    for step in range(100):
        epoch = step // 2
        expected = next((lr for max_epoch, lr in official_lut if max_epoch > epoch), official_lut[-1][1])
        assert optimization.optimizer.param_groups[0]["lr"] == pytest.approx(expected), f"epoch {epoch}"
        optimization.optimizer.step()
        optimization.scheduler.step()
    (group,) = optimization.optimizer.param_groups  # weight decay on every parameter, biases and BN too
    assert group["group"] == "rest" and group["weight_decay"] == 5e-4 and group["nesterov"]
    assert {id(p) for p in group["params"]} == {id(p) for p in method.parameters()}


def test_rotnet_meets_the_method_and_augmentation_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_rotnet.plugin", [("method", "rotnet"), ("augmentation", "rotnet")])


def test_the_installed_entry_point_registers_rotnet() -> None:
    check_entry_point("sslcore-rotnet", [("method", "rotnet"), ("augmentation", "rotnet")])
    registry = Registry(autoload=True)
    method, augmentation = registry.get("method", "rotnet"), registry.get("augmentation", "rotnet")
    assert method.factory is RotNet and augmentation.factory is RotNetAugmentation
    assert method.slots == SLOTS == {"encoder": Slot(Encoder, {"name": "resnet50"}),
                                     "augmentation": Slot(Augmentation, {"name": "rotnet"})}
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written_and_resumes_bit_for_bit(tmp_path: Path, cifar10_dir: Path) -> None:
    """The example through the CLI (``run_example_briefly``: exit 0, a kNN top-1, a checkpoint), 2 epochs of
    3 steps, and the same run resumed inside epoch 1 and at its end: the same losses and final model."""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, *TINY)
