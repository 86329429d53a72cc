"""The contract every component meets, checked on tiny CPU inputs (see :func:`sslcore.testing.check_component`).

Each kind's check builds the component from its defaults (datasets and evaluators get a small folder of
images made here) and exercises the interface documented in :mod:`sslcore.api.hookspecs`.
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sslcore.api.errors import UserError
from sslcore.engine.context import EvalContext, MethodContext
from sslcore.registry import Registry


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(c * 100 + i)).save(root / f"class{c}" / f"{i}.png")
    return root


def _check_augmentation(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    aug = build({})
    aug.set_seed(0)
    views = aug.views(_image())
    if len(views) != aug.num_views:
        raise AssertionError(f"{name}: views() returned {len(views)} views, num_views is {aug.num_views}")
    for view in views:
        if not (view.dtype == torch.float32 and view.ndim == 3 and view.shape[0] == 3):
            raise AssertionError(f"{name}: a view must be a 3 x S x S float tensor, got {view.shape} {view.dtype}")
    aug.set_seed(0)
    if not all(torch.equal(a, b) for a, b in zip(views, aug.views(_image()))):
        raise AssertionError(f"{name}: set_seed does not make views reproducible")
    if aug.eval(_image()).shape[0] != 3:
        raise AssertionError(f"{name}: eval() must return a 3 x S x S tensor")
    pickle.loads(pickle.dumps(aug))


def _check_encoder(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    encoder = build({})
    out = encoder(torch.randn(2, 3, 32, 32))
    if out.shape != (2, encoder.feature_dim):
        raise AssertionError(f"{name}: output {tuple(out.shape)}, expected (2, feature_dim={encoder.feature_dim})")
    out.sum().backward()
    if not any(p.grad is not None for p in encoder.parameters()):
        raise AssertionError(f"{name}: no gradient reached the parameters")


def _check_negative_source(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    source = build({}, dim=8, global_batch_size=4, dataset_size=16)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    index = torch.tensor([3, 0, 9, 15])  # the images' dataset indices
    negatives, exclude = source.negatives(q, k, index)
    if negatives.ndim != 2 or negatives.shape[1] != 8:
        raise AssertionError(f"{name}: negatives must be K x D, got {tuple(negatives.shape)}")
    if exclude is not None and exclude.shape != (4, negatives.shape[0]):
        raise AssertionError(f"{name}: exclude must be N x K, got {tuple(exclude.shape)}")
    positive = getattr(source, "positive", None)
    if positive is not None and positive(k, index).shape != k.shape:
        raise AssertionError(f"{name}: positive(k, index) must be N x D like k")
    source.update(k, index)
    clone = build({}, dim=8, global_batch_size=4, dataset_size=16)
    clone.load_state_dict(source.state_dict())


def _check_loss(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    loss_fn = build({})
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    if is_paired_loss(loss_fn):  # loss(z1, z2): the embeddings of two views
        k.requires_grad_()
        loss = loss_fn(q, k)
    else:  # loss(q, k, negatives, exclude)
        loss = loss_fn(q, k, torch.nn.functional.normalize(torch.randn(16, 8), dim=1), None)
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise AssertionError(f"{name}: the loss must be a finite scalar, got {loss}")
    loss.backward()
    if q.grad is None:
        raise AssertionError(f"{name}: no gradient reached the queries")


def is_paired_loss(loss_fn: torch.nn.Module) -> bool:
    """True for a loss called ``loss(z1, z2)`` (two required arguments), False for a contrastive
    ``loss(q, k, negatives, exclude)``."""
    parameters = inspect.signature(loss_fn.forward).parameters.values()
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(required) == 2


def _check_dataset(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    if name == "cifar10":  # needs the CIFAR-10 binaries, and tests never download: the missing-data error
        try:
            build({"root": str(tmp / "no_cifar"), "download": False})
        except UserError as exc:
            if "download: true" not in str(exc):
                raise AssertionError(f"{name}: the missing-data error must say how to fix it: {exc}") from None
            return
        raise AssertionError(f"{name}: building without data and without download must be a UserError")
    root = _image_folder(tmp / "images")
    params = {"root": str(root)}
    if name == "file_list":
        listing = tmp / "files.txt"
        listing.write_text("\n".join(str(p) for p in sorted(root.rglob("*.png"))))
        params = {"path": str(listing)}
    dataset = build(params)
    image, label = dataset[0]
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise AssertionError(f"{name}: items must be H x W x 3 uint8 arrays")
    if not isinstance(label, int):
        raise AssertionError(f"{name}: labels must be ints (-1 when unlabeled)")


def _check_evaluator(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    root = _image_folder(tmp / "eval_images", per_class=16)  # low_shot_svm's default k goes up to 16
    block = {"name": "image_folder", "root": str(root)}
    evaluator = build({"data": block})
    aug = registry.get("augmentation", "moco_v2").build({"size": 32})
    context = EvalContext(registry=registry, eval_transform=aug.eval, train_data=block,
                          device=torch.device("cpu"), batch_size=4, num_workers=0, run_dir=tmp)
    encoder = registry.get("encoder", "resnet18").build({"cifar_stem": False}).eval()
    results = evaluator.evaluate(encoder, context)
    if not results or not all(isinstance(v, float) for v in results.values()):
        raise AssertionError(f"{name}: evaluate() must return a non-empty dict of floats, got {results}")


def _check_clustering(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    clustering = build({"num_clusters": [4, 8]})  # two granularities, small enough for 64 samples
    if list(clustering.num_clusters) != [4, 8]:
        raise AssertionError(f"{name}: num_clusters must list K of each granularity, got {clustering.num_clusters}")
    results = clustering.fit(torch.nn.functional.normalize(torch.randn(64, 8), dim=1))
    if [r.centroids.shape for r in results] != [(4, 8), (8, 8)]:
        raise AssertionError(f"{name}: fit() must return one result per granularity with K x D centroids")
    for result in results:
        k = result.centroids.shape[0]
        if result.assignments.shape != (64,) or not 0 <= int(result.assignments.min()) <= int(
                result.assignments.max()) < k:
            raise AssertionError(f"{name}: assignments must be N cluster ids in [0, K)")
        if not torch.allclose(result.centroids.norm(dim=1), torch.ones(k), atol=1e-4):
            raise AssertionError(f"{name}: centroids must be L2-normalised")
        if result.distances.shape != (64,) or bool((result.distances < 0).any()):
            raise AssertionError(f"{name}: distances must be N non-negative squared distances")


def _check_method(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    from sslcore.config import resolve
    from sslcore.engine.loop import build_method

    batch = 16  # MoCo's default 8 BN groups need at least 2 samples each
    # ``method: NAME`` alone, resolved as an experiment file would be: the method's slot defaults
    experiment = resolve({"method": name, "data": {"name": "image_folder", "root": str(tmp)}}, registry).as_dict()
    encoder = experiment.get("encoder")
    if encoder is not None and "image_size" in encoder:  # an encoder built for one image size (a ViT): 32 px here
        encoder["image_size"] = 32
    context = MethodContext(world_size=1, rank=0, global_batch_size=batch, steps_per_epoch=2, epochs=1,
                            device=torch.device("cpu"), registry=registry, dataset_size=batch)
    method = build_method(experiment, registry, context)
    aug = registry.build("augmentation", {**experiment.get("augmentation", {"name": "moco_v2"}), "size": 32})
    views = [torch.stack(v) for v in zip(*(aug.views(_image(i)) for i in range(batch)))]
    # as sslcore's loop: the images' dataset indices for a forward that takes them
    takes_index = "index" in inspect.signature(method.forward).parameters
    out = method(views, index=torch.arange(batch)) if takes_index else method(views)
    loss = out["loss"]
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise AssertionError(f"{name}: forward() must return a finite scalar 'loss', got {loss}")
    loss.backward()
    if not any(p.grad is not None for p in method.parameters()):
        raise AssertionError(f"{name}: no gradient reached the parameters")
    if not isinstance(method.backbone, torch.nn.Module):
        raise AssertionError(f"{name}: the method must expose its encoder as .backbone")


CHECKS = {"augmentation": _check_augmentation, "encoder": _check_encoder,
          "negative_source": _check_negative_source, "loss": _check_loss, "dataset": _check_dataset,
          "evaluator": _check_evaluator, "clustering": _check_clustering, "method": _check_method}


def check(registry: Registry, kind: str, name: str) -> None:
    """Raise AssertionError naming the component when it breaks its kind's contract."""
    component = registry.get(kind, name)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        CHECKS[kind](registry, name, lambda params, **kw: component.build(params, **kw), Path(tmp))
