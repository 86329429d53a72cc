"""SwAV for sslcore: each crop predicts the Sinkhorn codes of another crop of the same image over a set of
prototypes (Caron et al. 2020)."""

from sslcore_swav.swav import SwappedPredictionLoss, SwAV, SwAVConfig, SwAVLoss, SwAVLossConfig

__all__ = ["SwAV", "SwAVConfig", "SwAVLoss", "SwAVLossConfig", "SwappedPredictionLoss"]
