"""SimSiam for sslcore: a Siamese encoder, a predictor and a stop-gradient, nothing else (Chen & He 2021)."""

from sslcore_simsiam.simsiam import NegativeCosineConfig, NegativeCosineLoss, SimSiam, SimSiamConfig

__all__ = ["NegativeCosineConfig", "NegativeCosineLoss", "SimSiam", "SimSiamConfig"]
