"""The contract every component meets, checked on tiny CPU inputs (see :func:`sslcore.testing.check_component`).

Each kind's check builds the component from its defaults (a required parameter from the first of its
``Field(examples=[...])``; datasets and evaluators get a small folder of images made here), with torch
seeded, checks it against its kind's protocol in :mod:`sslcore.api.hookspecs` (an AssertionError naming the
members it lacks) and exercises that interface:

- augmentation: ``views`` of a 32 x 32 image are one float32 3 x S x S tensor per ``view_sizes`` entry, the
  same again after ``set_seed`` with the same seed; ``eval`` and ``labelled`` give 3 x eval_size x eval_size;
  it pickles (loader workers get a copy); a DeviceAugmentation's ``device_views`` of a padded batch of two
  images of different sizes are float32 N x 3 x S x S per view, the same from generators of one seed.
- encoder: a 2 x 3 x S x S batch (S: ``input_size``, or 32) gives 2 x ``feature_dim``; a gradient reaches
  its parameters.
- negative_source (``dim=8, global_batch_size=4, dataset_size=16``): ``negatives(q, k, index)`` of 4 unit
  queries and keys (with indices when ``needs_index``) is K x 8 and ``exclude`` None or 4 x K; ``positive``
  is shaped like k; ``update`` runs; its state_dict loads into a fresh one.
- loss: called as its class declares, ``loss(q, k, negatives, None)`` (4 x 8 unit rows, 16 unit negatives)
  or ``loss(z1, z2)`` (4 x 8): a finite 0-dim loss whose gradient reaches q (z1), and ``metrics()`` detached
  0-dim tensors; a loss with its plugin's own call only has that protocol's members (its method's check
  runs it).
- dataset: built on a folder of 2 classes x 4 PNGs (``file_list``: a list of them): ``targets`` as long as the
  dataset, items ``(H x W x 3 uint8 array, int)``; ``cifar10`` without its files and ``download: false``:
  a UserError that says ``download: true``.
- evaluator: on a folder of 2 classes x 16 images, ``evaluate`` of a ResNet-18 returns a non-empty dict of
  floats.
- clustering (``num_clusters: [4, 8]``): ``fit`` of 64 unit vectors gives one result per granularity:
  L2-normalised K x D centroids, N assignments in [0, K), N non-negative distances.
- method: ``method: NAME`` alone, resolved as an experiment file (its slots' defaults and its recipe) at
  32 px and batch 16, built by the engine with its optimizer: a Method with ``backbone`` an ``nn.Module``;
  ``on_step_start``, ``forward`` on the augmentation's views of 16 images (and indices when ``uses_index``)
  returning a finite 0-dim "loss" and only 0-dim tensors, a gradient on its parameters,
  ``before_optimizer_step``, an optimizer step, ``after_optimizer_step``.
- optimizer: built over two parameter groups (lr 0.1 and 0.01): a ``torch.optim.Optimizer`` that keeps each
  group's lr, and a step moves a parameter.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from sslcore.api.errors import UserError
from sslcore.api.hookspecs import DeviceAugmentation, PairedLoss
from sslcore.api.recipe import TrainingStep
from sslcore.engine.context import EvalContext, MethodContext
from sslcore.registry import KIND_PROTOCOLS, LOSS_CALLS, Registry, declared_loss_call, missing_members


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(c * 100 + i)).save(root / f"class{c}" / f"{i}.png")
    return root


def _meets(name: str, kind: str, obj: Any) -> None:
    protocol = KIND_PROTOCOLS[kind]
    if not isinstance(obj, protocol):
        raise AssertionError(f"{name}: does not meet the {protocol.__name__} protocol (sslcore.api.hookspecs): it "
                             f"lacks {', '.join(missing_members(obj, protocol))}")


def _check_augmentation(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    aug = build({})
    _meets(name, "augmentation", aug)
    aug.set_seed(0)
    views = aug.views(_image())
    if [tuple(v.shape) for v in views] != [(3, s, s) for s in aug.view_sizes]:
        raise AssertionError(f"{name}: views() must return one 3 x S x S tensor per entry of view_sizes "
                             f"{list(aug.view_sizes)}, got {[tuple(v.shape) for v in views]}")
    for view in views:
        if view.dtype != torch.float32:
            raise AssertionError(f"{name}: a view must be a float32 tensor, got {view.dtype}")
    aug.set_seed(0)
    if not all(torch.equal(a, b) for a, b in zip(views, aug.views(_image()))):
        raise AssertionError(f"{name}: set_seed does not make views reproducible")
    for transform in (aug.eval, aug.labelled):
        if tuple(transform(_image()).shape) != (3, aug.eval_size, aug.eval_size):
            raise AssertionError(f"{name}: eval() and labelled() must return 3 x eval_size x eval_size tensors")
    pickle.loads(pickle.dumps(aug))
    if isinstance(aug, DeviceAugmentation):
        _check_device_views(name, aug)


def _check_device_views(name: str, aug: DeviceAugmentation) -> None:
    """The device path of a batch of two images of different sizes, padded as the loader pads them: one
    float32 N x 3 x S x S tensor per view, repeated by a generator of the same seed."""
    from sslcore.toolkit.device_views import pad_collate

    images = [torch.from_numpy(_image()), torch.from_numpy(_image(1, 48)[:, :40].copy())]
    (batch, sizes), _, _ = pad_collate([(image, 0, i) for i, image in enumerate(images)])
    views = aug.device_views(batch, sizes, torch.Generator().manual_seed(0))
    expected = [(2, 3, s, s) for s in aug.view_sizes]
    if [tuple(v.shape) for v in views] != expected or any(v.dtype != torch.float32 for v in views):
        raise AssertionError(f"{name}: device_views() must return one float32 N x 3 x S x S tensor per entry of "
                             f"view_sizes {list(aug.view_sizes)}, got {[(tuple(v.shape), v.dtype) for v in views]}")
    again = aug.device_views(batch, sizes, torch.Generator().manual_seed(0))
    if not all(torch.equal(a, b) for a, b in zip(views, again)):
        raise AssertionError(f"{name}: device_views() with generators of one seed must give the same views")


def _check_encoder(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    encoder = build({})
    _meets(name, "encoder", encoder)
    size = encoder.input_size or 32
    out = encoder(torch.randn(2, 3, size, size))
    if out.shape != (2, encoder.feature_dim):
        raise AssertionError(f"{name}: output {tuple(out.shape)}, expected (2, feature_dim={encoder.feature_dim})")
    out.sum().backward()
    if not any(p.grad is not None for p in encoder.parameters()):
        raise AssertionError(f"{name}: no gradient reached the parameters")


def _check_negative_source(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    source = build({}, dim=8, global_batch_size=4, dataset_size=16)
    _meets(name, "negative_source", source)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    # the images' dataset indices, as a method that declares uses_index gives them; None from the others
    index = torch.tensor([3, 0, 9, 15]) if source.needs_index else None
    negatives, exclude = source.negatives(q, k, index)
    if negatives.ndim != 2 or negatives.shape[1] != 8:
        raise AssertionError(f"{name}: negatives must be K x D, got {tuple(negatives.shape)}")
    if exclude is not None and exclude.shape != (4, negatives.shape[0]):
        raise AssertionError(f"{name}: exclude must be N x K, got {tuple(exclude.shape)}")
    if source.positive(k, index).shape != k.shape:
        raise AssertionError(f"{name}: positive(k, index) must be N x D like k")
    source.update(k, index)
    clone = build({}, dim=8, global_batch_size=4, dataset_size=16)
    clone.load_state_dict(source.state_dict())


def _check_loss(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    loss_fn = build({})
    _meets(name, "loss", loss_fn)
    call = declared_loss_call(registry.get("loss", name).provides or type(loss_fn))
    if call not in LOSS_CALLS:  # a plugin's own call: its method's contract runs it (through forward)
        if not isinstance(loss_fn, call):
            raise AssertionError(f"{name}: the loss lacks {', '.join(missing_members(loss_fn, call))} of "
                                 f"{call.__name__}")
        return
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    if registry.get("loss", name).meets(PairedLoss):  # loss(z1, z2), as its class declares
        k.requires_grad_()
        loss = loss_fn(q, k)
    else:  # loss(q, k, negatives, exclude)
        loss = loss_fn(q, k, torch.nn.functional.normalize(torch.randn(16, 8), dim=1), None)
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise AssertionError(f"{name}: the loss must be a finite scalar, got {loss}")
    loss.backward()
    if q.grad is None:
        raise AssertionError(f"{name}: no gradient reached the queries")
    metrics = loss_fn.metrics()
    if not all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values()):
        raise AssertionError(f"{name}: metrics() must return detached 0-dim tensors, got {metrics}")


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
    _meets(name, "dataset", dataset)
    if len(dataset.targets) != len(dataset):
        raise AssertionError(f"{name}: targets must hold every item's label")
    image, label = dataset[0]
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise AssertionError(f"{name}: items must be H x W x 3 uint8 arrays")
    if not isinstance(label, int):
        raise AssertionError(f"{name}: labels must be ints (-1 when unlabeled)")


def _check_evaluator(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    root = _image_folder(tmp / "eval_images", per_class=16)  # low_shot_svm's default k goes up to 16
    block = {"name": "image_folder", "root": str(root)}
    evaluator = build({"data": block})
    _meets(name, "evaluator", evaluator)
    aug = registry.get("augmentation", "moco_v2").build({"size": 32})
    context = EvalContext(registry=registry, eval_transform=aug.eval, train_data=block,
                          device=torch.device("cpu"), batch_size=4, num_workers=0, run_dir=tmp)
    encoder = registry.get("encoder", "resnet18").build({"cifar_stem": False}).eval()
    results = evaluator.evaluate(encoder, context)
    if not results or not all(isinstance(v, float) for v in results.values()):
        raise AssertionError(f"{name}: evaluate() must return a non-empty dict of floats, got {results}")


def _check_clustering(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    clustering = build({"num_clusters": [4, 8]})  # two granularities, small enough for 64 samples
    _meets(name, "clustering", clustering)
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
    from sslcore.engine.build import build_method, build_optimization

    batch = 16  # MoCo's default 8 BN groups need 2 samples each
    data = {"name": "image_folder", "root": str(tmp)}  # not read: the dataset size is given
    # ``method: NAME`` alone, resolved as an experiment file would be: the method's slot defaults and recipe,
    # at 32 px (an encoder built for one image size, a ViT, too) and this batch
    overrides = {"train": {"batch_size": batch}, "augmentation": {"size": 32}}
    component = registry.get("method", name)
    if "image_size" in component.slots["encoder"].default:
        overrides["encoder"] = {"image_size": 32}
    augmentation = registry.get("augmentation", component.slots["augmentation"].default["name"])
    if "local_size" in augmentation.config.model_fields:  # multi-crop: small local crops too
        overrides["augmentation"]["local_size"] = 16
    experiment = resolve({"method": name, "data": data, **overrides}, registry).as_dict()
    context = MethodContext(world_size=1, rank=0, global_batch_size=batch, steps_per_epoch=2, epochs=1,
                            device=torch.device("cpu"), dataset_size=batch, registry=registry)
    method = build_method(experiment, registry, context)
    _meets(name, "method", method)
    if not isinstance(method.backbone, torch.nn.Module):
        raise AssertionError(f"{name}: the method must expose its encoder as .backbone")
    optimization = build_optimization(method, experiment, registry, steps_per_epoch=2, total_steps=2)
    aug = registry.build("augmentation", experiment["augmentation"])
    views = [torch.stack(v) for v in zip(*(aug.views(_image(i)) for i in range(batch)))]
    step = TrainingStep(index=0, epoch=0, steps_per_epoch=2, total_steps=2,
                        values={key: s.at(0, 2, 2) for key, s in method.schedules().items()})
    method.on_step_start(step)
    out = method(views, torch.arange(batch)) if method.uses_index else method(views)
    loss = out["loss"]
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise AssertionError(f"{name}: forward() must return a finite scalar 'loss', got {loss}")
    if not all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.values()):
        raise AssertionError(f"{name}: forward() must return 0-dim tensors, got {sorted(out)}")
    loss.backward()
    if not any(p.grad is not None for p in method.parameters()):
        raise AssertionError(f"{name}: no gradient reached the parameters")
    method.before_optimizer_step(step)
    optimization.optimizer.step()
    method.after_optimizer_step(step)


def _check_optimizer(registry: Registry, name: str, build: Callable[..., Any], tmp: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    weights, rest = [model[0].weight], [model[0].bias, *model[1].parameters()]
    groups = [{"params": weights, "lr": 0.1, "weight_decay": 1e-4, "lars_exclude": False},
              {"params": rest, "lr": 0.01, "weight_decay": 0.0, "lars_exclude": True}]
    optimizer = build({}, param_groups=groups)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AssertionError(f"{name}: the factory must return a torch.optim.Optimizer")
    if [g["lr"] for g in optimizer.param_groups] != [0.1, 0.01]:
        raise AssertionError(f"{name}: each parameter group must keep the lr the engine gives it")
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        raise AssertionError(f"{name}: a step moved no parameter")


CHECKS = {"augmentation": _check_augmentation, "encoder": _check_encoder,
          "negative_source": _check_negative_source, "loss": _check_loss, "dataset": _check_dataset,
          "evaluator": _check_evaluator, "clustering": _check_clustering, "method": _check_method,
          "optimizer": _check_optimizer}


def _required_examples(config: type[BaseModel]) -> dict[str, Any]:
    """The first example of each required parameter (``Field(examples=[...])``): what the contract builds a
    component with that has no default for it (the timm encoder's ``model``)."""
    return {key: info.examples[0] for key, info in config.model_fields.items() if info.is_required() and info.examples}


def check(registry: Registry, kind: str, name: str) -> None:
    """Raise AssertionError naming the component when it breaks its kind's contract (built from its defaults;
    a required key from its first example)."""
    component = registry.get(kind, name)
    example = _required_examples(component.config)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        CHECKS[kind](registry, name, lambda params, **kw: component.build({**example, **params}, **kw), Path(tmp))
