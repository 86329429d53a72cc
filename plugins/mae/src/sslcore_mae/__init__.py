"""MAE for sslcore: masked autoencoders are scalable vision learners (He et al. 2022)."""

from sslcore_mae.mae import (
    MAE,
    MAEConfig,
    MAEDecoder,
    patchify,
    random_masking,
    reconstruction_loss,
    unpatchify,
)

__all__ = ["MAE", "MAEConfig", "MAEDecoder", "patchify", "random_masking", "reconstruction_loss", "unpatchify"]
