"""sslcore's built-in components, each module a plugin registered through the same hooks as any other.

``augmentations`` (moco_v2, simclr, byol, mae, swav, dino), ``encoders`` (resnet18, resnet50, vit_tiny,
vit_small, vit_base), ``timm_encoders`` (timm: any timm architecture, with ``sslcore[timm]``), ``negatives``
(in_batch, queue, memory_bank, ...), ``losses``, ``clustering`` (faiss_kmeans, sinkhorn), ``evaluators`` (knn,
probes), ``datasets`` (image_folder, file_list, cifar10) and ``optimizers``.
"""
