"""Projection and prediction heads: the MLPs that methods put on top of the encoder.

Every head of the methods in plugins/ is one :class:`MLPHead`; they differ only in widths, biases and
whether the output is batch-normalised:

========================  ====================================  ==========================================
method                    head                                  MLPHead
========================  ====================================  ==========================================
SimCLR (v2)               Linear-BN-ReLU-Linear-BN               ``[f, 2048, 128], hidden_bias=False,
                                                                output_bias=False, output_norm="bn"``
BYOL projector/predictor  Linear-BN-ReLU-Linear                  ``[f, 4096, 256]``
SimSiam projector         (Linear-BN-ReLU) x2 -Linear-BN         ``[f, 2048, 2048, 2048], hidden_bias=False,
                                                                output_bias=False, output_norm="bn_noaffine"``
Barlow Twins              (Linear-BN-ReLU) x2 -Linear, no biases ``[f, 8192, 8192, 8192], hidden_bias=False,
                                                                output_bias=False``
========================  ====================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

from torch import nn

OutputNorm = Literal["none", "bn", "bn_noaffine"]


class MLPHead(nn.Sequential):
    """``dims = [d_0, ..., d_L]``: L linear layers, each hidden one followed by BatchNorm1d and ReLU.

    ``hidden_bias`` / ``output_bias``: whether the hidden / last Linear has a bias (a bias right before a
    BatchNorm is cancelled by it, so papers leave it out there). ``output_norm``: "bn" adds a BatchNorm1d
    after the last Linear, "bn_noaffine" one without learnable scale and shift (SimSiam's projector).
    """

    def __init__(self, dims: Sequence[int], *, hidden_bias: bool = True, output_bias: bool = True,
                 output_norm: OutputNorm = "none") -> None:
        if len(dims) < 2:
            raise ValueError(f"an MLP head needs at least an input and an output width, got dims={list(dims)}")
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(dims[:-1]):
            layers += [nn.Linear(d_in, d_out, bias=hidden_bias), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=output_bias))
        if output_norm != "none":
            layers.append(nn.BatchNorm1d(dims[-1], affine=output_norm == "bn"))
        super().__init__(*layers)
        self.dims = list(dims)
