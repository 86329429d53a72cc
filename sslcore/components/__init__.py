"""sslcore's built-in components, each module a plugin registered through the same hooks as any other.

``augmentations`` (moco_v2), ``encoders`` (resnet18, resnet50), ``negatives`` (in_batch, queue),
``losses`` (info_nce), ``clustering`` (faiss_kmeans, sinkhorn) and ``evaluators`` (knn).
"""
