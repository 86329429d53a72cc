"""NNCLR for sslcore: the nearest neighbour in a support set of past embeddings is the positive (Dwibedi et al.
2021)."""

from sslcore_nnclr.nnclr import NNCLR, NNCLRConfig, SupportSet, SupportSetConfig

__all__ = ["NNCLR", "NNCLRConfig", "SupportSet", "SupportSetConfig"]
