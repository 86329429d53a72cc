"""Datasets and data wrappers on real CIFAR-10 JPEGs, real broken files and real DataLoader workers."""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader

from sslcore.api.errors import TrainingError, UnreadableImage, UserError
from sslcore.engine.data import EpochSampler, EvalDataset, MultiViewDataset, seed_worker

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CropViews:
    """A small real augmentation: two random resized crops of 16 x 16, as tensors."""

    num_views = 2

    def __init__(self, seed: int = 0) -> None:
        self.compose = A.Compose([A.RandomResizedCrop(size=(16, 16), scale=(0.2, 1.0)), A.Normalize(),
                                  ToTensorV2()], seed=seed)
        self.center = A.Compose([A.CenterCrop(16, 16), A.Normalize(), ToTensorV2()])

    def views(self, image: np.ndarray) -> list[torch.Tensor]:
        return [self.compose(image=image)["image"] for _ in range(self.num_views)]

    def eval(self, image: np.ndarray) -> torch.Tensor:
        return self.center(image=image)["image"]

    def set_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)


@pytest.fixture
def folder(registry):
    def build(root: Path | str, **params) -> object:
        return registry.build("dataset", {"name": "image_folder", "root": str(root), **params})
    return build


@pytest.fixture
def broken_folder(cifar10_subset: dict[str, Path], tmp_path: Path) -> Path:
    """One class of 4 real JPEGs with a garbage .jpg and a truncated .jpg sorted among them."""
    cat = tmp_path / "broken" / "cat"
    cat.mkdir(parents=True)
    sources = sorted((cifar10_subset["train"] / "cat").iterdir())[:4]
    for i, source in enumerate(sources):
        shutil.copy(source, cat / f"{2 * i}.jpg")
    (cat / "1.jpg").write_bytes(b"this is not a jpeg" * 10)
    (cat / "3.jpg").write_bytes(sources[0].read_bytes()[:300])
    return tmp_path / "broken"


def test_image_folder_labels_classes_by_sorted_folder(folder, cifar10_subset):
    dataset = folder(cifar10_subset["train"])
    assert len(dataset) == 200
    assert dataset.classes == CIFAR10_CLASSES
    assert [dataset[i][1] for i in (0, 19, 20, 199)] == [0, 0, 1, 9]
    image, label = dataset[25]
    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    assert isinstance(label, int)


def test_image_folder_max_per_class_takes_first_files_in_sorted_order(folder, cifar10_subset):
    dataset = folder(cifar10_subset["train"], max_per_class=3)
    assert len(dataset) == 30
    expected = sorted((cifar10_subset["train"] / "bird").iterdir())[2]
    image, label = dataset[2 * 3 + 2]
    assert label == 2
    np.testing.assert_array_equal(image, np.array(Image.open(expected).convert("RGB")))


def test_image_folder_unlabeled(folder, cifar10_subset, tmp_path):
    dataset = folder(cifar10_subset["test"], labeled=False)
    assert len(dataset) == 100
    assert dataset.classes == []
    assert {dataset[i][1] for i in range(0, 100, 7)} == {-1}

    flat = tmp_path / "flat"
    flat.mkdir()
    for source in sorted((cifar10_subset["test"] / "ship").iterdir())[:3]:
        shutil.copy(source, flat / source.name.upper())  # extensions match case-insensitively
    (flat / "notes.txt").write_text("not an image")
    dataset = folder(flat)
    assert len(dataset) == 3
    assert dataset.classes == []
    assert dataset[0][1] == -1


def test_image_folder_refuses_images_beside_class_folders(folder, cifar10_subset, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(cifar10_subset["test"] / "frog", root / "frog")
    shutil.copy(next((cifar10_subset["test"] / "dog").iterdir()), root / "stray.jpg")
    with pytest.raises(UserError, match=r"stray\.jpg.*labeled: false"):
        folder(root)
    assert len(folder(root, labeled=False)) == 11


def test_image_folder_empty_or_missing_names_the_folder(folder, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError, match=re.escape(f"'{root}' (data.root)")):
            folder(root)


def test_config_rejects_unknown_keys(folder, tmp_path):
    with pytest.raises(ValueError, match="roots"):
        folder(tmp_path, roots="x")


@pytest.mark.parametrize(("mode", "suffix"), [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg")])
def test_every_image_mode_comes_out_rgb(folder, tmp_path, mode, suffix):
    Image.new(mode, (7, 5)).save(tmp_path / f"image.{suffix}")
    image, label = folder(tmp_path)[0]
    assert image.shape == (5, 7, 3)
    assert image.dtype == np.uint8
    assert label == -1


def test_unreadable_images_are_logged_once_and_skipped(folder, broken_folder, caplog):
    dataset = folder(broken_folder)
    assert len(dataset) == 6
    with pytest.raises(UnreadableImage) as raised:
        dataset[1]
    assert raised.value.path == str(broken_folder / "cat" / "1.jpg")

    views = MultiViewDataset(dataset, CropViews())
    evaluation = EvalDataset(dataset, CropViews().eval)
    with caplog.at_level(logging.WARNING, logger="sslcore.data"):
        for _ in range(2):
            crops, label, index = views[1]
            assert index == 1  # the requested position: per-sample state (PCL) follows the dataset's order
            assert len(crops) == 2
            assert crops[0].shape == (3, 16, 16)
            assert label == 0
            torch.testing.assert_close(evaluation[1][0], evaluation[2][0])  # garbage bytes
            torch.testing.assert_close(evaluation[3][0], evaluation[4][0])  # truncated JPEG
    # each wrapper logs each unreadable file it met once
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == [
        f"skipping unreadable image {broken_folder / 'cat' / name}" for name in ("1.jpg", "1.jpg", "3.jpg")]


def test_training_loader_keeps_full_batches_past_broken_images(folder, broken_folder):
    loader = DataLoader(MultiViewDataset(folder(broken_folder), CropViews()), batch_size=3, num_workers=2,
                        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 2
    for views, labels, _ in batches:
        assert len(views) == 2
        assert views[0].shape == (3, 3, 16, 16)
        assert labels.tolist() == [0, 0, 0]


def test_dataset_without_a_readable_image_is_a_training_error(folder, tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(TrainingError, match="no readable image"):
        EvalDataset(folder(tmp_path), CropViews().eval)[0]


def test_file_list_relative_absolute_and_comments(registry, cifar10_subset, tmp_path):
    horse = sorted((cifar10_subset["test"] / "horse").iterdir())
    (tmp_path / "images").mkdir()
    shutil.copy(horse[0], tmp_path / "images" / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# training images\n\nimages/a.jpg\n  {horse[1]}  \n#{horse[2]}\n")
    dataset = registry.build("dataset", {"name": "file_list", "path": str(listing)})
    assert len(dataset) == 2
    assert dataset.classes == []
    np.testing.assert_array_equal(dataset[0][0], np.array(Image.open(horse[0]).convert("RGB")))
    np.testing.assert_array_equal(dataset[1][0], np.array(Image.open(horse[1]).convert("RGB")))
    assert dataset[0][1] == dataset[1][1] == -1

    elsewhere = tmp_path / "lists" / "list.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("images/a.jpg\n")
    dataset = registry.build("dataset", {"name": "file_list", "path": str(elsewhere), "root": str(tmp_path)})
    assert dataset[0][0].shape == (32, 32, 3)


def test_file_list_missing_or_empty(registry, tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    for name in ("missing.txt", "empty.txt"):
        with pytest.raises(UserError, match=re.escape(f"'{tmp_path / name}'") + r".*\(data\.path\)"):
            registry.build("dataset", {"name": "file_list", "path": str(tmp_path / name)})


def test_cifar10_missing_without_download_names_root(registry, tmp_path):
    with pytest.raises(UserError, match=re.escape(f"no CIFAR-10 under '{tmp_path}'") + ".*download: true"):
        registry.build("dataset", {"name": "cifar10", "root": str(tmp_path), "download": False})
    assert list(tmp_path.iterdir()) == []


def test_seed_worker_makes_augmented_batches_reproducible(folder, cifar10_subset):
    dataset = MultiViewDataset(folder(cifar10_subset["train"], max_per_class=2), CropViews())

    def batches(seed: int) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        return list(DataLoader(dataset, batch_size=5, shuffle=True, num_workers=2, worker_init_fn=seed_worker,
                               generator=torch.Generator().manual_seed(seed)))

    run, rerun = batches(0), batches(0)
    assert len(run) == 4
    for (views, labels, index), (views_again, labels_again, index_again) in zip(run, rerun, strict=True):
        assert torch.equal(labels, labels_again) and torch.equal(index, index_again)
        assert all(torch.equal(a, b) for a, b in zip(views, views_again, strict=True))
    assert not all(torch.equal(a[0][0], b[0][0]) for a, b in zip(run, batches(1), strict=True))


def test_an_items_views_depend_only_on_the_epoch_seed_and_its_index(folder, cifar10_subset):
    """Views are the same whatever the loader workers, the order and the items read before (so an epoch
    resumed at a batch repeats the rest of it), and change with the epoch's seed."""
    dataset = MultiViewDataset(folder(cifar10_subset["test"], max_per_class=1), CropViews())
    dataset.set_seed(7)
    direct = [torch.cat(dataset[i][0]) for i in reversed(range(len(dataset)))][::-1]

    def loaded(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=5, num_workers=workers, worker_init_fn=seed_worker,
                            generator=torch.Generator().manual_seed(workers))
        return [torch.cat([v[j] for v in batch_views]) for batch_views, _, _ in loader for j in range(5)]

    for views in (loaded(0), loaded(2)):
        assert all(torch.equal(a, b) for a, b in zip(views, direct, strict=True))
    dataset.set_seed(8)
    assert not torch.equal(torch.cat(dataset[3][0]), direct[3])


def test_epoch_sampler_shards_an_epoch_and_starts_at_any_batch():
    def shard(rank: int, epoch: int, start: int = 0, world_size: int = 2) -> list[int]:
        sampler = EpochSampler(103, seed=5, rank=rank, world_size=world_size, batch_size=4)
        sampler.set_epoch(epoch, start)
        assert len(sampler) == len(list(sampler))
        return list(sampler)

    first, second = shard(0, epoch=0), shard(1, epoch=0)
    assert len(first) == len(second) == 51 and not set(first) & set(second)  # the tail of 1 dropped
    assert sorted(shard(0, 0, world_size=1)) == list(range(103))
    assert shard(0, epoch=0) == first and shard(0, epoch=1) != first
    assert shard(0, epoch=0, start=3) == first[12:]  # batches 0..2 of 4 images skipped, none read


def test_datasets_wrappers_and_errors_pickle(folder, cifar10_subset):
    dataset = folder(cifar10_subset["test"], max_per_class=2)
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[5][0], dataset[5][0])
    assert clone.classes == CIFAR10_CLASSES
    assert clone[5][1] == dataset[5][1]
    evaluation = EvalDataset(dataset, CropViews().eval)
    torch.testing.assert_close(pickle.loads(pickle.dumps(evaluation))[7][0], evaluation[7][0])
    views, label, index = pickle.loads(pickle.dumps(MultiViewDataset(dataset, CropViews())))[7]
    assert index == 7
    assert len(views) == 2
    assert label == 3
    error = pickle.loads(pickle.dumps(UnreadableImage("/x.jpg", "OSError: truncated")))
    assert (error.path, error.reason) == ("/x.jpg", "OSError: truncated")
    assert str(error) == "/x.jpg: OSError: truncated"
