"""Jigsaw: Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles (Noroozi and Favaro,
ECCV 2016), following the paper (Sec. 3 and Algorithm 1) and the official Caffe code,
MehdiNoroozi/JigsawPuzzleSolver @ 8c7ec09789555c269475de9707e5e6c7f6edbcf7 (train_val_cfn_jps.prototxt,
solver_cfn_jps.prototxt, caffe-master-jps++/src/caffe/data_transformer.cpp), checked against
bbrattoli/JigsawPuzzlePytorch @ ec85994b9f244d08652a3975c1c7a55483cdfc05 and facebookresearch/vissl @
09270ed25a6c2cf71263d955b64cbe076d34ac45 (its ResNet-50 head).

A square image is cut into a 3 x 3 grid of cells; from each cell a tile smaller than the cell is cropped at
a random place (255 px images, 85 px cells, 64 px tiles: random gaps between the tiles, so that edges and
textures continuing across tiles are no shortcut), and each tile is normalised by its own mean and standard
deviation (no shortcut by the tiles' brightness and contrast). The tiles x_0..x_8 are in grid (row-major)
order. A permutation p of {0..8} is drawn from a fixed set P of |P| permutations, the tiles are shuffled
so that position j holds tile p(j) (the official ``dst_rcts[i] = src_rcts[H[i]]``), and the context-free
network solves the puzzle: the same encoder f (shared weights: all 9N tiles are one batch) and a per-tile
head h embed every tile on its own, the 9 embeddings are concatenated in the shuffled order, and a
classifier c predicts which permutation of P was applied, trained with the cross-entropy

    loss = -(1/N) sum_i log softmax(c([h(f(x_p(0))), ..., h(f(x_p(8)))]))_{index of p in P}.

P is chosen by Algorithm 1 of the paper: start from a permutation drawn at random from all 9! and add, one
at a time, the permutation whose Hamming distance to those already chosen is largest: on average (the
paper's D_bar = 1^T D, the released permutation files, bbrattoli's and VISSL's ``max_avg``), or at the
minimum (VISSL's ``max_min``). On AlexNet, h is fc6 (1024) and c is fc7 (4096) then fc8; on a ResNet, VISSL's
head: h = Linear-BN-ReLU to 1000 and c one Linear (9000 -> |P|). Only f is kept.
"""

from __future__ import annotations

import itertools
import math
import random
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from sslcore.api.hookspecs import Method, Slots
from sslcore.components.augmentations import IMAGENET_MEAN, IMAGENET_STD, OneViewConfig, ViewAugmentation
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext

#: tiles per side of the puzzle grid, and tiles per puzzle
GRID = 3
NUM_TILES = GRID * GRID

Selection = Literal["max_avg", "max_min"]


# -- the permutation set ----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _permutation_set(num_permutations: int, seed: int, selection: Selection, num_items: int) -> np.ndarray:
    candidates = np.array(list(itertools.permutations(range(num_items))), dtype=np.int8)  # n! x n, lexicographic
    columns = candidates.T.copy()  # n x n!: one position per row, so that comparing with a permutation is fast
    chosen = [int(np.random.default_rng(seed).integers(len(candidates)))]  # j ~ U[1, n!]
    available = np.ones(len(candidates), dtype=bool)
    score = None  # D_bar: each candidate's summed (max_avg) or smallest (max_min) distance to the chosen set
    for _ in range(num_permutations - 1):
        available[chosen[-1]] = False
        distance = (columns != candidates[chosen[-1]][:, None]).sum(axis=0, dtype=np.int32)  # Hamming, n!
        if score is None:
            score = distance
        else:
            score = score + distance if selection == "max_avg" else np.minimum(score, distance)
        chosen.append(int(np.where(available, score, -1).argmax()))  # ties: the first in lexicographic order
    permutations = candidates[chosen].astype(np.int64)
    permutations.setflags(write=False)
    return permutations


def permutation_set(num_permutations: int, seed: int = 0, selection: Selection = "max_avg",
                    num_items: int = NUM_TILES) -> torch.Tensor:
    """P: ``num_permutations`` x ``num_items`` (long), permutations of 0..num_items-1 chosen greedily for a
    large Hamming distance between them (the paper's Algorithm 1; see the module docstring), the first drawn
    uniformly from all of them with ``numpy.random.default_rng(seed)``. Candidates are taken in
    lexicographic order, and a tie goes to the first. 100 of 9! take ~0.2 s, 1000 ~0.5 s."""
    if not 1 <= num_permutations <= math.factorial(num_items):
        raise ValueError(f"num_permutations must be between 1 and {num_items}! = {math.factorial(num_items)}, "
                         f"got {num_permutations}")
    return torch.from_numpy(_permutation_set(num_permutations, seed, selection, num_items).copy())


# -- the method -------------------------------------------------------------------------------------------

class JigsawConfig(BaseModel):
    """The ``method: {name: jigsaw, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    num_permutations: int = Field(100, ge=2, le=10_000,
                                  description="|P|, the classes of the puzzle (the released Caffe prototxt: 100; "
                                              "the paper's best: 1000; VISSL: 100, 2000, 10000).")
    permutation_seed: int = Field(0, ge=0, description="Seed of the random first permutation of P.")
    permutation_selection: Selection = Field(
        "max_avg", description="max_avg: add the permutation of the largest summed Hamming distance to the chosen "
                               "ones (the paper's Algorithm 1); max_min: of the largest minimum distance.")
    tile_dim: PositiveInt = Field(1000, description="Width of the per-tile head h, Linear-BN-ReLU (VISSL's ResNet "
                                                    "head: 1000; the paper's fc6: 1024).")
    hidden_dims: list[PositiveInt] = Field(
        default_factory=list, description="Widths of the Linear-BN-ReLU layers of the classifier c before its "
                                          "|P|-way Linear ([]: VISSL's ResNet head; the paper's fc7: [4096]).")


class Jigsaw(nn.Module, Method):
    """The context-free network: the backbone f and the per-tile head h on every tile, the classifier c
    on the 9 concatenated embeddings; see the module docstring.

    ``forward`` takes the augmentation's 9 views (the tiles in grid order) and draws each image's
    permutation with torch's random generator, whose state the engine checkpoints. It returns the
    cross-entropy under ``loss`` and the fraction of puzzles solved under ``permutation_accuracy``. P is a
    buffer: checkpoints hold it.
    """

    def __init__(self, config: JigsawConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # f, shared by the 9 tiles
        self.tile_head = nn.Sequential(nn.Linear(encoder.feature_dim, config.tile_dim),
                                       nn.BatchNorm1d(config.tile_dim), nn.ReLU(inplace=True))  # h
        self.classifier = MLPHead([NUM_TILES * config.tile_dim, *config.hidden_dims, config.num_permutations],
                                  hidden_bias=False)  # c
        self.register_buffer("permutations", permutation_set(config.num_permutations, config.permutation_seed,
                                                             config.permutation_selection))  # P: |P| x 9

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tiles = torch.stack(views, dim=1)  # N x 9 x 3 x t x t, grid order
        n = tiles.shape[0]
        labels = torch.randint(len(self.permutations), (n,)).to(tiles.device)  # N: the index of p in P
        order = self.permutations[labels]  # N x 9: position j holds tile p(j)
        shuffled = tiles[torch.arange(n, device=tiles.device)[:, None], order]  # N x 9 x 3 x t x t
        batch = shuffled.flatten(0, 1)  # 9N x 3 x t x t: image i's tiles in rows 9i..9i+8, in shuffled order
        if views[0].is_contiguous(memory_format=torch.channels_last):  # keep the engine's memory format
            batch = batch.contiguous(memory_format=torch.channels_last)
        embeddings = self.tile_head(self.backbone(batch))  # 9N x d
        logits = self.classifier(embeddings.reshape(n, -1))  # N x |P|, from N x 9d
        with torch.autocast(logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "permutation_accuracy": accuracy}


# -- the augmentation -------------------------------------------------------------------------------------

class JigsawAugmentationConfig(BaseModel):
    """Parameters of the jigsaw augmentation: the puzzle image, its cells and tiles, and the eval transform."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(255, ge=GRID, description="Side of the puzzle image: the image's shorter side is resized to "
                                                "size x 256/255, then its center size x size crop is cut into "
                                                "3 x 3 cells of size // 3 (255: 85 px cells, the official code).")
    tile_size: PositiveInt | None = Field(
        None, description="Side of the tiles cropped from the cells (the official 64 of 85). Default: the official "
                          "ratio, round(cell x 64 / 85).")
    channel_jitter: int = Field(2, ge=0, description="Each colour channel of a tile is taken up to this many pixels "
                                                     "off the others, in x and y (the official data_transformer.cpp: "
                                                     "0-2 px, against chromatic aberration); 0: none.")
    grayscale_prob: float = Field(0.3, ge=0, le=1, description="Probability of a grayscale puzzle (bbrattoli's "
                                                               "list of the paper's shortcuts: 30%).")
    eval_size: int = Field(224, gt=0, description="Side of the eval and labelled transforms of the whole image.")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean of the eval and "
                                                                       "labelled transforms (the tiles are "
                                                                       "normalised each by its own).")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        IMAGENET_STD, description="Per-channel standard deviation of the eval and labelled transforms.")

    @property
    def cell_size(self) -> int:
        return self.size // GRID

    @property
    def tile(self) -> int:
        """The tile side, given or by the official ratio 64 / 85."""
        return self.tile_size if self.tile_size is not None else round(self.cell_size * 64 / 85)

    @model_validator(mode="after")
    def _tiles_fit_their_cells(self) -> JigsawAugmentationConfig:
        if self.tile < 2:
            raise ValueError(f"tiles of {self.tile} px have no standard deviation to normalise by: raise size "
                             f"or tile_size")
        if self.tile + self.channel_jitter > self.cell_size:
            raise ValueError(f"a {self.tile} px tile with channel_jitter {self.channel_jitter} does not fit a "
                             f"{self.cell_size} px cell (size {self.size} // 3): lower tile_size or channel_jitter")
        return self


class JigsawAugmentation(ViewAugmentation):
    """The 9 tiles of a puzzle as 9 views (grid order, row-major), each normalised by its own mean and
    standard deviation per channel; ``eval`` and ``labelled`` transform the whole image (the core's resize
    and center crop, and its random crop and flip, at ``eval_size``) for evaluators.

    The image is resized (shorter side to ``size`` x 256/255) and center-cropped to ``size``, as the
    official ``generate_jps_dataset``, made grayscale with ``grayscale_prob``; in each cell the tile's
    corner is uniform over the positions that keep the tile, with its channels' offsets of up to
    ``channel_jitter``, inside the cell.
    """

    def __init__(self, config: JigsawAugmentationConfig) -> None:
        import albumentations as A

        super().__init__([], OneViewConfig(size=config.eval_size, mean=config.mean, std=config.std))
        self.size, self.cell, self.tile = config.size, config.cell_size, config.tile
        self.channel_jitter = config.channel_jitter
        self.view_sizes = [self.tile] * NUM_TILES
        self.puzzle_image = A.Compose([
            A.SmallestMaxSize(max_size=round(self.size * 256 / 255)),
            A.CenterCrop(height=self.size, width=self.size),
            A.ToGray(p=config.grayscale_prob),
        ])
        self.rng = np.random.default_rng(0)

    def tiles(self, image: np.ndarray) -> list[np.ndarray]:
        """``image``: H x W x 3 uint8 RGB -> the 9 tiles before normalisation, 3 x t x t uint8, grid order."""
        puzzle = self.puzzle_image(image=image)["image"]  # size x size x 3
        room = self.cell - self.tile - self.channel_jitter  # the tile's corner moves over 0..room in its cell
        tiles = []
        for row, col in itertools.product(range(GRID), range(GRID)):
            dy_tile, dx_tile = self.rng.integers(0, room + 1, 2)
            y, x = row * self.cell + dy_tile, col * self.cell + dx_tile  # the tile's corner
            shifts = self.rng.integers(0, self.channel_jitter + 1, (3, 2))  # (dy, dx) of each channel
            tiles.append(np.stack([puzzle[y + dy:y + dy + self.tile, x + dx:x + dx + self.tile, channel]
                                   for channel, (dy, dx) in enumerate(shifts)]))
        return tiles

    def views(self, image: np.ndarray) -> list[torch.Tensor]:
        """``image``: H x W x 3 uint8 RGB -> the 9 tiles, 3 x t x t float32, each channel of each tile of
        mean 0 and (unbiased) standard deviation 1 (a constant channel: 0)."""
        views = []
        for tile in self.tiles(image):
            pixels = tile.astype(np.float32) / 255
            mean = pixels.mean(axis=(1, 2), keepdims=True)
            std = pixels.std(axis=(1, 2), ddof=1, keepdims=True)
            views.append(torch.from_numpy((pixels - mean) / np.where(std > 0, std, 1)))
        return views

    def set_seed(self, seed: int) -> None:
        """Reseed the puzzle image's grayscale draw, the tiles' places and the labelled transform."""
        self.puzzle_image.set_random_state(np.random.default_rng(seed), random.Random(seed))
        self.rng = np.random.default_rng([seed, 1])
        super().set_seed(seed)
