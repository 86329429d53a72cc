"""The plugin API of sslcore on one page: the hook specs, and beside each the contract of what it registers.

A plugin is a module with functions decorated by :data:`sslcore.hookimpl` whose names are the hooks
below. Each hook receives ``register``, a callback owned by sslcore and typed per hook::

    register(name, factory, *, config=None, provides=None)      # methods also take slots= and recipe=

``name`` is what a user writes in the experiment file (``loss: {name: info_nce}``), ``factory`` builds the
component from the validated instance of ``config``, a pydantic model of its parameters (``extra="forbid"``
is applied by sslcore when the model does not set it). ``provides`` is the class the factory returns, when
the factory is not that class itself. sslcore records which distribution registered each name and refuses
a second registration of the same name of the same kind, naming both distributions.

What a component must provide is a :class:`typing.Protocol` beside its hook; :mod:`sslcore.contract` (and
``sslcore.testing.check_component`` in a plugin's tests) checks a component against it on tiny inputs, and
the engine checks every built component. Optional capabilities have defaults in the protocol class: a
component gets them by subclassing the protocol (``class MyLoss(nn.Module, PairedLoss)``), or defines them.
Subclassing is also how a component declares which of two protocols it meets where the call alone cannot
tell (a contrastive or a paired loss) and which refinement (an encoder of patches, :class:`PatchEncoder`).

A method names the protocol each of its slots needs (:class:`Slot`), so ``sslcore validate`` rejects a
component that does not fit its slot, with the components that would; and it registers its recipe, the
default ``train`` block (:mod:`sslcore.api.recipe`), so ``method: X`` alone is the paper's experiment.

Built-in components are registered through these same hooks (``sslcore/components``). Plugins are
ordinary Python code, imported and run with the user's rights: install only plugins you trust. Hooks run
once, when the registry loads; the training step calls the built objects directly, never pluggy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import pluggy

from sslcore.api.recipe import BIAS_AND_NORM, Schedule, TrainingStep

if TYPE_CHECKING:
    import numpy as np
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn

    from sslcore.engine.context import EvalContext, MethodContext

hookspec = pluggy.HookspecMarker("sslcore")

__all__ = ["BIAS_AND_NORM", "Augmentation", "ClusterResult", "Clustering", "ContrastiveLoss", "Dataset",
           "DeviceAugmentation",
           "Encoder", "Evaluator", "Loss", "Method", "NegativeSource", "PairedLoss", "PatchEncoder", "Schedule",
           "Slot", "Slots", "TrainingStep"]


# -- augmentations ----------------------------------------------------------------------------------------

@runtime_checkable
class Augmentation(Protocol):
    """Views of an image for training, and the transforms evaluators use.

    ``image`` is always H x W x 3 uint8 (RGB); every output a float tensor 3 x S x S, normalised.
    """

    view_sizes: Sequence[int]  #: S of each view ``views`` returns, in order: as many views as sizes
    eval_size: int  #: S of ``eval`` and ``labelled``

    def views(self, image: np.ndarray) -> list[Tensor]:
        """The training views of ``image``, view i of side ``view_sizes[i]``."""

    def eval(self, image: np.ndarray) -> Tensor:
        """The deterministic transform evaluators use (resize, center crop, normalize)."""

    def labelled(self, image: np.ndarray) -> Tensor:
        """The random crop and flip that evaluators training a classifier (linear_probe, finetune) use;
        return ``self.eval(image)`` where a recipe has none."""

    def set_seed(self, seed: int) -> None:
        """Reseed the random generators: the same seed, then the same image, gives the same views. The engine
        calls it before every training image (with a seed from the run's seed, the epoch and the image's
        index, so that views repeat across runs, loader workers and resumes inside an epoch): keep it cheap."""


@runtime_checkable
class DeviceAugmentation(Augmentation, Protocol):
    """An augmentation that can also make its training views on the training device, batched.

    On the device path the loader workers only decode (each image H x W x 3 uint8, shrunk to at most
    ``max_source_side``) and collate a batch padded to its largest image by repeating edges; the engine moves
    it pinned and non-blocking, and calls ``device_views`` with a generator on the device that it seeds per
    batch (from the epoch's seed and the batch's position: views repeat from the seed and across a resume).
    ``views`` stays the CPU path of the same recipe, with the same parameters. Which path runs is the
    augmentation block's ``device`` key (true, false or auto: on a GPU), which its config declares.
    """

    max_source_side: int | None  #: the longest side a loader worker sends; None: as decoded

    def device_views(self, images: Tensor, sizes: Tensor, generator: torch.Generator) -> list[Tensor]:
        """``images``: N x H x W x 3 uint8 on the device; ``sizes``: N x 2, each image's height and width in
        it -> one normalised float tensor N x 3 x S x S per view, view i of side ``view_sizes[i]``, every
        random parameter drawn per sample from ``generator``."""


@hookspec
def register_augmentations(register: RegisterAugmentation) -> None:
    """Register augmentation recipes (the ``augmentation`` block): ``factory(config) -> Augmentation``.

    The augmentation runs in the DataLoader workers, or batched on the training device when it is a
    :class:`DeviceAugmentation` whose block's ``device`` asks for it; the engine builds it (methods do not).

    Defaults fitted to the data: a config may define the classmethod ``fit_to_images(side: int, current:
    dict) -> dict``, the values of its keys for training images of ``side`` pixels (their median shorter
    side) given the resolved block ``current``; the keys the experiment leaves out take them (the built-in
    recipes: ``size`` becomes the images' side when they are smaller than the views).
    """


# -- encoders ---------------------------------------------------------------------------------------------

@runtime_checkable
class Encoder(Protocol):
    """A backbone: ``encoder(x: N x 3 x H x W) -> N x feature_dim`` pooled features (an ``nn.Module``)."""

    feature_dim: int  #: the width of the features, which methods size their heads by
    input_size: int | None  #: the one image side it accepts (a ViT's image_size); None: any side

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class PatchEncoder(Encoder, Protocol):
    """An encoder of p x p patches (a ViT) whose pieces a method can run on a subset of the patches (MAE)."""

    patch_size: int  #: p
    grid_size: int  #: patches per side
    num_patches: int  #: L = grid_size^2
    position_embedding: Tensor  #: 1 x (1 + L) x D: the CLS token's, then the patches' in row-major order
    class_token: Tensor  #: 1 x 1 x D
    blocks: nn.Module  #: the Transformer blocks, N x T x D -> N x T x D for any T
    norm: nn.Module  #: the norm after the last block

    def embed_patches(self, x: Tensor) -> Tensor:
        """x: N x 3 x input_size x input_size -> N x L x D, without position embeddings."""


@hookspec
def register_encoders(register: RegisterEncoder) -> None:
    """Register backbone encoders (the ``encoder`` block): ``factory(config) -> Encoder``.

    ``sslcore export`` writes the encoder's ``state_dict()``; its docstring should say which plain model it
    loads into. A config may define ``fit_to_images(side, current) -> dict`` as an augmentation's may (the
    built-in ResNets: the CIFAR stem at 64 px or less; the ViTs: the images' side in 4 px patches); an
    ``image_size`` it returns is the side the augmentation is then fitted to.
    """


# -- negative sources -------------------------------------------------------------------------------------

@runtime_checkable
class NegativeSource(Protocol):
    """Negatives for a contrastive loss (an ``nn.Module``: its state is in buffers, so checkpoints carry it).

    ``q``, ``k``: N x D, this worker's queries and their positive keys, L2-normalised float32, the keys
    detached unless the method trains through them (NNCLR's keys are the other view's predictions);
    ``index``: N long, the dataset ids of the batch's images (row i of q and k is image ``index[i]``), given
    by methods that declare ``uses_index`` and None otherwise.
    """

    #: True when ``negatives``/``update`` need ``index`` (a memory bank); validate refuses such a source under
    #: a method that does not give indices
    needs_index: ClassVar[bool] = False

    def negatives(self, q: Tensor, k: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(negatives: K x D, exclude: N x K bool | None)`` for this step; ``exclude[i, j]`` is True where
        negative j must not count for query i (its own key in the batch, its own image in a bank)."""

    def update(self, k: Tensor, index: Tensor | None = None) -> None:
        """After the loss, with this worker's keys; gather them across workers (``sslcore.toolkit.distributed``)
        so that every worker holds the same state."""

    def positive(self, k: Tensor, index: Tensor | None = None) -> Tensor:
        """N x D, the positive each query is contrasted with: ``k`` itself, what the source keeps of the
        image (a memory bank: each image's own entry, as InstDisc), or what stands in for it (a support set:
        the nearest neighbour of each row, as NNCLR)."""
        return k


@hookspec
def register_negative_sources(register: RegisterNegativeSource) -> None:
    """Register sources of negatives (the ``negatives`` block):
    ``factory(config, *, dim, global_batch_size, dataset_size) -> NegativeSource``.

    ``dim`` is the size of the embeddings the loss compares, given by the method that builds the slot;
    ``global_batch_size`` and ``dataset_size`` (the number of training images, for per-image state) by the
    engine. Raise ``ValueError`` for settings that cannot work (a queue that is not a multiple of the global
    batch): sslcore reports it as a one-line config error on the ``negatives`` block.
    """


# -- losses -----------------------------------------------------------------------------------------------

@runtime_checkable
class Loss(Protocol):
    """A loss (an ``nn.Module`` returning a 0-dim tensor); declare its call by subclassing
    :class:`ContrastiveLoss` or :class:`PairedLoss`, or a ``runtime_checkable`` Protocol of the plugin's own
    that refines Loss and declares ``forward`` (SwAV's swapped prediction over the crops' scores and codes,
    DINO's cross-entropy of student and teacher crops): the method's slot then names that protocol, and the
    contract runs the loss through the method. The method calls the loss inside its forward, so under the
    engine's autocast (``train.precision``) the loss's own matmuls run in bf16 or fp16 whatever its inputs'
    dtype: compute under ``torch.autocast(device_type, enabled=False)`` on ``.float()`` inputs where precision
    matters (logits over a small temperature), and return a float32 scalar, as every built-in loss does."""

    def metrics(self) -> dict[str, Tensor]:
        """0-dim terms of the last call, detached (VICReg's invariance, variance, covariance), which the
        method returns with its loss so that they are tracked; none by default."""
        return {}


@runtime_checkable
class ContrastiveLoss(Loss, Protocol):
    """A contrastive loss: loss(q, k, negatives, exclude), each query against its key and K negatives."""

    def forward(self, q: Tensor, k: Tensor, negatives: Tensor, exclude: Tensor | None = None) -> Tensor:
        """What the built-in methods (MoCo, PCL, NNCLR) pass, and a contrastive loss may rely on: ``q``, ``k``: N x D,
        this worker's queries and their positives, L2-normalised and float32 also under autocast (normalised
        after ``.float()``); ``k`` is detached (a momentum key, a memory bank's entry) unless the method trains
        through it (NNCLR: one of ``q``, ``k`` is its prediction, with gradient, the other a detached nearest
        neighbour). ``negatives``: K x D, L2-normalised float32, as :class:`NegativeSource` gives them (a queue or
        bank in float32 buffers, in-batch keys gathered from every worker; with gradient only where the source
        gives it, NNCLR's). ``exclude``: N x K bool or None (True: that negative does not count for that query).
        Computed inside the method's autocast: see :class:`Loss` for float32."""


@runtime_checkable
class PairedLoss(Loss, Protocol):
    """A paired loss: loss(z1, z2), the embeddings of two views of the same N images."""

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """``z1``, ``z2``: N x D, this worker's rows, as the method's heads output them: not normalised, and in
        the autocast dtype under autocast (bf16 or fp16: a Linear's or BatchNorm's output), so cast them with
        ``.float()`` under autocast disabled (see :class:`Loss`). ``z1`` carries the gradient; ``z2`` may be
        detached (BYOL's target projection, SimSiam's stop-gradient z) or not (SimCLR's, VICReg's second view).
        A loss over the global batch gathers the rows with ``sslcore.toolkit.distributed.gather_with_grad``."""


@hookspec
def register_losses(register: RegisterLoss) -> None:
    """Register losses (the ``loss`` block): ``factory(config) -> ContrastiveLoss | PairedLoss``."""


# -- clusterings ------------------------------------------------------------------------------------------

@dataclass
class ClusterResult:
    """One granularity of a clustering: ``assignments`` N (long), ``centroids`` K x D (L2-normalised,
    float32), ``norms`` K (the centroids' norms before normalisation) and ``distances`` N (float32: squared
    L2 distance of each sample to its assigned centroid before normalisation)."""

    assignments: torch.Tensor
    centroids: torch.Tensor
    norms: torch.Tensor
    distances: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def sizes(self) -> torch.Tensor:
        """Z: K, the number of samples in each cluster."""
        import torch

        return torch.bincount(self.assignments, minlength=self.num_clusters)


@runtime_checkable
class Clustering(Protocol):
    """A clustering of feature sets into one or more granularities (PCL's E-step)."""

    num_clusters: Sequence[int]  #: K of each granularity

    def fit(self, features: Tensor) -> list[ClusterResult]:
        """``features``: N x D; one result per granularity, in the order of ``num_clusters``. Raise
        ``ValueError`` for a setting the data cannot satisfy (more clusters than samples)."""


@hookspec
def register_clusterings(register: RegisterClustering) -> None:
    """Register clustering algorithms (the ``clustering`` block): ``factory(config) -> Clustering``."""


# -- evaluators -------------------------------------------------------------------------------------------

@runtime_checkable
class Evaluator(Protocol):
    """Scores a backbone; runs on rank 0 between epochs (backbone in eval mode) and through ``sslcore eval``.

    It must leave the backbone as it found it (fine-tune a copy). The context builds datasets with the run's
    eval transform (``dataset``, ``features``, ``labelled_features``, ``targets``) or its random crop and flip
    (``dataset(block, augmented=True)``) and knows the device, precision (``autocast()``, ``to_device``),
    batch size and DataLoader workers; pictures go to ``context.run_dir``.
    """

    every_epochs: int  #: run after every this many epochs; 0: only at the end of training

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]: ...


@hookspec
def register_evaluators(register: RegisterEvaluator) -> None:
    """Register evaluators (the ``evaluators`` list): ``factory(config) -> Evaluator``.

    A parameter that is itself a dataset block (``knn``'s ``data``) is declared with
    ``Field(json_schema_extra={"sslcore_kind": "dataset"})`` and validated like the ``data`` block.
    """


# -- datasets ---------------------------------------------------------------------------------------------

@runtime_checkable
class Dataset(Protocol):
    """Images and labels: item i is ``(image, label)``, an H x W x 3 uint8 RGB array (grayscale converted)
    and an int, -1 when unlabelled. An image that cannot be decoded raises
    ``sslcore.api.errors.UnreadableImage``: sslcore's loader logs it and skips to the next item."""

    classes: Sequence[str]  #: the class names, empty when unlabelled
    targets: Sequence[int]  #: every item's label without decoding it (-1: unlabelled), as torchvision has

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


@hookspec
def register_datasets(register: RegisterDataset) -> None:
    """Register datasets (the ``data`` block and evaluators' ``data``): ``factory(config) -> Dataset``.

    ``sslcore.toolkit.images.load_image`` decodes a file as sslcore expects (and raises ``UnreadableImage``).
    """


# -- optimizers -------------------------------------------------------------------------------------------

@hookspec
def register_optimizers(register: RegisterOptimizer) -> None:
    """Register optimizers (the ``train.optimizer`` block):
    ``factory(config, param_groups: list[dict]) -> torch.optim.Optimizer``.

    ``config`` must have ``lr`` (the base learning rate, scaled by ``train.lr_scaling``) and ``weight_decay``.
    ``param_groups`` are torch's parameter-group dicts, each with ``params``, its peak ``lr`` and its
    ``weight_decay`` set by the engine from the recipe's groups, and ``lars_exclude`` (True: no trust ratio),
    which optimizers without a trust ratio ignore. The engine sets ``lr`` (and a scheduled weight decay) of
    every group before each step.
    """


# -- methods ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """A slot of a method: the protocol its component must meet and the block used when the experiment
    leaves the slot out. Slots: ``encoder``, ``augmentation``, ``negatives``, ``loss``, ``clustering``."""

    needs: type  #: the protocol, e.g. Encoder, PatchEncoder, NegativeSource, ContrastiveLoss, PairedLoss
    default: Mapping[str, Any] = field(default_factory=dict)  #: e.g. {"name": "queue", "size": 65536}


class Slots(Protocol):
    """What a method's factory gets to build the components of its slots (all but the augmentation)."""

    def build(self, slot: str, **sizes: Any) -> Any:
        """The experiment's component for ``slot``, built with ``sizes`` the method decides (the negatives'
        ``dim``) and what the engine knows (global batch size, dataset size), checked against the slot's
        protocol; a ``ValueError`` of its factory is reported as a config error on that block."""


@runtime_checkable
class Method(Protocol):
    """A self-supervised method: an ``nn.Module`` that turns a batch of views into a loss.

    Subclass it (``class MoCo(nn.Module, Method)``) to get the no-op defaults of the optional parts.
    The engine calls, for each batch: ``on_step_start``, ``forward`` (through DDP with several workers),
    backward, gradient clipping, ``before_optimizer_step``, the optimizer step, ``after_optimizer_step``.
    State that must survive a resume lives in buffers or submodules, so ``state_dict()`` holds it: a
    checkpoint may be taken between any two steps, and a run resumed inside an epoch does not call
    ``on_epoch_start`` again (derive plain attributes from buffers in a ``load_state_dict`` post-hook, as PCL
    does, or from the step in ``on_step_start``).
    """

    backbone: nn.Module  #: the encoder that evaluators use and ``sslcore export`` writes

    #: True: ``forward`` also gets ``index``, the batch's dataset ids (N, long), for per-image state (PCL's
    #: cluster assignments) and for negative sources that need it
    uses_index: ClassVar[bool] = False

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> dict[str, Tensor]:
        """``views``: one N x 3 x S x S batch per view of the augmentation. Returns the loss under "loss"
        and any 0-dim metrics (tracked every ``log_every_steps``)."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The method's named groups of parameters (SimSiam: {"predictor": [...]}), each one declared, with
        its settings, in the recipe's ``param_groups``; a parameter in none of them may fall in
        ``bias_and_norm``, else in the rest. None by default."""
        return {}

    def schedules(self) -> dict[str, Schedule]:
        """Hyperparameters that change over training (BYOL's tau), evaluated by the engine at every step,
        passed to the step hooks in ``TrainingStep.values`` and tracked; read once, at set-up."""
        return {}

    def on_step_start(self, step: TrainingStep) -> None:
        """Before the forward of every step, with the step about to be taken: for what ``forward`` needs to
        know of it (SwAV's queue from an epoch on, DINO's teacher temperature). Called on every step, also
        the first after a resume, so state derived here needs no checkpoint."""
        return None

    def before_optimizer_step(self, step: TrainingStep) -> None:
        """Gradients are ready (unscaled, clipped): e.g. set those of a part frozen for the first steps to
        None."""
        return None

    def after_optimizer_step(self, step: TrainingStep) -> None:
        """The parameters moved: e.g. the EMA of a momentum encoder or target network."""
        return None

    def on_epoch_start(self, epoch: int, context: MethodContext) -> dict[str, Any] | None:
        """Before each epoch, on every worker (an E-step), after the engine has seeded torch, numpy and
        ``random`` from the run's seed, the epoch and the rank (so random draws here repeat on resume).
        ``context.eval_context.embed_training_data`` embeds the training set, sharded over the workers.
        Returns floats, 1-D tensors (distributions) or PIL images to track."""
        return None

    def on_train_end(self, context: MethodContext) -> dict[str, Any] | None:
        """After the last epoch, on every worker (final pictures); returns what to track, as above."""
        return None


@hookspec
def register_methods(register: RegisterMethod) -> None:
    """Register self-supervised methods (the ``method`` block)::

        register(name, factory, config=Model, slots={"encoder": Slot(Encoder, {"name": "resnet50"}), ...},
                 recipe={"epochs": 200, "batch_size": 256, "optimizer": {"name": "sgd", "lr": 0.03}, ...})

    ``factory(config, *, context: MethodContext, slots: Slots) -> Method``; ``context``
    (``sslcore.engine.context``) has the world size, rank, global batch size, steps per epoch, epochs, device,
    dataset size (for per-image state), the run folder and an eval context (the training data under the eval
    transform, for an E-step). A block given for a slot the method does not declare is a config error.

    ``recipe`` is the method's default ``train`` block (:class:`sslcore.api.recipe.TrainConfig`): optimizer
    and base lr, ``lr_scaling``, warmup, schedule and ``final_lr``, epochs, batch size, ``grad_clip``, and
    ``param_groups``, which names every group the method's ``parameter_groups()`` returns (``{}`` for
    default settings) and may set ``bias_and_norm``.
    """


# -- the register callbacks, typed per hook ---------------------------------------------------------------

class RegisterAugmentation(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Augmentation], *, config: type[BaseModel] | None = None,
                 provides: type | None = None) -> None: ...


class RegisterEncoder(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Encoder], *, config: type[BaseModel] | None = None,
                 provides: type | None = None) -> None: ...


class RegisterNegativeSource(Protocol):
    def __call__(self, name: str, factory: Callable[..., NegativeSource], *,
                 config: type[BaseModel] | None = None, provides: type | None = None) -> None: ...


class RegisterLoss(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], ContrastiveLoss | PairedLoss], *,
                 config: type[BaseModel] | None = None, provides: type | None = None) -> None: ...


class RegisterClustering(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Clustering], *, config: type[BaseModel] | None = None,
                 provides: type | None = None) -> None: ...


class RegisterEvaluator(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Evaluator], *, config: type[BaseModel] | None = None,
                 provides: type | None = None) -> None: ...


class RegisterDataset(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Dataset], *, config: type[BaseModel] | None = None,
                 provides: type | None = None) -> None: ...


class RegisterOptimizer(Protocol):
    def __call__(self, name: str, factory: Callable[[Any, list[dict[str, Any]]], torch.optim.Optimizer], *,
                 config: type[BaseModel], provides: type | None = None) -> None: ...


class RegisterMethod(Protocol):
    def __call__(self, name: str, factory: Callable[..., Method], *, config: type[BaseModel] | None = None,
                 slots: Mapping[str, Slot], recipe: Mapping[str, Any], provides: type | None = None) -> None: ...
