"""BYOL for sslcore: an online network predicts an EMA target's projection of the other view (Grill et al. 2020)."""

from sslcore_byol.byol import BYOL, BYOLConfig, BYOLLoss, BYOLLossConfig

__all__ = ["BYOL", "BYOLConfig", "BYOLLoss", "BYOLLossConfig"]
