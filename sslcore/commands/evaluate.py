"""``sslcore eval``: run evaluators on a trained run, an exported backbone, or the same encoder untrained.

``TARGET`` is a run folder (its ``config.yaml`` and latest checkpoint) or a weights file: a backbone
``state_dict`` written by ``sslcore export`` or at the end of training (``backbone.pt``), or a checkpoint
(``state.pt``). A weights file takes its experiment from ``--config``, else from the ``.yaml`` that
``sslcore export`` writes beside it, else from the ``config.yaml`` of the folder it lies in. The experiment
gives the encoder, the eval transform (its augmentation block), the training data and the precision.

Each evaluator starts from the run's own block of that name, if the run had one, else from its defaults
with the ``data`` of the run's first evaluator (its test set); ``--set key=value`` changes it (with several
evaluators, ``--set NAME.key=value`` changes one). Results are printed and kept in ``evaluations.json`` of
the output folder (the run folder by default), where ``sslcore report`` finds them; ``--random-init``
evaluates the encoder as built from the experiment's seed, untrained, and keeps it as ``NAME@random_init``.

:func:`find_target` and :func:`load_backbone` resolve and load a TARGET; ``sslcore embed`` and ``sslcore search``
use them too.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sslcore.api.errors import UserError
from sslcore.config import Resolved, apply_overrides, load_yaml, resolve, resolve_block
from sslcore.engine.context import EvalContext
from sslcore.engine.launch import dry_build
from sslcore.engine.loop import AUTOCAST_DTYPES, resolve_precision, seed_everything
from sslcore.engine.rundir import RunDir, load_torch_file
from sslcore.registry import Registry

if TYPE_CHECKING:
    from sslcore.api.hookspecs import Augmentation

RANDOM_INIT = "random_init"
logger = logging.getLogger(__name__)


def _config_and_weights(target: Path, config: Path | None, command: str = "eval") -> tuple[Path, Path | None]:
    """The experiment file and weights file of ``target`` (weights None: a run without checkpoints);
    ``command`` names the subcommand in errors."""
    if config is not None and not config.is_file():
        raise UserError(f"sslcore {command} --config {config}: no such file" if not config.exists() else
                        f"sslcore {command} --config {config}: not a file; give the experiment YAML of the weights")
    if target.is_dir():
        run = RunDir(target)
        weights = run.latest_checkpoint() or (run.backbone_file if run.backbone_file.is_file() else None)
        candidates = [config, run.config_file]
    elif target.is_file():
        weights = target
        candidates = [config, target.with_suffix(".yaml"), RunDir(target.parent).config_file,
                      RunDir(target.parent.parent).config_file]  # a checkpoint_*/state.pt
    else:
        raise UserError(f"sslcore {command} {target}: no such run folder or weights file")
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate, weights
    raise UserError(f"sslcore {command} {target}: no experiment found (looked for "
                    f"{', '.join(str(c) for c in candidates if c is not None)}); pass --config EXPERIMENT.yaml")


def _read_weights(weights: Path) -> dict[str, Any]:
    """A backbone ``state_dict`` or an sslcore checkpoint (a dict with its ``model``)."""
    fix = "give a backbone.pt (sslcore export, or the end of training) or a checkpoint's state.pt"
    state = load_torch_file(weights, "{path}: {reason}; " + fix)
    if not isinstance(state, dict):
        raise UserError(f"{weights}: holds a {type(state).__name__}, not a state_dict or an sslcore checkpoint; "
                        f"{fix}")
    return state


def _load_weights(backbone: torch.nn.Module, method: torch.nn.Module, weights: Path, state: dict[str, Any]) -> int:
    """Load ``state`` (read from ``weights``) into the method (a checkpoint) or the backbone (a state_dict);
    returns the epoch trained (-1 when the file does not say)."""
    try:
        if "model" in state and isinstance(state["model"], dict):
            method.load_state_dict(state["model"])
            return int(state.get("epoch", -1))
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{weights} does not fit the experiment's encoder: {' '.join(first[:2])[:300]}; "
                        "pass the --config it was trained with") from None
    return -1


def _evaluator_blocks(run_blocks: list[dict[str, Any]], names: list[str], overrides: list[str],
                      registry: Registry, source: Path) -> list[dict[str, Any]]:
    """The block of each evaluator of ``names``: the run's own, else its defaults with the run's test data
    (``source``: the experiment file), then ``overrides``."""
    test_data = next((b["data"] for b in run_blocks if isinstance(b.get("data"), dict)), None)
    blocks = []
    for name in names:
        block = copy.deepcopy(next((b for b in run_blocks if b["name"] == name), {"name": name}))
        needs_data = False
        if name in registry.components["evaluator"]:
            field = registry.get("evaluator", name).config.model_fields.get("data")
            needs_data = field is not None and field.is_required() and "data" not in block
            if needs_data and test_data is not None:
                block["data"] = copy.deepcopy(test_data)
        params = {k: v for k, v in block.items() if k != "name"}
        mine = [override for o in overrides if (override := _override_for(o, name, names)) is not None]
        apply_overrides(params, mine, {})
        if needs_data and test_data is None and not (isinstance(params.get("data"), dict) and "name" in params["data"]):
            raise UserError(f"{source}: the run has no evaluator to take the test data of {name} from; give it "
                            "with --set data.name=image_folder --set data.root=TEST_FOLDER")
        blocks.append(resolve_block(registry, "evaluator", {"name": name, **params},
                                    source=f"sslcore eval --evaluator {name}"))
    return blocks


def _override_for(override: str, name: str, names: list[str]) -> str | None:
    """``override`` as it applies to evaluator ``name``: ``NAME.key=v`` is ``key=v`` for NAME and nothing
    for the others; ``key=v`` applies to every evaluator."""
    first, dot, rest = override.partition(".")
    if dot and first in names and "=" not in first:
        return rest if first == name else None
    return override


def _device(name: str | None, command: str = "eval") -> torch.device:
    """The ``--device`` to run on (default: cuda when there is one), checked before anything is built."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"sslcore {command} --device {name}: not a device torch knows; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"sslcore {command} --device {name}: this machine has no CUDA device; use --device cpu")
    return device


@dataclass
class Target:
    """A TARGET of ``sslcore eval`` (or embed, search) found and its experiment validated, nothing built yet."""

    config_file: Path  # the experiment the weights were trained with
    weights: Path | None  # None: a run without checkpoints (only --random-init can use it)
    resolved: Resolved
    device: torch.device


@dataclass
class LoadedBackbone:
    """A TARGET's backbone with its trained weights, in eval mode on its device, and what evaluating it needs."""

    backbone: torch.nn.Module
    augmentation: Augmentation  # the experiment's; ``augmentation.eval`` is the eval transform
    experiment: dict[str, Any]  # resolved
    weights: str  # the weights file, or RANDOM_INIT
    epoch: int  # the epoch trained, -1 when the weights do not say
    device: torch.device

    def context(self, registry: Registry, run_dir: Path | None = None) -> EvalContext:
        """The :class:`EvalContext` of the run: its eval transform, training data, precision, memory format."""
        train = self.experiment["train"]
        loader_workers = train["loader_workers"]
        return EvalContext(
            registry=registry, eval_transform=self.augmentation.eval, train_data=self.experiment["data"],
            device=self.device, batch_size=256,
            num_workers=loader_workers if loader_workers is not None else (4 if self.device.type == "cuda" else 0),
            epoch=self.epoch, channels_last=train["channels_last"],
            autocast_dtype=AUTOCAST_DTYPES[resolve_precision(train["precision"], self.device)], run_dir=run_dir,
            labelled_transform=self.augmentation.labelled)


def find_target(target: Path, registry: Registry, config: Path | None = None, device: str | None = None, *,
                random_init: bool = False, command: str = "eval") -> Target:
    """``target`` (a run folder, a backbone.pt or a checkpoint's state.pt; its experiment from ``config`` or
    beside it) found and its experiment validated, so that the command's other arguments can be checked
    before the backbone is built; ``command`` names the subcommand in errors."""
    config_file, weights = _config_and_weights(target, config, command)
    run_device = _device(device, command)
    data, lines = load_yaml(config_file)
    resolved = resolve(data, registry, source=str(config_file), lines=lines)
    if weights is None and not random_init:
        hint = ", or pass --random-init" if command == "eval" else ""
        raise UserError(f"{target}: no checkpoint or backbone.pt yet; train at least checkpoint.every_epochs "
                        f"epochs{hint}")
    return Target(config_file=config_file, weights=weights, resolved=resolved, device=run_device)


def load_backbone(target: Target, registry: Registry, *, random_init: bool = False) -> LoadedBackbone:
    """Build ``target``'s encoder from its experiment (seeded) and load its weights (none: ``random_init``)."""
    experiment = target.resolved.as_dict()
    state = None if random_init or target.weights is None else _read_weights(target.weights)
    seed_everything(experiment["seed"])
    # per-image state sized as in the checkpoint; from the data for a backbone state_dict or at random init
    method = dry_build(target.resolved, registry, dataset_size=(state or {}).get("dataset_size"))
    backbone = method.backbone
    epoch = -1 if state is None else _load_weights(backbone, method, target.weights, state)
    channels_last = experiment["train"]["channels_last"]
    backbone = backbone.to(target.device,
                           memory_format=torch.channels_last if channels_last else torch.preserve_format)
    backbone.eval()
    return LoadedBackbone(backbone=backbone, augmentation=registry.build("augmentation", experiment["augmentation"]),
                          experiment=experiment, weights=RANDOM_INIT if state is None else str(target.weights),
                          epoch=epoch, device=target.device)


def evaluate_target(target: Path, names: list[str], registry: Registry, overrides: list[str] | None = None,
                    config: Path | None = None, random_init: bool = False, output: Path | None = None,
                    device: str | None = None) -> dict[str, dict[str, float]]:
    """Run the evaluators ``names`` on ``target``; returns ``{key: metrics}`` (key ``NAME`` or
    ``NAME@random_init``) and merges the same into ``output/evaluations.json``."""
    found = find_target(target, registry, config, device, random_init=random_init)
    blocks = _evaluator_blocks(found.resolved.evaluators, names, overrides or [], registry, found.config_file)
    loaded = load_backbone(found, registry, random_init=random_init)
    out_dir = output or (target if target.is_dir() else target.parent)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"sslcore eval -o {out_dir}: cannot make the output folder ({exc.strerror or exc}); "
                        "give a folder for evaluations.json") from None
    record = RunDir(out_dir)
    context = loaded.context(registry, run_dir=out_dir)
    results: dict[str, dict[str, float]] = {}
    for block in blocks:
        evaluator = registry.build("evaluator", block)
        started = time.perf_counter()
        metrics = evaluator.evaluate(loaded.backbone, context)
        key = f"{block['name']}@{RANDOM_INIT}" if random_init else block["name"]
        results[key] = metrics
        record.record_evaluation(key, {"evaluator": block, "weights": loaded.weights, "epoch": loaded.epoch,
                                       "seconds": round(time.perf_counter() - started, 1), "metrics": metrics})
    return results
