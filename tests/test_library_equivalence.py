"""sslcore's own code against what torch and torchvision already do: the same results where sslcore uses the
library, and the differences that the notes in sslcore give as the reason where it does not.

- ``gather_with_grad`` (sslcore/toolkit/distributed.py) and ``torch.distributed.nn.functional.all_gather``:
  the same values and gradients (both backwards sum the incoming gradients); sslcore keeps its own because
  torch 2.14 deprecates torch's.
- The picture grids of MAE and PCL are torchvision's ``make_grid`` now: pixel for pixel the pictures of the
  code they replace, kept here as the reference.
- The folder scan of ``image_folder`` (sslcore/components/datasets.py) and torchvision's ``find_classes``,
  ``make_dataset`` and ``has_file_allowed_extension``: the same files on flat class folders, different ones
  where the note in ``_scan`` says.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.distributed.nn.functional import all_gather
from torch.nn.parallel import DistributedDataParallel
from torchvision.datasets.folder import find_classes, has_file_allowed_extension, make_dataset

from sslcore.api.errors import UserError
from sslcore.components.datasets import IMAGE_EXTENSIONS, _folder_files
from sslcore.testing import run_distributed
from sslcore.toolkit.distributed import gather_with_grad

GLOBAL_BATCH = 8


# --- gather with gradient ---------------------------------------------------------------------------------


def _torch_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat(all_gather(tensor))


GATHERS = {"sslcore": gather_with_grad, "torch": _torch_all_gather}


def _inputs() -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def _global_loss(z: torch.Tensor) -> torch.Tensor:
    """A loss that couples all samples: the squared norm of the batch's Gram matrix, per sample."""
    return (z @ z.T).square().sum() / z.shape[0]


def _gradients_with_each_gather(rank: int, world_size: int) -> dict[str, object]:
    """Per gather: the gathered embeddings, and after the backward of the loss on them the gradient of this
    worker's inputs and DDP's (averaged) weight gradient; and the warnings each gather raised."""
    results: dict[str, object] = {}
    for name, gather in GATHERS.items():
        mine = _inputs().chunk(world_size)[rank].requires_grad_()
        model = DistributedDataParallel(_model())
        embeddings = model(mine)
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            z_all = gather(embeddings)
        _global_loss(z_all).backward()
        results[name] = {"z_all": z_all.detach(), "input_grad": mine.grad, "weight_grad": model.module.weight.grad}
        results[f"{name}_warnings"] = [f"{w.category.__name__}: {w.message}" for w in raised]
    return results


def test_gather_with_grad_is_torchs_all_gather_in_values_and_gradients() -> None:
    """Every worker computes the loss of the whole gathered batch, so worker r's rows get the gradient of W
    identical losses: both backwards sum them (W x one process's gradient of those rows; a mean would give
    1 x), and DDP's mean over the workers' weight gradients is then one process's gradient.

    And the reason sslcore keeps its own: torch's is deprecated. Once torch takes the warning back (or removes
    the function), this fails and the note in gather_with_grad is due."""
    inputs = _inputs().requires_grad_()
    model = _model()
    z = model(inputs)
    _global_loss(z).backward()

    world_size = 2
    results = run_distributed(_gradients_with_each_gather, world_size=world_size)

    for rank, result in enumerate(results):
        for name in GATHERS:
            torch.testing.assert_close(result[name]["z_all"], z.detach())
            torch.testing.assert_close(result[name]["input_grad"], world_size * inputs.grad.chunk(world_size)[rank])
            torch.testing.assert_close(result[name]["weight_grad"], model.weight.grad)
        for key in ("z_all", "input_grad", "weight_grad"):
            assert torch.equal(result["sslcore"][key], result["torch"][key]), (rank, key)
        assert result["sslcore_warnings"] == []
        assert any(w.startswith("FutureWarning") and "all_gather is deprecated" in w
                   for w in result["torch_warnings"]), result["torch_warnings"]


# --- picture grids ----------------------------------------------------------------------------------------


def _mae_picture_before(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor,
                        p: int) -> Image.Image:
    """sslcore_mae.mae.picture_grid as it was, with the grid made of nested torch.cat."""
    low = images.amin(dim=(2, 3), keepdim=True)
    span = (images.amax(dim=(2, 3), keepdim=True) - low).clamp(min=1e-6)
    original = (images - low) / span
    side = images.shape[-1] // p
    masked_pixels = mask.reshape(-1, 1, side, side).repeat_interleave(p, 2).repeat_interleave(p, 3).bool()
    masked = original.masked_fill(masked_pixels, 0.5)
    rows = [original, masked, ((reconstruction - low) / span).clamp(0, 1)]
    factor = max(1, 128 // images.shape[-1])
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    grid = grid.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.mark.parametrize(("n", "size", "patch"), [(1, 32, 4), (5, 32, 8), (2, 48, 16), (3, 160, 16)])
def test_mae_picture_is_the_hand_made_grid(n: int, size: int, patch: int) -> None:
    from sslcore_mae.mae import picture_grid

    generator = torch.Generator().manual_seed(n)
    images = torch.randn(n, 3, size, size, generator=generator)
    reconstruction = images + 0.3 * torch.randn(n, 3, size, size, generator=generator)
    mask = (torch.rand(n, (size // patch) ** 2, generator=generator) < 0.75).float()

    picture = picture_grid(images, reconstruction, mask, patch)

    expected = _mae_picture_before(images, reconstruction, mask, patch)
    assert picture.size == expected.size == (n * size * max(1, 128 // size), 3 * size * max(1, 128 // size))
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))


def _pcl_grid_before(rows: list[list[np.ndarray]], cell: int) -> Image.Image:
    """sslcore_pcl.pcl.write_prototype_grid's picture as it was: cells pasted onto a white PIL image."""
    grid = Image.new("RGB", (cell * len(rows[0]), cell * len(rows)), "white")
    for row, images in enumerate(rows):
        for col, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((cell, cell), Image.BICUBIC), (col * cell, row * cell))
    return grid


@pytest.mark.parametrize(("shape", "cell"), [((3, 5), 64), ((1, 1), 64), ((2, 4), 17)])
def test_pcl_prototype_grid_is_the_hand_made_grid(cifar10_subset: dict[str, Path], shape: tuple[int, int],
                                                  cell: int) -> None:
    from sslcore_pcl.pcl import image_grid

    files = sorted((cifar10_subset["train"] / "horse").iterdir())
    images = [np.asarray(Image.open(file).convert("RGB")) for file in files]
    images[1] = images[1][3:23, 1:29].copy()  # a 20 x 28 crop: cells of any size are resized
    count, length = shape
    rows = [images[r * length:(r + 1) * length] for r in range(count)]

    picture = image_grid(rows, cell)

    expected = _pcl_grid_before(rows, cell)
    assert picture.size == expected.size == (cell * length, cell * count)
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))


# --- the folder scan --------------------------------------------------------------------------------------


def _torchvision_files(root: Path, max_per_class: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """torchvision's ImageFolder scan (find_classes, make_dataset with sslcore's extensions and empty classes
    allowed), the first ``max_per_class`` of each class, as sslcore's (classes, relative paths, labels)."""
    classes, class_to_index = find_classes(root)
    samples = make_dataset(root, class_to_index, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    kept = [[path for path, label in samples if label == i][:max_per_class] for i in range(len(classes))]
    paths = [os.path.relpath(path, root) for files in kept for path in files]
    return classes, paths, [label for label, files in enumerate(kept) for _ in files]


def _image(path: Path, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, path)


@pytest.fixture
def jpeg(cifar10_subset: dict[str, Path]) -> Path:
    return sorted((cifar10_subset["test"] / "cat").iterdir())[0].resolve()


def test_flat_class_folders_scan_as_torchvision_does(tmp_path: Path, jpeg: Path) -> None:
    root = tmp_path / "flat"
    for name in ("b.jpg", "a.JPG", "c.Png", "d.jpeg", "10.jpg", "9.jpg"):
        _image(root / "bird" / name, jpeg)
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "bird" / "e.gif").write_bytes(jpeg.read_bytes())  # an extension outside the list
    _image(root / "cat" / "x.webp", jpeg)
    (root / "cat" / "link.jpg").symlink_to(jpeg)  # a symlinked file
    (root / "dog").mkdir()  # an empty class folder: a class with no files
    _image(tmp_path / "elsewhere" / "y.bmp", jpeg)
    (root / "eagle").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a symlinked class folder

    for max_per_class in (None, 2):
        expected = _torchvision_files(root, max_per_class)
        assert _folder_files(str(root), True, IMAGE_EXTENSIONS, max_per_class) == expected
    assert expected[0] == ["bird", "cat", "dog", "eagle"]
    assert expected[1][:2] == ["bird/10.jpg", "bird/9.jpg"]  # sorted as strings, as sslcore always did
    names = ["a.JPG", "b.jpg", "c.Png", "d.TIFF", "e.gif", "f.jpg.txt", "g", ".jpg"]
    assert [n.lower().endswith(IMAGE_EXTENSIONS) for n in names] == [
        has_file_allowed_extension(n, IMAGE_EXTENSIONS) for n in names]


def test_scan_differs_from_torchvision_where_the_note_says(registry, tmp_path: Path, jpeg: Path) -> None:
    root = tmp_path / "tree"
    for name in ("cat/b.jpg", "cat/a/z.jpg", "cat/.x.jpg", "cat/._b.jpg", "cat/.cache/y.jpg", "dog/d.jpg",
                 ".ipynb_checkpoints/c.jpg"):
        _image(root / name, jpeg)
    classes, paths, _ = _folder_files(str(root), True, IMAGE_EXTENSIONS, None)
    assert classes == ["cat", "dog"] and paths == ["cat/a/z.jpg", "cat/b.jpg", "dog/d.jpg"]

    torchvision_classes, torchvision_paths, _ = _torchvision_files(root)
    assert torchvision_classes == [".ipynb_checkpoints", "cat", "dog"]  # a hidden folder is a class
    assert torchvision_paths[1:6] == ["cat/._b.jpg", "cat/.x.jpg", "cat/b.jpg", "cat/.cache/y.jpg", "cat/a/z.jpg"]

    # an is_valid_file that skips hidden paths gives the same files, but in another order: folder by folder
    def visible_image(path: str) -> bool:
        relative = os.path.relpath(path, root)
        return relative.lower().endswith(IMAGE_EXTENSIONS) and not any(
            part.startswith(".") for part in relative.split(os.sep))

    samples = make_dataset(root, {"cat": 0, "dog": 1}, is_valid_file=visible_image)
    in_order = [os.path.relpath(path, root) for path, _ in samples]
    assert sorted(in_order) == paths and in_order != paths  # max_per_class=1 would pick cat/b.jpg, not cat/a/z.jpg

    # a symlink loop: torchvision lists its files once per level, up to the kernel's limit of 40 links
    (root / "dog" / "again").symlink_to(".", target_is_directory=True)
    looped = make_dataset(root, {"dog": 0}, extensions=IMAGE_EXTENSIONS)
    assert len(looped) > 30 and {Path(path).name for path, _ in looped} == {"d.jpg"}
    with pytest.raises(UserError, match=r"cannot read the folder .*again.* \(data\.root\).*move it out of root"):
        registry.build("dataset", {"name": "image_folder", "root": str(root)})
