"""Jigsaw: the permutation set against the greedy choice checked by brute force here, the tiles' geometry and
their normalisation, the shuffle convention (position j holds tile p(j)), the loss against the cross-entropy
written out, the permutation set in the checkpoint, the recipe of the official solver through the engine,
the plugin contract, and the CIFAR-10 example through the CLI (briefly, and resumed bit for bit)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sslcore_jigsaw import Jigsaw, JigsawAugmentation, JigsawAugmentationConfig, JigsawConfig, permutation_set
from sslcore_jigsaw.plugin import RECIPE, SLOTS

from sslcore.api.hookspecs import Augmentation, Encoder, Slot
from sslcore.config import resolve
from sslcore.engine.context import MethodContext
from sslcore.registry import Registry
from sslcore.testing import (
    build_for_training,
    built_slots,
    check_entry_point,
    check_plugin,
    resume_repeats_the_run,
    tiny_encoder,
)

EXAMPLE = Path(__file__).parents[3] / "examples" / "jigsaw_cifar10.yaml"
BATCH = 6
#: the example shrunk further for its 3 runs: 3 steps of 8 images from 30, the kNN on 32 px images of 20 test ones
TINY = ("train.batch_size=8", "data.max_per_class=3", "evaluators.0.data.max_per_class=2", "augmentation.eval_size=32")


def build_jigsaw(**method) -> Jigsaw:
    config = JigsawConfig(**{"num_permutations": 10, "tile_dim": 4, **method})
    context = MethodContext(world_size=1, rank=0, global_batch_size=BATCH, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=BATCH)
    return Jigsaw(config, context=context, slots=built_slots(encoder=tiny_encoder()))


def hamming(p: tuple[int, ...], q: tuple[int, ...]) -> int:
    return sum(a != b for a, b in zip(p, q))


def labelled_tiles(n: int = BATCH, side: int = 6) -> list[torch.Tensor]:
    """9 views whose tile k is filled with k + 1 plus a little noise: a tile's value names its grid position."""
    generator = torch.Generator().manual_seed(0)
    return [k + 1 + 0.01 * torch.randn(n, 3, side, side, generator=generator) for k in range(9)]


def formula_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """-(1/N) sum_i log softmax(logits_i)[label_i], one row at a time."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(logits)


@pytest.mark.parametrize("selection", ["max_avg", "max_min"])
def test_each_permutation_is_the_greedy_choice_found_by_brute_force(selection: str) -> None:
    """Permutations of 5 items: the first is the seed's uniform draw from all 120 in lexicographic order;
    every next one, of all not yet chosen, has the largest summed (max_avg, the paper's Algorithm 1) or
    smallest (max_min) Hamming distance to the chosen ones, the lexicographically first on a tie."""
    chosen = [tuple(p) for p in permutation_set(12, seed=3, selection=selection, num_items=5).tolist()]
    everything = list(itertools.permutations(range(5)))
    assert chosen[0] == everything[int(np.random.default_rng(3).integers(120))]

    def criterion(q: tuple[int, ...], chosen_so_far: list[tuple[int, ...]]) -> int:
        distances = [hamming(p, q) for p in chosen_so_far]
        return sum(distances) if selection == "max_avg" else min(distances)

    for i in range(1, len(chosen)):
        remaining = [q for q in everything if q not in chosen[:i]]
        best = max(criterion(q, chosen[:i]) for q in remaining)
        assert chosen[i] == next(q for q in remaining if criterion(q, chosen[:i]) == best), f"permutation {i}"


def test_the_permutation_set_is_distinct_and_reproducible_from_its_seed() -> None:
    for selection in ("max_avg", "max_min"):
        p = permutation_set(100, seed=0, selection=selection)
        assert p.shape == (100, 9) and p.dtype == torch.long
        assert all(sorted(row) == list(range(9)) for row in p.tolist())
        assert len({tuple(row) for row in p.tolist()}) == 100
        assert torch.equal(p, permutation_set(100, seed=0, selection=selection))
        assert not torch.equal(p, permutation_set(100, seed=1, selection=selection))
    distances = [hamming(p, q) for p, q in itertools.combinations(permutation_set(100, selection="max_min").tolist(),
                                                                   2)]
    assert min(distances) >= 6  # max_min keeps every pair far apart (the released 100-set's minimum is 2)
    with pytest.raises(ValueError, match="between 1 and"):
        permutation_set(121, num_items=5)


def test_tiles_come_from_their_cells_with_random_gaps_and_channel_offsets() -> None:
    """A 96 px image (resized to 96: unchanged), cells of 32 px, 24 px tiles: each channel of each tile is
    found in the image by search, inside its own cell, at most channel_jitter px from the tile's corner."""
    augmentation = JigsawAugmentation(JigsawAugmentationConfig(size=96, tile_size=24, channel_jitter=2,
                                                               grayscale_prob=0.0))
    assert augmentation.view_sizes == [24] * 9 and augmentation.cell == 32
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(image, (24, 24), axis=(0, 1))  # 73 x 73 x 3 x 24 x 24
    corners = set()
    for seed in range(4):
        augmentation.set_seed(seed)
        for k, tile in enumerate(augmentation.tiles(image)):
            row, col = divmod(k, 3)
            assert tile.shape == (3, 24, 24) and tile.dtype == np.uint8
            places = []
            for channel in range(3):
                (y,), (x,) = np.nonzero((windows[:, :, channel] == tile[channel]).all(axis=(2, 3)))
                assert 32 * row <= y <= 32 * row + 8 and 32 * col <= x <= 32 * col + 8, (k, channel, y, x)
                places.append((y, x))
            y0, x0 = min(y for y, _ in places), min(x for _, x in places)
            assert max(y for y, _ in places) - y0 <= 2 and max(x for _, x in places) - x0 <= 2
            corners.add((y0 - 32 * row, x0 - 32 * col))
    assert len(corners) > 10  # the gaps change from tile to tile


def test_each_tile_is_normalised_by_its_own_mean_and_std() -> None:
    augmentation = JigsawAugmentation(JigsawAugmentationConfig(size=96, tile_size=24))
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    augmentation.set_seed(7)
    tiles = augmentation.tiles(image)
    augmentation.set_seed(7)
    views = augmentation.views(image)
    assert len(views) == 9
    for tile, view in zip(tiles, views):
        assert view.shape == (3, 24, 24) and view.dtype == torch.float32
        for channel in range(3):
            pixels = tile[channel].astype(np.float64).ravel() / 255
            mean = pixels.sum() / pixels.size
            std = math.sqrt(((pixels - mean) ** 2).sum() / (pixels.size - 1))
            expected = (tile[channel].astype(np.float64) / 255 - mean) / std
            torch.testing.assert_close(view[channel].double(), torch.from_numpy(expected), atol=1e-5, rtol=0)
            assert view[channel].mean().item() == pytest.approx(0, abs=1e-5)
            assert view[channel].std().item() == pytest.approx(1, abs=1e-5)
    flat = np.full((40, 50, 3), 77, dtype=np.uint8)  # constant tiles: no division by zero
    assert all(torch.equal(v, torch.zeros(3, 24, 24)) for v in augmentation.views(flat))


def test_eval_and_labelled_transform_the_whole_image() -> None:
    augmentation = JigsawAugmentation(JigsawAugmentationConfig(size=96, eval_size=32))
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert augmentation.eval_size == 32 and augmentation.eval(image).shape == (3, 32, 32)
    assert augmentation.labelled(image).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        JigsawAugmentationConfig(size=96, tile_size=31)


def test_the_shuffle_puts_tile_p_j_at_position_j_and_the_loss_is_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = build_jigsaw().train()
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(out))

    torch.manual_seed(5)
    out = model(labelled_tiles())

    batch, logits = seen
    assert batch.shape == (9 * BATCH, 3, 6, 6)  # all 9N tiles through the shared encoder at once
    assert logits.shape == (BATCH, 10)
    permutations = model.permutations.tolist()
    labels = []
    for i in range(BATCH):
        order = [round(batch[9 * i + j].mean().item()) - 1 for j in range(9)]  # the tile at position j
        assert order in permutations, order
        labels.append(permutations.index(order))
    assert len(set(labels)) > 1  # a permutation drawn per image
    assert out["loss"].item() == pytest.approx(formula_loss(logits, torch.tensor(labels)), rel=1e-6)
    right = sum(int(max(range(10), key=lambda c: row[c]) == label) for row, label in zip(logits.tolist(), labels))
    assert out["permutation_accuracy"].item() == pytest.approx(right / BATCH)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())

    seen.clear()
    torch.manual_seed(5)  # the draw is torch's: the engine's restored random state repeats it
    model(labelled_tiles())
    assert torch.equal(seen[0], batch)


def test_the_loss_is_computed_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = build_jigsaw()
    seen: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(out))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(labelled_tiles())["loss"]
    torch.manual_seed(1)
    labels = torch.randint(10, (BATCH,))
    assert seen[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(formula_loss(seen[0].float(), labels), rel=1e-5)


def test_the_heads_and_the_permutation_set_in_the_checkpoint() -> None:
    model = build_jigsaw(hidden_dims=[16])
    assert [type(m).__name__ for m in model.tile_head] == ["Linear", "BatchNorm1d", "ReLU"]
    assert [(type(m).__name__, getattr(m, "in_features", None)) for m in model.classifier] == [
        ("Linear", 36), ("BatchNorm1d", None), ("ReLU", None), ("Linear", 16)]
    state = model.state_dict()
    assert torch.equal(state["permutations"], permutation_set(10, seed=0))
    other = build_jigsaw(hidden_dims=[16], permutation_seed=1)
    assert not torch.equal(other.permutations, model.permutations)
    other.load_state_dict(state)
    assert torch.equal(other.permutations, model.permutations)


def test_method_jigsaw_alone_resolves_to_the_official_solver(registry: Registry, tmp_path: Path) -> None:
    """MehdiNoroozi/JigsawPuzzleSolver @ 8c7ec09789555c269475de9707e5e6c7f6edbcf7 solver_cfn_jps.prototxt:
    base_lr 0.01, lr_policy "step", gamma 0.1, stepsize 100000, max_iter 350000, momentum 0.9,
    weight_decay 0.0005; train_val_cfn_jps.prototxt: batch_size 256, biases lr_mult 2 decay_mult 0,
    crop_size 255, patch_size 64, jitter_size 21 (85 px cells), the 100 permutations of
    permutations_100_max.bin."""
    registry.add_module("sslcore_jigsaw.plugin")
    experiment = resolve({"method": "jigsaw", "data": {"name": "image_folder", "root": str(tmp_path)}},
                         registry).as_dict()
    train = experiment["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                                  "nesterov": False}
    assert (train["epochs"], train["batch_size"], train["lr_scaling"], train["warmup_epochs"]) == \
        (70, 256, "linear", 0)
    assert (train["schedule"], train["milestones"], train["gamma"]) == ("step", [20, 40, 60], 0.1)
    iterations_per_epoch = 1_281_167 / 256  # ImageNet-1k
    assert [round(100_000 * k / iterations_per_epoch) for k in (1, 2, 3)] == [20, 40, 60]
    assert round(350_000 / iterations_per_epoch) == 70
    assert train["param_groups"] == {"bias_and_norm": {"lr": 0.02, "weight_decay": 0.0, "lars_exclude": False,
                                                       "fixed_lr": False}}
    assert experiment["method"] == {"name": "jigsaw", "num_permutations": 100, "permutation_seed": 0,
                                    "permutation_selection": "max_avg", "tile_dim": 1000, "hidden_dims": []}
    assert experiment["encoder"]["name"] == "resnet50"
    augmentation = registry.build("augmentation", experiment["augmentation"])
    assert (augmentation.size, augmentation.cell, augmentation.tile) == (255, 85, 64)
    assert augmentation.view_sizes == [64] * 9 and augmentation.eval_size == 224

    small = {**experiment, "encoder": {"name": "resnet18", "cifar_stem": True},
             "method": {**experiment["method"], "tile_dim": 8}}
    method, optimization = build_for_training(small, registry, steps_per_epoch=2)
    groups = {group["group"]: group for group in optimization.optimizer.param_groups}
    assert {id(p) for p in groups["bias_and_norm"]["params"]} == {id(p) for p in method.parameters() if p.ndim <= 1}
    assert (groups["rest"]["weight_decay"], groups["bias_and_norm"]["weight_decay"]) == (5e-4, 0.0)
    for step in range(140):
        factor = 0.1 ** sum(step // 2 >= milestone for milestone in (20, 40, 60))
        assert groups["rest"]["lr"] == pytest.approx(0.01 * factor), step
        assert groups["bias_and_norm"]["lr"] == pytest.approx(0.02 * factor), step
        optimization.optimizer.step()
        optimization.scheduler.step()


def test_jigsaw_meets_the_method_and_augmentation_contracts(registry: Registry) -> None:
    check_plugin(registry, "sslcore_jigsaw.plugin", [("method", "jigsaw"), ("augmentation", "jigsaw")])


def test_the_installed_entry_point_registers_jigsaw() -> None:
    check_entry_point("sslcore-jigsaw", [("method", "jigsaw"), ("augmentation", "jigsaw")])
    registry = Registry(autoload=True)
    method, augmentation = registry.get("method", "jigsaw"), registry.get("augmentation", "jigsaw")
    assert method.factory is Jigsaw and augmentation.factory is JigsawAugmentation
    assert method.slots == SLOTS == {"encoder": Slot(Encoder, {"name": "resnet50"}),
                                     "augmentation": Slot(Augmentation, {"name": "jigsaw"})}
    assert method.recipe == RECIPE


def test_cifar10_example_runs_as_written_and_resumes_bit_for_bit(tmp_path: Path, cifar10_dir: Path) -> None:
    """The example through the CLI (``run_example_briefly``: exit 0, a kNN top-1, a checkpoint), 2 epochs of
    3 steps, and the same run resumed inside epoch 1 and at its end: the same losses (the permutations
    drawn from the restored random state) and the same final model, P included."""
    resume_repeats_the_run(EXAMPLE, cifar10_dir, tmp_path, *TINY)
