"""SimCLR for sslcore: NT-Xent between the two views of each image against the whole batch (Chen et al. 2020)."""

from sslcore_simclr.simclr import NTXentConfig, NTXentLoss, SimCLR, SimCLRConfig, contrastive_accuracy

__all__ = ["NTXentConfig", "NTXentLoss", "SimCLR", "SimCLRConfig", "contrastive_accuracy"]
