"""RotNet for sslcore: a classifier of the rotation (0, 90, 180, 270 degrees) of each image (Gidaris et al. 2018)."""

from sslcore_rotnet.rotnet import (
    RotNet,
    RotNetAugmentation,
    RotNetAugmentationConfig,
    RotNetConfig,
    rotate,
)

__all__ = ["RotNet", "RotNetAugmentation", "RotNetAugmentationConfig", "RotNetConfig", "rotate"]
