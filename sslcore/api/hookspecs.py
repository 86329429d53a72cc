"""The hook specifications of sslcore: the whole plugin API on one page.

A plugin is a module with functions decorated by :data:`sslcore.hookimpl` whose names are the hooks
below. Each hook receives ``register``, a callback owned by sslcore::

    register(name: str, factory: Callable, config: type[pydantic.BaseModel] | None = None, **extra)

``name`` is what a user writes in the experiment file (``loss: {name: info_nce}``), ``factory`` builds
the component, and ``config`` is the pydantic model its parameters are validated against (``extra="forbid"``
is applied by sslcore when the model does not set it). The validated model instance is passed to the
factory as its first argument. sslcore records which distribution registered each name and refuses a
second registration of the same name of the same kind, naming both distributions.

Built-in components are registered through these same hooks (see ``sslcore/components``).
Plugins are ordinary Python code, imported and run with the user's rights: install only plugins you trust.

Hooks run once, when the registry loads; the training step never goes through pluggy.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("sslcore")

Register = Callable[..., None]


@hookspec
def register_augmentations(register: Register) -> None:
    """Register augmentation recipes (the ``augmentation`` block).

    ``factory(config) -> augmentation``, an object with:

    - ``num_views: int`` — how many views ``views`` returns;
    - ``views(image: np.ndarray) -> list[torch.Tensor]`` — ``image`` is H x W x 3 uint8 (RGB); each view is
      a float tensor 3 x S x S, normalized;
    - ``eval(image: np.ndarray) -> torch.Tensor`` — the deterministic transform used by evaluators
      (resize, center crop, normalize);
    - optional ``labelled(image: np.ndarray) -> torch.Tensor`` — the random crop and flip that evaluators
      training a classifier (``linear_probe``, ``finetune``) use; without it they train on ``eval``;
    - ``set_seed(seed: int) -> None`` — reseed the recipe's random generator (called per DataLoader worker
      and per epoch, so that runs and resumes are reproducible).
    """


@hookspec
def register_encoders(register: Register) -> None:
    """Register backbone encoders (the ``encoder`` block).

    ``factory(config) -> torch.nn.Module`` whose ``forward(x: N x 3 x H x W) -> N x feature_dim`` returns
    pooled features, with an ``int`` attribute ``feature_dim`` that methods use to size their heads.
    ``sslcore export`` writes the encoder's ``state_dict()``; the docstring of the encoder should say which
    plain model it loads into.
    """


@hookspec
def register_negative_sources(register: Register) -> None:
    """Register sources of negatives for contrastive losses (the ``negatives`` block).

    ``factory(config, *, dim: int, global_batch_size: int, dataset_size: int) -> torch.nn.Module`` with the
    following; ``dim`` is the ``dim`` parameter of the method (the size of the embeddings the loss compares,
    default 128) and ``dataset_size`` the number of training images, for per-image state such as a memory bank
    (0 where it is not known: the method built on the driver to validate a config or to export a checkpoint).
    A source without per-image state accepts ``dataset_size`` and ignores it.

    - ``negatives(q: N x D, k: N x D, index: N long | None = None) -> (negatives: K x D, exclude: N x K bool |
      None)`` — the negatives for this step; ``exclude[i, j]`` is True where negative ``j`` must not count for
      query ``i`` (its own positive, for in-batch negatives; its own image, for a memory bank);
    - ``update(k: N x D, index: N long | None = None) -> None`` — called after the loss with this worker's keys
      (detached); the source gathers them across workers itself (``sslcore.toolkit.distributed``) so every worker holds
      the same state;
    - optional ``positive(k: N x D, index: N long | None = None) -> N x D`` — the positive key each query is
      contrasted with, where the source keeps it (a memory bank: each image's own entry, as InstDisc);
      methods use ``k`` itself when a source has no ``positive``.

    ``index`` holds the dataset indices of the batch's images (row i of ``q`` and ``k`` is image ``index[i]``),
    passed by methods whose ``forward`` takes ``index`` (MoCo, PCL); a source that needs it raises
    ``sslcore.api.errors.TrainingError`` when it is None. State that must survive a resume (a queue, a memory bank)
    lives in buffers, so it is checkpointed with the method. Raise ``ValueError`` from the factory for a
    configuration that cannot work with this batch size; sslcore reports it as a config error on the
    ``negatives`` block.
    """


@hookspec
def register_clusterings(register: Register) -> None:
    """Register clustering algorithms (the ``clustering`` block), used by methods such as PCL.

    ``factory(config) -> clustering`` with ``num_clusters: list[int]`` (K of each granularity) and
    ``fit(features: N x D tensor) -> list[sslcore.components.clustering.ClusterResult]``, one result per
    granularity in that order: each sample's cluster, the L2-normalised centroids and each sample's
    squared distance to its centroid. Raise ``ValueError`` for a setting the data cannot satisfy.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register losses (the ``loss`` block).

    ``factory(config) -> torch.nn.Module`` returning a scalar tensor, with one of two call signatures:

    - contrastive, as MoCo calls it: ``loss(q: N x D, k: N x D, negatives: K x D, exclude: N x K bool | None)``;
    - paired, as SimCLR, BYOL, Barlow Twins call it: ``loss(z1: N x D, z2: N x D)``, the embeddings of two
      views of this worker's N images. A paired loss that needs the global batch (negatives from every
      worker, statistics over all samples) gathers it with ``sslcore.toolkit.distributed.gather_with_grad``.

    The method using a loss documents which signature it calls. Optional: ``last_terms: dict[str, Tensor]``,
    the 0-dim terms of the last call (VICReg's invariance, variance, covariance), which methods that know
    of it (Barlow Twins, VICReg) return with the loss so the engine tracks them.
    """


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluators (the ``evaluators`` list).

    ``factory(config) -> evaluator`` with ``every_epochs: int`` (0: only at the end of training) and
    ``evaluate(backbone: torch.nn.Module, context: sslcore.engine.EvalContext) -> dict[str, float]``.
    Evaluators run on rank 0 between epochs with the backbone in eval mode, and afterwards through
    ``sslcore eval``; an evaluator must leave the backbone as it found it (fine-tune a copy). The context
    builds datasets with the run's eval transform (``dataset``, ``features``, ``labelled_features``,
    ``targets``) or its random crop and flip (``dataset(block, augmented=True)``) and knows the device,
    precision (``autocast()``, ``to_device(images)``), batch size and DataLoader workers. Metrics are
    floats; pictures go to ``context.run_dir``. A parameter
    that is itself a dataset block (``knn``'s ``data``) is declared with
    ``Field(json_schema_extra={"sslcore_kind": "dataset"})`` and validated like the ``data`` block.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets (the ``data`` block, and the ``data`` of evaluators).

    ``factory(config) -> torch.utils.data.Dataset`` whose items are ``(image, label)``: ``image`` an
    H x W x 3 uint8 numpy array (RGB; grayscale is converted), ``label`` an int, -1 when unlabeled.
    The dataset exposes ``classes: list[str]`` (empty when unlabeled) and may expose ``targets`` (every
    item's label, as torchvision's datasets do), which lets evaluators draw labelled subsets without
    decoding every image. Items that cannot be decoded are
    logged and skipped by sslcore's loader, so a dataset may raise ``sslcore.api.errors.UnreadableImage``.
    """


@hookspec
def register_methods(register: Register) -> None:
    """Register self-supervised methods (the ``method`` block).

    ``register(name, factory, config=Model, slots={slot: default_block, ...})`` where ``slots`` names the
    experiment blocks the method uses among ``encoder``, ``augmentation``, ``negatives``, ``loss`` and
    ``clustering``, each with the block used when the experiment leaves it out (so ``method: moco`` alone
    is a full experiment). A block given for a slot the method does not use is a config error.

    ``factory(config, *, context, **components) -> torch.nn.Module`` receives the built components of its
    slots as keyword arguments (``encoder=``, ``negatives=``, ``loss=``, ``clustering=``; the augmentation
    is used by the data pipeline) and ``context`` (:class:`sslcore.engine.MethodContext`: world size,
    global batch size, total steps). The module must provide:

    - ``forward(views: list[Tensor]) -> dict[str, Tensor]`` — one training step's loss under ``"loss"``
      and any scalar metrics; it is called through DDP when there are several workers. A ``forward`` that
      also takes ``index`` gets the batch's dataset indices (N, long), for per-sample state;
    - ``backbone: torch.nn.Module`` — the encoder that evaluators use and ``sslcore export`` writes.

    Optional: ``on_epoch_start(epoch: int, context) -> dict | None`` for work between epochs (an E-step),
    called on every worker, and ``on_train_end(context) -> dict | None``, called on every worker after the
    last epoch (final pictures); what they return (floats, 1-D tensors as distributions, PIL images) is
    tracked.
    ``context.dataset_size`` sizes per-sample state. Method state that must survive a resume lives in
    buffers or submodules, so ``state_dict()`` holds it.
    """
