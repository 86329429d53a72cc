"""Multi-crop: views of several sizes (SwAV's and DINO's 2 global + V local crops) through one network.

Views of the same side are concatenated and go through the network as one batch, one forward per
resolution, as DINO's ``MultiCropWrapper`` (facebookresearch/dino ``utils.py``) and SwAV's
``ResNet.forward`` do: a ResNet pools any side to its features; a ViT needs ``dynamic_img_size`` for sides
other than its image_size. BatchNorm statistics are then those of every crop of that resolution together,
as in the official code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby

import torch


def encode_crops(module: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``module`` of every view, in view order: (N_0 + ... + N_{V-1}) x D.

    ``views``: V batches of N_v x 3 x S_v x S_v; each run of consecutive views of the same side is one call of
    ``module`` on their concatenation (so 2 x 224 + 6 x 96 px crops are two forwards).
    """
    outputs = []
    for _, run in groupby(views, key=lambda view: tuple(view.shape[-2:])):
        outputs.append(module(torch.cat(list(run))))
    return torch.cat(outputs)
