"""VICReg for sslcore: invariance, variance and covariance terms on the embeddings of two views
(Bardes et al. 2022)."""

from sslcore_vicreg.vicreg import VICReg, VICRegConfig, VICRegLoss, VICRegLossConfig

__all__ = ["VICReg", "VICRegConfig", "VICRegLoss", "VICRegLossConfig"]
