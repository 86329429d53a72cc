"""Building a run's parts from a resolved experiment: the method and the components of its slots, the
optimizer over the recipe's parameter groups with its learning-rate schedule, and the training data.

Errors in what the experiment asks for are :class:`sslcore.config.BlockError` naming the key; whoever holds
the experiment file turns them into ``file:line:`` lines (``Resolved.error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from sslcore.api.hookspecs import Augmentation, DeviceAugmentation, Method, NegativeSource, PatchEncoder
from sslcore.api.recipe import BIAS_AND_NORM, ParamGroup, Schedule, peak_lr
from sslcore.config import BlockError
from sslcore.engine.context import MethodContext
from sslcore.engine.data import DecodedImages, EpochSampler, MultiViewDataset, seed_worker
from sslcore.registry import SLOT_KINDS, Component, Registry, missing_members

#: the parameter group of everything no named group claims
REST = "rest"


class ComponentSlots:
    """The :class:`sslcore.api.hookspecs.Slots` a method's factory builds its components with."""

    def __init__(self, registry: Registry, method: Component, experiment: dict[str, Any],
                 context: MethodContext) -> None:
        self.registry, self.method, self.experiment, self.context = registry, method, experiment, context

    def build(self, slot: str, **sizes: Any) -> Any:
        declared = self.method.slots
        if slot not in declared or slot == "augmentation":
            raise TypeError(f"method '{self.method.name}' builds slot '{slot}', which it cannot: it declares "
                            f"{sorted(declared)}, and the engine builds the augmentation")
        kind, block = SLOT_KINDS[slot], self.experiment[slot]
        if kind == "negative_source":
            sizes = {**sizes, "global_batch_size": self.context.global_batch_size,
                     "dataset_size": self.context.dataset_size}
        component = build(self.registry, kind, (slot,), block, **sizes)
        needs = declared[slot].needs
        if not isinstance(component, needs):
            raise BlockError((slot, "name"), f"'{block['name']}' built a {type(component).__name__} that does not "
                                             f"meet {needs.__name__}: it lacks "
                                             f"{', '.join(missing_members(component, needs))}")
        if isinstance(component, NegativeSource) and component.needs_index and \
                self.method.capability("uses_index") is False:
            raise BlockError((slot, "name"), f"'{block['name']}' needs each image's dataset index and method "
                                             f"'{self.method.name}' gives none (it does not declare uses_index)")
        return component


def build(registry: Registry, kind: str, loc: tuple[Any, ...], block: dict[str, Any], **kwargs: Any) -> Any:
    """The component of ``block``; a ``ValueError`` of its factory (settings that cannot work) becomes a
    :class:`BlockError` on ``loc``."""
    try:
        return registry.build(kind, block, **kwargs)
    except ValueError as exc:
        raise BlockError(loc, str(exc)) from None


def build_method(experiment: dict[str, Any], registry: Registry, context: MethodContext) -> Method:
    """The method of a resolved experiment, its factory given :class:`ComponentSlots`."""
    component = registry.get("method", experiment["method"]["name"])
    method = build(registry, "method", ("method",), experiment["method"], context=context,
                   slots=ComponentSlots(registry, component, experiment, context))
    if not isinstance(method, Method):
        raise TypeError(f"method '{component.name}' built a {type(method).__name__} that does not meet the Method "
                        f"protocol: it lacks {', '.join(missing_members(method, Method))}")
    return method


def check_input_size(method: Method, augmentation: Augmentation) -> None:
    """An encoder that takes one image size (a ViT) must get it from every view and the eval transform; one of
    patches that takes any size (a ViT with dynamic_img_size) must get sizes its patch size divides."""
    backbone, sizes = method.backbone, {*augmentation.view_sizes, augmentation.eval_size}
    size = backbone.input_size
    other = sorted(sizes - {size}) if size is not None else []
    if other:
        hint = ", or dynamic_img_size: true for multi-crop" if isinstance(backbone, PatchEncoder) else ""
        raise BlockError(("encoder",), f"the encoder takes {size} px images and the augmentation makes {other[0]} px "
                                       f"ones; make them agree (the encoder's image_size, the augmentation's size"
                                       f"{hint})")
    if size is None and isinstance(backbone, PatchEncoder):
        ragged = sorted(s for s in sizes if s % backbone.patch_size)
        if ragged:
            raise BlockError(("encoder",), f"the encoder's patch size {backbone.patch_size} does not divide the "
                                           f"augmentation's {ragged[0]} px views; use sizes that it divides")


# -- optimizer and schedules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimization:
    """The optimizer, its learning-rate scheduler (one factor per group, torch's LambdaLR) and what the step
    loop needs to apply the recipe: the names of the groups, the weight-decay schedule, gradient clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    group_names: list[str]
    weight_decay: Schedule | None  # for the groups that keep the optimizer's weight decay
    grad_clip: float | None
    grad_clip_mode: str  # "total" or "per_parameter"


def parameter_groups(method: Method, method_name: str, train: dict[str, Any], optimizer: dict[str, Any],
                     global_batch_size: int) -> list[dict[str, Any]]:
    """torch's parameter-group dicts of ``method``'s trainable parameters, each with its peak lr and weight
    decay: first the rest, then each group of ``train.param_groups`` that has parameters.

    A parameter belongs to the first group that claims it: the method's named groups, in the order of
    ``parameter_groups()``, then ``bias_and_norm`` (every tensor of at most one dimension) when the recipe
    or the experiment sets it, else the rest.
    """
    settings = {name: ParamGroup.model_validate(group) for name, group in train["param_groups"].items()}
    named = method.parameter_groups()
    undeclared = sorted(set(named) - set(settings))
    if undeclared:
        raise TypeError(f"method '{method_name}': parameter_groups() returns {undeclared}, which its recipe's "
                        f"param_groups does not declare")
    owner: dict[int, str] = {}
    for name, params in named.items():
        for p in params:
            owner.setdefault(id(p), name)
    trainable = [p for p in method.parameters() if p.requires_grad]
    if BIAS_AND_NORM in settings:
        for p in trainable:
            if p.ndim <= 1:
                owner.setdefault(id(p), BIAS_AND_NORM)
    scaling, base = train["lr_scaling"], optimizer["lr"]
    groups = []
    for name in [REST, *settings]:
        params = [p for p in trainable if owner.get(id(p), REST) == name]
        if not params:
            continue
        group = settings.get(name, ParamGroup())
        groups.append({"params": params, "group": name,
                       "lr": peak_lr(group.lr if group.lr is not None else base, scaling, global_batch_size),
                       "weight_decay": group.weight_decay if group.weight_decay is not None else optimizer[
                           "weight_decay"],
                       "lars_exclude": group.lars_exclude, "fixed_lr": group.fixed_lr,
                       "scheduled_weight_decay": group.weight_decay is None})
    return groups


def lr_schedule(train: dict[str, Any]) -> Schedule:
    """The factor of every group's peak lr: linear warmup from 0, then cosine to ``final_lr``, constant, or
    times ``gamma`` at each of ``milestones``."""
    if train["schedule"] == "step":
        return Schedule(start=1.0, shape="step", milestones=tuple(train["milestones"]), gamma=train["gamma"],
                        warmup_epochs=train["warmup_epochs"], warmup_start=train["warmup_start"])
    return Schedule(start=1.0, end=train["final_lr"] if train["schedule"] == "cosine" else None,
                    warmup_epochs=train["warmup_epochs"], warmup_start=train["warmup_start"])


def build_optimization(method: Method, experiment: dict[str, Any], registry: Registry, steps_per_epoch: int,
                       total_steps: int) -> Optimization:
    """The optimizer of ``train.optimizer`` over the recipe's parameter groups, and its schedules."""
    train, block = experiment["train"], experiment["train"]["optimizer"]
    groups = parameter_groups(method, experiment["method"]["name"], train, block, train["batch_size"])
    optimizer = build(registry, "optimizer", ("train", "optimizer"), block, param_groups=groups)
    schedule = lr_schedule(train)

    def scheduled(step: int) -> float:
        return schedule.at(step, steps_per_epoch, total_steps)

    factors = [(lambda step: 1.0) if group["fixed_lr"] else scheduled for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    weight_decay = None
    if train["weight_decay_end"] is not None:
        weight_decay = Schedule(start=block["weight_decay"], end=train["weight_decay_end"])
    return Optimization(optimizer=optimizer, scheduler=scheduler,
                        group_names=[group["group"] for group in optimizer.param_groups],
                        weight_decay=weight_decay, grad_clip=train["grad_clip"],
                        grad_clip_mode=train["grad_clip_mode"])


# -- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The training images through the augmentation, and the loader each worker reads its shard with."""

    augmentation: Augmentation
    dataset: MultiViewDataset | DecodedImages
    loader: DataLoader
    sampler: EpochSampler
    generator: torch.Generator
    batch_size: int  # per worker
    on_device: bool  # the loader yields decoded images, and augmentation.device_views makes the views


def augments_on_device(augmentation: Augmentation, block: dict[str, Any], device: torch.device) -> bool:
    """Whether the views are made on ``device``: the ``device`` key of the augmentation's ``block`` (absent:
    false), ``auto`` meaning on a GPU. One that asks for it without a device path is an error, not a silent
    CPU run."""
    wanted = block.get("device", False)
    if wanted is True and not isinstance(augmentation, DeviceAugmentation):
        raise BlockError(("augmentation", "device"), f"{type(augmentation).__name__} has no device path (it lacks "
                                                     f"{', '.join(missing_members(augmentation, DeviceAugmentation))}"
                                                     f"); set device: false")
    if wanted == "auto":
        return device.type == "cuda" and isinstance(augmentation, DeviceAugmentation)
    return wanted is True


def build_data(experiment: dict[str, Any], registry: Registry, rank: int, world_size: int, loader_workers: int,
               pin_memory: bool, device: torch.device) -> TrainingData:
    """The augmentation, the dataset and a DataLoader over this worker's shard, in an order set by the seed;
    on the device path (:func:`augments_on_device`) the loader yields padded batches of decoded images."""
    augmentation = build(registry, "augmentation", ("augmentation",), experiment["augmentation"])
    if not isinstance(augmentation, Augmentation):
        raise TypeError(f"augmentation '{experiment['augmentation']['name']}' does not meet the Augmentation "
                        f"protocol: it lacks {', '.join(missing_members(augmentation, Augmentation))}")
    on_device = augments_on_device(augmentation, experiment["augmentation"], device)
    images = registry.build("dataset", experiment["data"])
    if on_device:
        from sslcore.toolkit.device_views import pad_collate

        dataset: MultiViewDataset | DecodedImages = DecodedImages(images, augmentation.max_source_side)
        collate = pad_collate
    else:
        dataset, collate = MultiViewDataset(images, augmentation), None
    batch_size = experiment["train"]["batch_size"] // world_size
    # Each worker reads its own shard in an order set by (seed, epoch), from any batch on (a resume inside an
    # epoch): the sampler is made here rather than by Ray, whose default sampler ignores the experiment's seed.
    sampler = EpochSampler(len(dataset), experiment["seed"], rank, world_size, batch_size)
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=loader_workers, worker_init_fn=seed_worker, generator=generator,
                        pin_memory=pin_memory, collate_fn=collate,
                        # the CPU path reseeds its augmentation per epoch in the workers' dataset copies, so they
                        # restart each epoch; the device path's workers only decode and live through the run
                        persistent_workers=on_device and loader_workers > 0)
    return TrainingData(augmentation=augmentation, dataset=dataset, loader=loader, sampler=sampler,
                        generator=generator, batch_size=batch_size, on_device=on_device)
