"""PCL for sslcore: prototypical contrastive learning, an EM loop on MoCo (Li et al., ICLR 2021)."""

from sslcore_pcl.pcl import (
    PCL,
    PCLConfig,
    ProtoNCEConfig,
    ProtoNCELoss,
    Prototypes,
    PrototypicalLoss,
    concentration,
    sample_negative_prototypes,
)

__all__ = ["PCL", "PCLConfig", "ProtoNCEConfig", "ProtoNCELoss", "Prototypes", "PrototypicalLoss", "concentration",
           "sample_negative_prototypes"]
