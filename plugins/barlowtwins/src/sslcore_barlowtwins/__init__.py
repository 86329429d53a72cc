"""Barlow Twins for sslcore: the cross-correlation of two views' embeddings pulled to the identity
(Zbontar et al. 2021)."""

from sslcore_barlowtwins.barlowtwins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss, BarlowTwinsLossConfig

__all__ = ["BarlowTwins", "BarlowTwinsConfig", "BarlowTwinsLoss", "BarlowTwinsLossConfig"]
