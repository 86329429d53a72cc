"""embedding_plot: t-SNE and UMAP maps of real CIFAR-10 features written as PNGs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sslcore.api.errors import UserError
from sslcore.engine.context import EvalContext

torch.set_num_threads(1)


def test_tsne_and_umap_pngs_of_real_features(registry, cifar10_subset, tmp_path) -> None:
    evaluator = registry.build("evaluator", {"name": "embedding_plot", "methods": ["tsne", "umap"],
                                              "perplexity": 10, "n_neighbors": 10,
                                              "data": {"name": "image_folder", "root": str(cifar10_subset["test"])}})
    augmentation = registry.build("augmentation", {"name": "moco_v2", "size": 32})
    context = EvalContext(registry=registry, eval_transform=augmentation.eval, train_data={},
                          device=torch.device("cpu"), batch_size=50, num_workers=0, run_dir=tmp_path, epoch=4)
    torch.manual_seed(0)
    encoder = registry.build("encoder", {"name": "resnet18"}).eval()
    metrics = evaluator.evaluate(encoder, context)
    assert set(metrics) == {"tsne_kl_divergence"} and metrics["tsne_kl_divergence"] > 0
    for method in ("tsne", "umap"):
        with Image.open(tmp_path / f"embedding_{method}_epoch005.png") as image:
            assert image.size == (700, 600)
            assert len(image.convert("RGB").getcolors(2**16) or range(2**16)) > 10  # points in many colours

    context.run_dir = None
    with pytest.raises(UserError, match="writes a PNG into the run folder"):
        evaluator.evaluate(encoder, context)
