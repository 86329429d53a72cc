"""DeepCluster v2 for sslcore: spherical k-means of a memory of embeddings, then cluster prediction over
multi-crop (Caron et al., NeurIPS 2020)."""

from sslcore_deepclusterv2.deepclusterv2 import (
    UNASSIGNED,
    ClusterPredictionLoss,
    DeepClusterV2,
    DeepClusterV2Config,
    DeepClusterV2Loss,
    DeepClusterV2LossConfig,
    spherical_kmeans,
)

__all__ = ["UNASSIGNED", "ClusterPredictionLoss", "DeepClusterV2", "DeepClusterV2Config", "DeepClusterV2Loss",
           "DeepClusterV2LossConfig", "spherical_kmeans"]
