"""Built-in datasets: a folder of images (``image_folder``), a list of files (``file_list``), ``cifar10``.

Items are ``(image, label)``: ``image`` an H x W x 3 uint8 RGB array, ``label`` an int (-1 when unlabeled).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset

from sslcore import hookimpl
from sslcore.api.errors import UserError
from sslcore.api.hookspecs import RegisterDataset
from sslcore.toolkit.images import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
logger = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Image files decoded on access: the common part of ``image_folder`` and ``file_list``.

    Paths are kept as one numpy byte-string array rather than a list of str: DataLoader workers touching
    Python objects would copy them page by page (reference counts), numpy arrays stay shared.
    """

    def __init__(self, root: str, relative_paths: Iterable[str], labels: Iterable[int],
                 classes: list[str]) -> None:
        self.root = root
        self.classes = classes
        self._paths = np.array([os.fsencode(p) for p in relative_paths], dtype=bytes)
        self._labels = np.fromiter(labels, dtype=np.int64, count=len(self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def targets(self) -> np.ndarray:
        """Every item's label (-1: unlabeled), without decoding the images."""
        return self._labels

    def path(self, index: int) -> str:
        """The file of item ``index`` (under ``root``)."""
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = self.path(index)
        return load_image(path), int(self._labels[index])


def _scan(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Image files under ``folder`` and its subfolders, as sorted paths relative to ``folder``.

    Hidden files and folders (``.name``) are skipped: editor checkpoints, macOS ``._`` resource forks.

    Not torchvision's ``make_dataset``, which gives the same files for flat class folders (with an
    ``is_valid_file`` that skips hidden paths; tests/test_library_equivalence.py) but walks with ``os.walk``,
    which passes over a folder it cannot list without a word (an unreadable subfolder; a symlink loop, whose
    files it then lists 40 times), orders nested files folder by folder (so ``max_per_class`` picks other
    files), descends into hidden folders and has no unlabeled layout. The extension test is the one of
    torchvision's ``has_file_allowed_extension``, written out: the driver scans the folder before a run
    starts (``check_data``), and importing torchvision there would cost ~2.5 s of every start.
    """
    found: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(folder, relative)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = os.path.join(relative, entry.name) if relative else entry.name
                if entry.is_dir():
                    pending.append(path)
                elif entry.name.lower().endswith(extensions):
                    found.append(path)
    return sorted(found)


def _class_files(root: str, classes: list[str], extensions: tuple[str, ...],
                 max_per_class: int | None) -> tuple[list[str], list[int]]:
    """The files of each class folder (the first ``max_per_class`` in sorted order) and their labels."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _scan(os.path.join(root, name), extensions)[:max_per_class]
        paths += [os.path.join(name, file) for file in files]
        labels += [label] * len(files)
    return paths, labels


def _folder_files(root: str, labeled: bool, extensions: tuple[str, ...],
                  max_per_class: int | None) -> tuple[list[str], list[str], list[int]]:
    """The classes (the sorted class folders; none when unlabeled), image paths and labels of ``root``.

    Not torchvision's ``find_classes``, which counts hidden folders (``.ipynb_checkpoints``) as classes and
    raises where a folder of images without class folders is read unlabeled here.
    """
    with os.scandir(root) as entries:
        top = [e for e in entries if not e.name.startswith(".")]
    class_names = sorted(e.name for e in top if e.is_dir())
    loose = sorted(e.name for e in top if not e.is_dir() and e.name.lower().endswith(extensions))
    if labeled and class_names and loose:
        raise UserError(f"image_folder: '{root}' holds both class subfolders and {len(loose)} images "
                        f"outside them (e.g. '{loose[0]}') (data.root): move those images into a class "
                        "folder, or set labeled: false to read every image unlabeled")
    if labeled and class_names:
        return class_names, *_class_files(root, class_names, extensions, max_per_class)
    paths = _scan(root, extensions)[:max_per_class]
    return [], paths, [-1] * len(paths)


class ImageFolderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="Folder of class subfolders of images (labels by sorted folder name), "
                                  "or of images directly (unlabeled). '~' is expanded.")
    labeled: bool = Field(True, description="Label images by class subfolder; false: every image under "
                                            "root, in any subfolder, with label -1.")
    max_per_class: int | None = Field(None, ge=1, description="Keep the first N files of each class in "
                                                              "sorted order (of the whole folder when "
                                                              "unlabeled), for fixed subsets.")
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), min_length=1,
                                  description="File extensions read as images, case-insensitive.")

    @field_validator("extensions")
    @classmethod
    def _normalize_extensions(cls, extensions: list[str]) -> list[str]:
        return [("" if e.startswith(".") else ".") + e.lower() for e in extensions]


class ImageFolderDataset(ImageFiles):
    """Images in ``root/<class>/...`` labeled by sorted class name, or anywhere under ``root``, unlabeled.

    Files within a class are sorted by path, so ``max_per_class`` selects the same subset on every machine.
    """

    def __init__(self, config: ImageFolderConfig) -> None:
        root = os.path.expanduser(config.root)
        extensions = tuple(config.extensions)
        layout = "class subfolders of " if config.labeled else ""
        hint = f"point root at a folder of {layout}{'/'.join(extensions)} images"
        if not os.path.isdir(root):
            raise UserError(f"image_folder: no folder '{root}' (data.root): {hint}")
        try:
            classes, paths, labels = _folder_files(root, config.labeled, extensions, config.max_per_class)
        except OSError as exc:  # a folder that cannot be listed (permissions, a broken mount)
            raise UserError(f"image_folder: cannot read the folder '{exc.filename}' under '{root}' (data.root): "
                            f"{exc.strerror or exc}; make it readable or move it out of root") from None
        if not paths:
            raise UserError(f"image_folder: no images found under '{root}' (data.root): {hint}")
        filled = set(labels)
        empty = [name for label, name in enumerate(classes) if label not in filled]
        if empty:
            logger.warning("image_folder: %d class folder(s) under '%s' (data.root) hold no %s images: %s; they "
                           "still count as classes (labels 0..%d); remove them or add images",
                           len(empty), root, "/".join(extensions), ", ".join(empty), len(classes) - 1)
        super().__init__(root, paths, labels, classes)


class FileListConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Text file with one image path per line; blank lines and lines starting "
                                  "with '#' are ignored. '~' is expanded.")
    root: str | None = Field(None, description="Folder that relative paths in the list are relative to; "
                                               "default: the list file's folder.")


class FileListDataset(ImageFiles):
    """The images named in a text file, one path per line, unlabeled."""

    def __init__(self, config: FileListConfig) -> None:
        list_path = os.path.expanduser(config.path)
        try:
            with open(list_path, encoding="utf-8") as file:
                lines = [line.strip() for line in file]
        except OSError as exc:
            raise UserError(f"file_list: cannot read the image list '{list_path}' (data.path): "
                            f"{exc.strerror or exc}; point path at a text file of image paths") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"file_list: the image list '{list_path}' is not UTF-8 text (byte {exc.start}) "
                            "(data.path): point path at a text file of image paths, saved as UTF-8") from None
        paths = [line for line in lines if line and not line.startswith("#")]
        if not paths:
            raise UserError(f"file_list: the image list '{list_path}' names no image (data.path): "
                            "write one image path per line")
        root = os.path.expanduser(config.root) if config.root else os.path.dirname(os.path.abspath(list_path))
        super().__init__(root, paths, [-1] * len(paths), [])


class Cifar10Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("~/.cache/sslcore/torchvision",
                      description="Folder holding torchvision's cifar-10-batches-py. '~' is expanded.")
    train: bool = Field(True, description="The 50,000 training images; false: the 10,000 test images.")
    download: bool = Field(False, description="Download CIFAR-10 into root when missing (needs internet).")


class Cifar10Dataset(Dataset):
    """CIFAR-10 in torchvision's binary format (``torchvision.datasets.CIFAR10``), 32 x 32 images."""

    def __init__(self, config: Cifar10Config) -> None:
        from torchvision.datasets import CIFAR10

        root = os.path.expanduser(config.root)
        try:
            cifar = CIFAR10(root, train=config.train, download=config.download)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            raise UserError(f"cifar10: no CIFAR-10 under '{root}' (data.root): set download: true (needs "
                            "internet) or use image_folder on an unpacked copy") from None
        self.data: np.ndarray = cifar.data  # N x 32 x 32 x 3 uint8
        self.targets = np.asarray(cifar.targets, dtype=np.int64)
        self.classes: list[str] = list(cifar.classes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        # a copy: an augmentation working in place must not change the dataset
        return self.data[index].copy(), int(self.targets[index])


@hookimpl
def register_datasets(register: RegisterDataset) -> None:
    register("image_folder", ImageFolderDataset, config=ImageFolderConfig)
    register("file_list", FileListDataset, config=FileListConfig)
    register("cifar10", Cifar10Dataset, config=Cifar10Config)
