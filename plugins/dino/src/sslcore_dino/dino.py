"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021), following facebookresearch/dino @ 7c446df5b9f45747937fb0d72314eb9f7b66930a
(``main_dino.py``: DINOLoss, train_one_epoch; ``utils.py``: MultiCropWrapper, cosine_scheduler,
cancel_gradients_last_layer; ``vision_transformer.py``: DINOHead).

A student network g_s (parameters theta_s: the backbone and the DINO head) and a teacher g_t of the same
architecture (theta_t) see the crops V of an image: the G = 2 global crops x_1^g, x_2^g and the local ones.
The teacher sees the global crops only, the student all of them. Each network ends in a head whose K outputs
(K = out_dim, 65536) turn into distributions by a softmax at a temperature:

    P_s(x) = softmax(g_s(x) / tau_s),   P_t(x) = softmax((g_t(x) - c) / tau_t)

tau_s = 0.1 for the student; the teacher's tau_t is lower (sharpening), raised linearly over the first
epochs from 0.04 (per epoch, as the official schedule). c (K) is the center, subtracted from the teacher's
outputs (centering); sharpening and centering together keep the teacher from collapsing. The student learns
to match the teacher across crops:

    L = 1 / #pairs  sum_{t in global crops} sum_{s in V, s != t}  H(P_t(x_t), P_s(x_s)),   H(a, b) = -sum_k a_k log b_k,

H averaged over the batch, #pairs = G (|V| - 1). After each loss the center follows the teacher's mean
output over the global batch, c <- m c + (1 - m) mean_i g_t(x_i) (m = 0.9). No gradient reaches the teacher:
after each optimizer step k it follows the student,

    theta_t <- lambda_k theta_t + (1 - lambda_k) theta_s,   lambda_k = 1 - (1 - lambda_0)(cos(pi k / K_steps) + 1) / 2,

lambda_0 = 0.996 raised to 1 along a cosine. The DINO head is a 3-layer MLP (GELU, hidden 2048) to a
256-d bottleneck, L2-normalised, then a weight-normalised bias-free Linear to K; its weight norms g are fixed
at 1 with ``norm_last_layer``, and the last layer gets no update in the first epoch (``freeze_last_layer``).
Only the student backbone is kept (``backbone``).
"""

from __future__ import annotations

import copy
import math
from itertools import pairwise
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from sslcore.api.hookspecs import Loss, Method, Slots
from sslcore.api.recipe import Schedule, TrainingStep
from sslcore.toolkit.distributed import is_distributed, world_size
from sslcore.toolkit.ema import momentum_update
from sslcore.toolkit.multicrop import encode_crops

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


@runtime_checkable
class SelfDistillationLoss(Loss, Protocol):
    """A self-distillation loss: loss(student, teacher, teacher_temperature), the student's outputs on every
    crop against the teacher's on the global crops."""

    def forward(self, student: list[Tensor], teacher: list[Tensor], teacher_temperature: float) -> Tensor:
        """``student``: one N x K tensor per crop, in view order (the global crops first); ``teacher``: one
        N x K tensor per global crop, without gradient; ``teacher_temperature``: tau_t of this step. Teacher
        crop t and student crop t are the same view."""


class DINOLossConfig(BaseModel):
    """The ``loss: {name: dino, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    student_temp: float = Field(0.1, gt=0, description="tau_s, the student's temperature (0.1)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="m, the EMA coefficient of the center c (0.9)")


class DINOLoss(nn.Module, SelfDistillationLoss):
    """DINO's cross-entropy with centering (the official ``DINOLoss``): for each teacher crop t and student
    crop s != t, -sum_k softmax((g_t - c) / tau_t)_k log softmax(g_s / tau_s)_k averaged over the rows, summed
    over the pairs and divided by their number. Then c <- m c + (1 - m) (the mean of the teacher's rows of
    both global crops over all workers). Computed in float32 even under autocast.

    ``dim`` is K, given by the method (default: DINO's out_dim 65536); the center ``center`` (1 x K) is a
    buffer, so checkpoints carry it.
    """

    def __init__(self, config: DINOLossConfig, *, dim: int = 65536) -> None:
        super().__init__()
        self.student_temp = config.student_temp
        self.center_momentum = config.center_momentum
        self.register_buffer("center", torch.zeros(1, dim))  # c: 1 x K

    def forward(self, student: list[Tensor], teacher: list[Tensor], teacher_temperature: float) -> Tensor:
        with torch.autocast(student[0].device.type, enabled=False):
            teacher = [t.detach().float() for t in teacher]  # G x (N x K)
            # P_t: the teacher's centred, sharpened distributions, one N x K per global crop
            targets = [F.softmax((t - self.center) / teacher_temperature, dim=-1) for t in teacher]
            # log P_s: one N x K per crop
            log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
            total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
            for t, target in enumerate(targets):
                for s, log_prob in enumerate(log_probs):
                    if s == t:  # the same view: no pair
                        continue
                    total = total + torch.sum(-target * log_prob, dim=-1).mean()
                    pairs += 1
            self.update_center(torch.cat(teacher))
            return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """c <- m c + (1 - m) mean of ``teacher`` ((G N) x K, this worker's rows) over every worker's rows."""
        batch_sum = teacher.sum(dim=0, keepdim=True)  # 1 x K
        rows = teacher.shape[0]
        if is_distributed():
            dist.all_reduce(batch_sum)
            rows *= world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / rows, alpha=1 - self.center_momentum)


class WeightNormalizedLinear(nn.Module):
    """A bias-free Linear whose weight is W = g V / ||V||, row by row (weight normalization, Salimans and
    Kingma 2016: ``torch.nn.utils.weight_norm`` on dim 0, as the official head's last layer, with its parameter
    names ``weight_g`` (K x 1) and ``weight_v`` (K x d)). V starts as a Linear's weight, g at 1."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's initialisation
        self.weight_v = nn.Parameter(v)  # V: K x d
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # g: K x 1

    @property
    def weight(self) -> Tensor:
        """W: K x d, each row of norm g."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # N x d -> N x K


class DINOHead(nn.Module):
    """The official ``DINOHead``: ``mlp``, Linear(in, hidden)-[BN]-GELU, (Linear(hidden, hidden)-[BN]-GELU) x
    (layers - 2), Linear(hidden, bottleneck) (one Linear(in, bottleneck) when layers is 1), weights
    trunc_normal(0.02), biases 0; then the L2 normalisation and ``last_layer``, weight-normalised, bias-free,
    to K, its g fixed at 1 with ``norm_last_layer`` (not trained)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            widths = [in_dim, *[hidden_dim] * (layers - 1)]
            modules: list[nn.Module] = []
            for d_in, d_out in pairwise(widths):
                modules += [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if use_bn else []), nn.GELU()]
            modules.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*modules)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # N x bottleneck, unit rows
        return self.last_layer(x)  # N x K


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float,
                        warmup_teacher_temp_epochs: int) -> float:
    """tau_t in ``epoch``, the official per-epoch schedule: ``np.linspace(warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs)[epoch]`` over the warmup epochs, then ``teacher_temp``."""
    if epoch >= warmup_teacher_temp_epochs:
        return teacher_temp
    if warmup_teacher_temp_epochs == 1:
        return warmup_teacher_temp
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / (warmup_teacher_temp_epochs - 1)


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with its stochastic depth (torchvision's ``StochasticDepth``, which sslcore's ViTs use) off:
    the official teacher is built without drop path."""
    from torchvision.ops import StochasticDepth

    for layer in module.modules():
        if isinstance(layer, StochasticDepth):
            layer.p = 0.0
    return module


class DINOConfig(BaseModel):
    """The ``method: {name: dino, ...}`` block (the official arguments' names)."""

    model_config = ConfigDict(extra="forbid")

    out_dim: int = Field(65536, ge=1, description="K, the width of the head's output (65536)")
    hidden_dim: int = Field(2048, ge=1, description="hidden width of the head's MLP (2048)")
    bottleneck_dim: int = Field(256, ge=1, description="width of the L2-normalised bottleneck (256)")
    head_layers: int = Field(3, ge=1, description="Linear layers of the head's MLP before the bottleneck (3)")
    use_bn_in_head: bool = Field(False, description="BatchNorm after the hidden Linears of the head")
    norm_last_layer: bool = Field(False, description="fix the norms g of the last layer at 1 (README: false for "
                                                     "vit_small, the official default true)")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="lambda_0, the teacher's EMA coefficient at the "
                                                                   "first step, raised to 1 along a cosine")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="tau_t in the first epoch")
    teacher_temp: float = Field(0.07, gt=0, description="tau_t after the warmup (README: 0.07)")
    warmup_teacher_temp_epochs: int = Field(30, ge=0, description="epochs of the linear tau_t warmup (README: 30)")
    freeze_last_layer: int = Field(1, ge=0, description="epochs in which the head's last layer is not updated")
    global_crops: int = Field(2, ge=1, description="G, the first views, which the teacher sees (2)")


class DINO(nn.Module, Method):
    """DINO: the student (``backbone``, ``head``) and the EMA teacher (``teacher_backbone``,
    ``teacher_head``); see the module docstring.

    ``forward`` runs the backbones on the crops one resolution at a time and each head once over all their
    features (the official ``MultiCropWrapper``, :func:`sslcore.toolkit.multicrop.encode_crops`), and calls
    the ``loss`` slot as ``loss(student, teacher, tau_t)``. The step hooks do the rest of the official loop:
    ``on_step_start`` sets tau_t of the step's epoch, ``before_optimizer_step`` drops the last layer's
    gradients in the first ``freeze_last_layer`` epochs (after the engine's clipping, as the official code),
    ``after_optimizer_step`` moves the teacher by the EMA with the engine's ``teacher_momentum`` of the step.
    The teacher starts as a copy of the student, without drop path, and is never trained.
    """

    def __init__(self, config: DINOConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # the student's backbone
        self.head = DINOHead(encoder.feature_dim, config.out_dim, hidden_dim=config.hidden_dim,
                             bottleneck_dim=config.bottleneck_dim, layers=config.head_layers,
                             use_bn=config.use_bn_in_head, norm_last_layer=config.norm_last_layer)
        self.teacher_backbone = without_drop_path(copy.deepcopy(encoder)).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.loss = slots.build("loss", dim=config.out_dim)
        self.config = config
        self.teacher_temperature = self.temperature_of(0)  # set by on_step_start for every step

    def temperature_of(self, epoch: int) -> float:
        c = self.config
        return teacher_temperature(epoch, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)

    def schedules(self) -> dict[str, Schedule]:
        """lambda_k: from momentum_teacher at step 0 along the half cosine to 1 at the last step."""
        return {"teacher_momentum": Schedule(start=self.config.momentum_teacher, end=1.0)}

    def on_step_start(self, step: TrainingStep) -> None:
        self.teacher_temperature = self.temperature_of(step.epoch)

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> dict[str, Tensor]:
        g = self.config.global_crops
        if len(views) < g:
            raise ValueError(f"DINO's teacher sees the first {g} views (global_crops) and the augmentation makes "
                             f"{len(views)}")
        n = views[0].shape[0]  # N images, each in every view
        student = self.head(encode_crops(self.backbone, views)).split(n)  # |V| x (N x K)
        with torch.no_grad():
            teacher = self.teacher_head(encode_crops(self.teacher_backbone, views[:g])).split(n)  # G x (N x K)
        loss = self.loss(list(student), list(teacher), self.teacher_temperature)
        return {"loss": loss, "teacher_temperature": loss.new_tensor(self.teacher_temperature).detach(),
                **self.loss.metrics()}

    def before_optimizer_step(self, step: TrainingStep) -> None:
        """The official cancel_gradients_last_layer: no update of the last layer while epoch < freeze_last_layer."""
        if step.epoch < self.config.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, step: TrainingStep) -> None:
        self.update_teacher(step.values["teacher_momentum"])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- lambda theta_t + (1 - lambda) theta_s, for the backbone and the head (parameters only:
        the teacher's BatchNorm statistics are its own, as in the official code)."""
        momentum_update([*self.teacher_backbone.parameters(), *self.teacher_head.parameters()],
                        [*self.backbone.parameters(), *self.head.parameters()], momentum)
