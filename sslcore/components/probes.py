"""Evaluators that train a classifier on the backbone: the protocols papers report.

- ``linear_probe``: a linear classifier on the frozen backbone's features. Two protocols:

  - ``moco``: MoCo's ``main_lincls.py`` (He et al. 2020). The backbone stays in eval mode (BatchNorm
    statistics frozen) and sees a new random crop (8-100%) and flip of each training image every epoch;
    the classifier starts from weights N(0, 0.01^2) and zero bias and is trained by SGD, lr 30, momentum
    0.9, no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80 (or a cosine schedule).
    Top-1/top-5 of the last epoch on the test set (MoCo's script prints the best epoch's; we do not pick
    epochs on the test set).
  - ``fast``: the online monitor. Features of the unaugmented training images are computed once and
    standardised; a multinomial logistic regression is fitted by L-BFGS for each L2 penalty of a grid,
    the penalty with the best top-1 on a held-out part of the training set is kept, and the classifier
    is refitted on the whole training set with it (the CLIP paper's probe, in torch).

- ``low_shot_svm``: the low-shot protocol of PCL (Li et al. 2021, ``eval_svm_voc.py --low-shot``).
  Features are L2-normalised (x / (||x|| + 1e-5)); for k in {1, 2, 4, 8, 16} labelled images per class,
  drawn 5 times, one linear SVM per class (scikit-learn LinearSVC, cost 0.5, class weights {+1: 2,
  -1: 1}, squared hinge, L2, tol 1e-4, max_iter 2000) is trained one-vs-rest. On a single-label dataset
  each test image takes the class whose SVM scores it highest (top-1); the mean average precision over
  classes (PCL's VOC07 metric) is reported too. Mean and standard deviation over the draws.

- ``finetune``: semi-supervised classification. For each fraction of labels (1% and 10%), a class-balanced
  subset of the training set (the same number of images per class, a fixed seed) fine-tunes a copy of the
  whole backbone with a new linear classifier: SGD with momentum 0.9, 20 epochs, lr 0.01 for the backbone
  and 0.1 for the classifier, both x0.2 at epochs 12 and 16 (PCL's semi-supervised schedule), BatchNorm in
  training mode. Top-1/top-5 on the test set.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Subset

from sslcore import hookimpl
from sslcore.api.errors import UserError
from sslcore.api.hookspecs import RegisterEvaluator
from sslcore.components.evaluators import DATASET_BLOCK
from sslcore.toolkit.batchnorm import plain_batchnorm

if TYPE_CHECKING:
    from sslcore.engine.context import EvalContext


def _test_data() -> Any:
    return Field(description="The labelled test set, a dataset block such as {name: image_folder, root: .../test}.",
                 json_schema_extra=DATASET_BLOCK)


def _train_data() -> Any:
    return Field(None, description="The labelled training set, a dataset block; None: the experiment's data.",
                 json_schema_extra=DATASET_BLOCK)


# -- shared pieces ---------------------------------------------------------------------------------------

def sample_per_class(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (sorted) of exactly ``k`` items of every class in ``labels``, drawn without replacement."""
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        if len(members) < k:
            raise ValueError(f"class {label} has {len(members)} labelled images, fewer than the {k} asked for")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def subset_seed(*parts: int) -> int:
    """A seed for one draw, e.g. (seed, k, draw): independent streams whatever the other draws are."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``scores`` (T x C) whose ``k`` highest classes include the row's label."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.unsqueeze(1).to(top.device)).any(dim=1).double().mean().item()


def _num_classes(context: EvalContext, block: dict[str, Any] | None, labels: torch.Tensor) -> int:
    return max(len(context.classes(block)), int(labels.max()) + 1)


def _labelled_targets(context: EvalContext, block: dict[str, Any] | None, name: str) -> torch.Tensor:
    """The training set's labels, refusing a set with unlabelled images in one line naming the key."""
    targets = context.targets(block)
    if (targets < 0).any():
        raise UserError(f"{name} (evaluators[{name}].train_data) needs labelled data: give a folder of class "
                        "subfolders (image_folder, labeled: true)")
    return targets


def _check_same_classes(context: EvalContext, name: str, train: dict[str, Any] | None,
                        test: dict[str, Any]) -> None:
    train_classes, test_classes = context.classes(train), context.classes(test)
    if train_classes and test_classes and train_classes != test_classes:
        raise UserError(f"{name}: the test set's classes {test_classes} (evaluators[{name}].data) differ from "
                        f"the training set's {train_classes}; labels would not mean the same class in both")


# -- linear probe ----------------------------------------------------------------------------------------

class LinearProbeConfig(BaseModel):
    """Parameters of the linear probe (see the module docstring for both protocols)."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["fast", "moco"] = Field("fast", description="'fast': L-BFGS on cached features (the "
                                              "online monitor); 'moco': MoCo's SGD protocol on augmented images")
    every_epochs: int | None = Field(None, ge=0, description="Evaluate every this many epochs; 0: only at the "
                                     "end; None: 10 for 'fast', 0 for 'moco'.")
    data: dict[str, Any] = _test_data()
    train_data: dict[str, Any] | None = _train_data()
    seed: int = Field(0, description="Seed of the held-out split (fast) or of the shuffling (moco)")
    weight_decays: list[float] = Field([0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0], min_length=1,
                                       description="fast: the L2 penalties tried (on the mean cross-entropy)")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="fast: share of the training set held "
                                       "out to choose the penalty (unused with one penalty)")
    max_iter: int = Field(500, gt=0, description="fast: L-BFGS iterations per fit")
    epochs: int = Field(100, gt=0, description="moco: training epochs")
    lr: float = Field(30.0, gt=0, description="moco: SGD learning rate (30 for batch 256)")
    momentum: float = Field(0.9, ge=0, lt=1, description="moco: SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="moco: SGD weight decay")
    batch_size: int = Field(256, gt=0, description="moco: batch size")
    schedule: Literal["step", "cosine"] = Field("step", description="moco: lr x0.1 at each of 'milestones', "
                                                "or cosine decay to 0")
    milestones: list[int] = Field([60, 80], description="moco: epochs after which the step schedule cuts lr")


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            weight_decay: float, max_iter: int = 500) -> nn.Linear:
    """Multinomial logistic regression, minimising mean cross-entropy + weight_decay / 2 * ||W||^2 by
    full-batch L-BFGS (strong Wolfe line search). ``features``: N x D, ``labels``: N."""
    linear = nn.Linear(features.shape[1], num_classes, device=features.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(features), labels) + weight_decay / 2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.requires_grad_(False)


def linear_probe_fast(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      num_classes: int, weight_decays: list[float], validation_fraction: float = 0.2,
                      seed: int = 0, max_iter: int = 500) -> dict[str, float]:
    """The fast protocol on features: standardise with the training set's statistics, choose the penalty on
    a held-out split, refit on everything, score the test set."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
        held = max(1, round(validation_fraction * len(train_x)))
        val, fit = order[:held], order[held:]
        scores = []
        for weight_decay in weight_decays:
            linear = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, weight_decay, max_iter)
            scores.append(topk_accuracy(linear(train_x[val]), train_y[val], 1))
        # ties go to the strongest penalty
        chosen = max(zip(scores, weight_decays))[1]
    linear = fit_logistic_regression(train_x, train_y, num_classes, chosen, max_iter)
    logits = linear(test_x)
    return {"linear_fast_top1": topk_accuracy(logits, test_y, 1), "linear_fast_top5": topk_accuracy(logits, test_y, 5),
            "linear_fast_weight_decay": chosen}


class LinearProbeEvaluator:
    """Top-1/top-5 of a linear classifier on frozen features, by the ``fast`` or ``moco`` protocol."""

    def __init__(self, config: LinearProbeConfig) -> None:
        self.config = config
        default_every = 10 if config.protocol == "fast" else 0
        self.every_epochs = default_every if config.every_epochs is None else config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        config = self.config
        _check_same_classes(context, "linear_probe", config.train_data, config.data)
        test_x, test_y = context.labelled_features(backbone, config.data,
                                                   "linear_probe (evaluators[linear_probe].data)")
        if config.protocol == "fast":
            where = "linear_probe (evaluators[linear_probe].train_data)"
            train_x, train_y = context.labelled_features(backbone, config.train_data, where)
            num_classes = _num_classes(context, config.train_data, train_y)
            device = context.device
            return linear_probe_fast(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                                     num_classes, config.weight_decays, config.validation_fraction,
                                     config.seed, config.max_iter)
        return self._moco_protocol(backbone, context, test_x, test_y)

    def _moco_protocol(self, backbone: nn.Module, context: EvalContext, test_x: torch.Tensor,
                       test_y: torch.Tensor) -> dict[str, float]:
        config = self.config
        targets = _labelled_targets(context, config.train_data, "linear_probe")
        num_classes = _num_classes(context, config.train_data, targets)
        classifier = nn.Linear(test_x.shape[1], num_classes, device=context.device)
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        if config.schedule == "step":
            scheduler: Any = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.milestones, gamma=0.1)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        loader = DataLoader(context.dataset(config.train_data, augmented=True), batch_size=config.batch_size,
                            shuffle=True, num_workers=context.num_workers,
                            generator=torch.Generator().manual_seed(config.seed))
        backbone.eval()  # frozen, BatchNorm statistics included
        for _ in range(config.epochs):
            for images, labels in loader:
                with torch.no_grad(), context.autocast():
                    features = backbone(context.to_device(images)).float()
                loss = F.cross_entropy(classifier(features), labels.to(context.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        with torch.no_grad():
            logits = classifier(test_x.to(context.device))
        return {"linear_top1": topk_accuracy(logits, test_y, 1), "linear_top5": topk_accuracy(logits, test_y, 5)}


# -- low-shot SVM ----------------------------------------------------------------------------------------

class LowShotSVMConfig(BaseModel):
    """Parameters of PCL's low-shot SVM protocol."""

    model_config = ConfigDict(extra="forbid")

    shots: list[int] = Field([1, 2, 4, 8, 16], min_length=1, description="k: labelled images per class")
    draws: int = Field(5, gt=0, description="random draws of the k images per class, for mean and std")
    cost: float = Field(0.5, gt=0, description="C of LinearSVC (PCL: 0.5)")
    seed: int = Field(0, description="seed of the draws")
    every_epochs: int = Field(0, ge=0, description="Evaluate every this many epochs; 0: only at the end.")
    data: dict[str, Any] = _test_data()
    train_data: dict[str, Any] | None = _train_data()


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """x / (||x|| + 1e-5), row by row (PCL's eval_svm_voc.py)."""
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def one_vs_rest_svm_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                           cost: float = 0.5) -> np.ndarray:
    """Decision values (T x C) of one LinearSVC per class, trained on that class (+1) against the rest (-1)
    with PCL's settings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    scores = np.zeros((len(test_x), num_classes))
    for label in range(num_classes):
        svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                        loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0)
        with warnings.catch_warnings():  # PCL's runs stop at max_iter too
            warnings.simplefilter("ignore", ConvergenceWarning)
            svm.fit(train_x, np.where(train_y == label, 1, -1))
        scores[:, label] = svm.decision_function(test_x)
    return scores


def low_shot_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 shots: list[int], draws: int = 5, cost: float = 0.5, seed: int = 0) -> dict[str, float]:
    """PCL's low-shot SVM on features: for each k, ``draws`` draws of k images per class; returns
    ``svm_k{k}_top1``, ``svm_k{k}_map`` and their ``_std`` over the draws (population std, as PCL)."""
    from sklearn.metrics import average_precision_score

    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    labels = torch.as_tensor(train_y)
    results: dict[str, float] = {}
    for k in shots:
        top1, mean_ap = [], []
        for draw in range(draws):
            chosen = sample_per_class(labels, k, torch.Generator().manual_seed(subset_seed(seed, k, draw))).numpy()
            scores = one_vs_rest_svm_scores(train_x[chosen], train_y[chosen], test_x, num_classes, cost)
            top1.append(float((scores.argmax(1) == test_y).mean()))
            present = [c for c in range(num_classes) if (test_y == c).any()]
            mean_ap.append(float(np.mean([average_precision_score(test_y == c, scores[:, c]) for c in present])))
        results.update({f"svm_k{k}_top1": float(np.mean(top1)), f"svm_k{k}_top1_std": float(np.std(top1)),
                        f"svm_k{k}_map": float(np.mean(mean_ap)), f"svm_k{k}_map_std": float(np.std(mean_ap))})
    return results


class LowShotSVMEvaluator:
    """PCL's low-shot linear SVMs on frozen, L2-normalised features."""

    def __init__(self, config: LowShotSVMConfig) -> None:
        self.config = config
        self.every_epochs = config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        config = self.config
        _check_same_classes(context, "low_shot_svm", config.train_data, config.data)
        train_x, train_y = context.labelled_features(backbone, config.train_data,
                                                     "low_shot_svm (evaluators[low_shot_svm].train_data)")
        test_x, test_y = context.labelled_features(backbone, config.data,
                                                   "low_shot_svm (evaluators[low_shot_svm].data)")
        try:
            return low_shot_svm(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), config.shots,
                                config.draws, config.cost, config.seed)
        except ValueError as exc:
            raise UserError(f"low_shot_svm (evaluators[low_shot_svm].shots): {exc}; lower shots") from None


# -- semi-supervised fine-tuning -------------------------------------------------------------------------

class FinetuneConfig(BaseModel):
    """Parameters of semi-supervised fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    fractions: list[float] = Field([0.01, 0.1], min_length=1, description="Shares of the training labels, "
                                   "each a class-balanced subset (round(f N / C) images per class)")
    epochs: int = Field(20, gt=0, description="Epochs over each subset")
    batch_size: int = Field(256, gt=0, description="Batch size (at most the subset)")
    backbone_lr: float = Field(0.01, ge=0, description="SGD learning rate of the backbone")
    head_lr: float = Field(0.1, gt=0, description="SGD learning rate of the new linear classifier")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay")
    milestones: list[int] = Field([12, 16], description="Epochs after which both learning rates are cut")
    gamma: float = Field(0.2, gt=0, le=1, description="Factor of each cut")
    seed: int = Field(0, description="Seed of the subsets, the classifier's initialisation and the shuffling")
    every_epochs: int = Field(0, ge=0, description="Evaluate every this many epochs; 0: only at the end.")
    data: dict[str, Any] = _test_data()
    train_data: dict[str, Any] | None = _train_data()


class FinetuneEvaluator:
    """Top-1/top-5 after fine-tuning a copy of the backbone on 1% and 10% of the labels."""

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config
        self.every_epochs = config.every_epochs

    def evaluate(self, backbone: nn.Module, context: EvalContext) -> dict[str, float]:
        config = self.config
        _check_same_classes(context, "finetune", config.train_data, config.data)
        targets = _labelled_targets(context, config.train_data, "finetune")
        num_classes = _num_classes(context, config.train_data, targets)
        results: dict[str, float] = {}
        for fraction in config.fractions:
            per_class = max(1, round(fraction * len(targets) / num_classes))
            try:
                chosen = sample_per_class(targets, per_class, torch.Generator().manual_seed(
                    subset_seed(config.seed, round(fraction * 1e6))))
            except ValueError as exc:
                raise UserError(f"finetune (evaluators[finetune].fractions): {fraction:g} of the labels: {exc}; "
                                "lower the fraction") from None
            model, classifier = self._finetune(backbone, context, chosen, num_classes)
            test_x, test_y = context.labelled_features(model, config.data, "finetune (evaluators[finetune].data)")
            with torch.no_grad():
                logits = classifier(test_x.to(context.device))
            name = f"finetune_{fraction * 100:g}pct".replace(".", "_")
            results.update({f"{name}_top1": topk_accuracy(logits, test_y, 1),
                            f"{name}_top5": topk_accuracy(logits, test_y, 5), f"{name}_images": float(len(chosen))})
        return results

    def _finetune(self, backbone: nn.Module, context: EvalContext, chosen: torch.Tensor,
                  num_classes: int) -> tuple[nn.Module, nn.Linear]:
        config = self.config
        torch.manual_seed(config.seed)
        model = plain_batchnorm(copy.deepcopy(backbone)).requires_grad_(True)
        classifier = nn.Linear(backbone.feature_dim, num_classes, device=context.device)  # an Encoder
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        optimizer = torch.optim.SGD([{"params": model.parameters(), "lr": config.backbone_lr},
                                     {"params": classifier.parameters(), "lr": config.head_lr}],
                                    momentum=config.momentum, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.milestones, gamma=config.gamma)
        scaler = torch.amp.GradScaler(context.device.type, enabled=context.autocast_dtype == torch.float16)
        batch_size = min(config.batch_size, len(chosen))
        subset = Subset(context.dataset(config.train_data, augmented=True), chosen.tolist())
        # a last batch of one image has no BatchNorm statistics
        loader = DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=context.num_workers,
                            drop_last=len(chosen) % batch_size == 1,
                            generator=torch.Generator().manual_seed(config.seed))
        model.train()
        for _ in range(config.epochs):
            for images, labels in loader:
                with context.autocast():
                    logits = classifier(model(context.to_device(images)))
                loss = F.cross_entropy(logits.float(), labels.to(context.device))
                if not math.isfinite(loss.item()):
                    raise UserError(f"finetune: the loss is {loss.item()}; lower evaluators[finetune].backbone_lr "
                                    "and head_lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
        return model.eval(), classifier.requires_grad_(False)


@hookimpl
def register_evaluators(register: RegisterEvaluator) -> None:
    register("linear_probe", LinearProbeEvaluator, config=LinearProbeConfig)
    register("low_shot_svm", LowShotSVMEvaluator, config=LowShotSVMConfig)
    register("finetune", FinetuneEvaluator, config=FinetuneConfig)
