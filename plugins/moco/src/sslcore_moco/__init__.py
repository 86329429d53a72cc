"""MoCo v2 for sslcore: momentum contrast with a queue of negatives (He et al. 2020; Chen et al. 2020)."""

from sslcore_moco.moco import MoCo, MoCoConfig, MoCoProjectionHead

__all__ = ["MoCo", "MoCoConfig", "MoCoProjectionHead"]
