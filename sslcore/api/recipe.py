"""A training recipe: the ``train`` block of the experiment file, and the schedules of values over training.

A method registers its recipe, a partial ``train`` block in these same keys (``register(..., recipe={...})``),
so that ``method: X`` alone trains the paper's recipe; the experiment's ``train:`` overrides it key by key
(``optimizer`` and each of ``param_groups`` too, key by key; an ``optimizer`` of another name replaces the
method's). ``sslcore validate --resolved`` prints what will run.

The learning rate is written as the paper writes it, a base value with a rule (``lr_scaling``) for the
global batch B: ``linear`` lr = base x B / 256 (MoCo, SimSiam, BYOL, Barlow Twins, VICReg, MAE),
``sqrt`` lr = base x sqrt(B) (SimCLR's alternative), ``none`` lr = base. Each optimizer step t sets the
lr of every parameter group to its peak lr times the schedule's factor at t (:class:`Schedule`): linear
warmup from 0 over ``warmup_epochs``, then cosine from 1 to ``final_lr``, constant, or ``step``: times
``gamma`` at each of ``milestones`` (epochs; RotNet's multi-step decay).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Block = dict[str, Any]
LrScaling = Literal["linear", "sqrt", "none"]

#: the parameter group that every method has: every trainable tensor with at most one dimension (biases,
#: BatchNorm and LayerNorm scales and shifts), the ones papers exempt from weight decay and LARS' trust ratio
BIAS_AND_NORM = "bias_and_norm"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamGroup(_Model):
    """How one named group of parameters is optimised (``train.param_groups.NAME``). Unset keys: as the rest."""

    lr: float | None = Field(None, gt=0, description="Base learning rate of this group, scaled by lr_scaling as "
                                                     "the optimizer's (Barlow Twins: 0.0048 for biases and norms, "
                                                     "0.2 for weights). Default: the optimizer's lr.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay of this group (0: exempt, as MAE's "
                                                               "biases and norms). Default: the optimizer's.")
    lars_exclude: bool = Field(False, description="LARS: no trust ratio for this group, plain SGD with momentum "
                                                  "(SimCLR, BYOL, Barlow Twins, VICReg: biases and norms). Other "
                                                  "optimizers have no trust ratio and ignore it.")
    fixed_lr: bool = Field(False, description="Keep this group at its peak lr throughout, off the warmup and "
                                              "the decay (SimSiam's fix_pred_lr for the predictor).")


class TrainConfig(_Model):
    """The ``train`` block: the recipe (a method's defaults) and how this machine runs it."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="Global batch size B, split evenly over the workers.")
    optimizer: Block = Field(default_factory=lambda: {"name": "sgd"},
                             description="{name: sgd|adamw|lars|..., lr: base lr, **params}: a registered optimizer")
    lr_scaling: LrScaling = Field(
        "linear", description="How the optimizer's base lr becomes the lr of global batch B: linear, base x B/256; "
                              "sqrt, base x sqrt(B) (SimCLR); none, the base lr as written.")
    warmup_epochs: float = Field(0, ge=0, description="Linear warmup to the peak lr over these epochs.")
    warmup_start: float = Field(0.0, ge=0, le=1, description="Where the warmup starts, as a fraction of the peak lr "
                                                             "(SwAV: 0.3 of 4.8, 0.0625).")
    schedule: Literal["cosine", "constant", "step"] = Field(
        "cosine", description="After the warmup: cosine decay to final_lr, constant, or step: multiplied by gamma "
                              "at each of milestones.")
    milestones: list[float] = Field(default_factory=list, description="schedule step: the epochs at which the lr "
                                                                     "is multiplied by gamma (RotNet: [30, 60, 80]).")
    gamma: float = Field(0.1, gt=0, description="schedule step: the factor applied at each milestone.")
    final_lr: float = Field(0.0, ge=0, le=1, description="Where the cosine ends, as a fraction of the peak lr "
                                                         "(Barlow Twins, VICReg: 0.001).")
    weight_decay_end: float | None = Field(
        None, ge=0, description="Cosine schedule of the weight decay from the optimizer's value to this one over "
                                "the run (DINO: 0.04 -> 0.4), for every group that keeps the optimizer's weight "
                                "decay; default: constant.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the L2 norm of the gradients to this value before "
                                                           "each optimizer step; default: no clipping.")
    grad_clip_mode: Literal["total", "per_parameter"] = Field(
        "total", description="total: the norm of all gradients together (torch's clip_grad_norm_); per_parameter: "
                             "each parameter's gradient on its own (DINO's utils.clip_gradients).")
    param_groups: dict[str, ParamGroup] = Field(
        default_factory=dict, description="Settings per named group: 'bias_and_norm' (every 1-D parameter) and "
                                          "the groups the method names (e.g. SimSiam's 'predictor').")
    sync_batchnorm: bool = Field(
        False, description="BatchNorm statistics over the global batch (torch's SyncBatchNorm) with several GPU "
                           "workers, as the official multi-GPU recipes of SimCLR, BYOL, SimSiam, Barlow Twins, "
                           "VICReg, SwAV, DeepCluster v2 and DINO do (their recipes set it). CPU workers keep "
                           "per-worker statistics (torch's SyncBatchNorm runs on GPUs only), and the run says so at "
                           "its start.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype of the training step and the evaluators. auto: bf16 on a GPU that "
                            "supports it (else fp16), bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), "
                            "else fp32. See bench/results.md for speed and kNN of each.")
    channels_last: bool = Field(True, description="Images and model in channels_last memory format (faster "
                                                  "convolutions on CPU with oneDNN and on GPU tensor cores).")
    compile: bool = Field(False, description="torch.compile the method's encoders and heads (compiles during "
                                             "the first steps).")
    loader_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes per training worker (default: from its CPUs).")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (quick runs).")
    log_every_steps: int = Field(10, ge=1)
    eval_at_start: bool = Field(False, description="Run the evaluators on the untrained encoder too (the floor).")


def peak_lr(base: float, scaling: LrScaling, global_batch_size: int) -> float:
    """The lr that a base lr stands for at global batch B under ``scaling`` (see the module docstring)."""
    if scaling == "linear":
        return base * global_batch_size / 256
    if scaling == "sqrt":
        return base * math.sqrt(global_batch_size)
    return base


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the optimizer step: the learning-rate factor, BYOL's EMA coefficient tau,
    a weight decay, a teacher temperature.

    Over the first ``warmup_epochs`` it rises linearly from ``warmup_start`` to ``start`` (reaching ``start``
    at the last warmup step); then it goes from ``start`` at the first step after the warmup to ``end`` at the
    last step of training, along a half cosine (``end + (start - end)(1 + cos(pi p)) / 2`` at progress p) or a
    line; ``end`` None keeps ``start``. Shape ``step`` ignores ``end``: ``start`` times ``gamma`` for each of
    ``milestones`` (epochs) that the step has reached. A pure function of the step: a resumed run, whose
    step is restored from its checkpoint, gets the values of the uninterrupted one.
    """

    start: float
    end: float | None = None
    shape: Literal["cosine", "linear", "step"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def at(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The value at optimizer step ``step`` (0-based) of a run of ``total_steps``."""
        warmup_steps = round(self.warmup_epochs * steps_per_epoch)
        if step < warmup_steps:
            return self.warmup_start + (self.start - self.warmup_start) * (step + 1) / warmup_steps
        if self.shape == "step":
            return self.start * self.gamma ** sum(step >= round(m * steps_per_epoch) for m in self.milestones)
        if self.end is None:
            return self.start
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if self.shape == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainingStep:
    """What the engine tells a method's step hooks about the optimizer step they surround."""

    index: int  #: optimizer steps taken before this one (0 for the first of the run)
    epoch: int
    steps_per_epoch: int
    total_steps: int
    #: the method's scheduled hyperparameters (``Method.schedules()``) at this step
    values: Mapping[str, float] = field(default_factory=dict)
