"""Jigsaw for sslcore: a classifier of the permutation of 9 shuffled image tiles (Noroozi and Favaro 2016)."""

from sslcore_jigsaw.jigsaw import (
    Jigsaw,
    JigsawAugmentation,
    JigsawAugmentationConfig,
    JigsawConfig,
    permutation_set,
)

__all__ = ["Jigsaw", "JigsawAugmentation", "JigsawAugmentationConfig", "JigsawConfig", "permutation_set"]
