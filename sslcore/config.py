"""The experiment file: pydantic models, component blocks checked against their own models, clear errors.

Validation runs in two passes and collects every error of both before reporting:

1. the structure of the file (:class:`Experiment`, ``extra="forbid"``);
2. each component block ``{name: ..., **params}`` against the model its component registered, after
   filling the slots the method declares with the method's defaults.

Every error is one line: ``file:line: dotted.key.path: message — did you mean '...'?``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sslcore.api.errors import ConfigError
from sslcore.api.recipe import BIAS_AND_NORM, TrainConfig
from sslcore.registry import KIND_PROTOCOLS, SLOT_KINDS, Component, Registry, did_you_mean

Block = dict[str, Any]
Loc = tuple[Any, ...]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- the experiment file ----------------------------------------------------------------------------------

class ScalingSection(_Model):
    backend: Literal["auto", "ray", "local"] = Field(
        "auto", description="auto: in this process for one worker without --address, else Ray Train; ray: Ray "
                            "Train's TorchTrainer (also for one worker); local: the same loop in this process.")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="Default: the machine's CPUs / workers.")
    max_failures: int = Field(
        3, ge=-1, description="Ray backend: how many times a failed worker group (a lost process or machine) is "
                              "restarted from the last checkpoint before the run fails; -1: always. User errors "
                              "(a NaN loss, bad data) are never retried.")


class AimSection(_Model):
    repo: str | None = Field(None, description="Aim repository folder (default: <output_dir>/.aim).")
    experiment: str | None = Field(None, description="Aim experiment name (default: the run's name).")


class TrackingSection(_Model):
    aim: AimSection | None = Field(default_factory=AimSection, description="null turns aim off.")
    progress_bar: bool = True


class CheckpointSection(_Model):
    every_epochs: int = Field(1, ge=1, description="A checkpoint at the end of every N-th epoch (and the last).")
    every_steps: int | None = Field(None, ge=1, description="Also one every N optimizer steps, inside epochs.")
    every_minutes: float | None = Field(
        None, gt=0, description="Also one when this many minutes have passed since the last one (at a step).")
    keep: int = Field(2, ge=1, description="How many checkpoints to keep.")


SPACE_HELP = "give [a, b, c] (a grid: every value), loguniform(lo, hi) or uniform(lo, hi)"


def search_space(spec: Any) -> tuple[str, list[Any]]:
    """One parameter's search space of ``sslcore sweep``: ``("grid", [a, b, c])`` from a list, or
    ``("loguniform" | "uniform", [lo, hi])`` from the text ``loguniform(lo, hi)``; ValueError says what is wrong."""
    if isinstance(spec, str):
        text = spec.strip()
        kind, sep, rest = text.partition("(")
        kind = kind.strip()
        if sep and kind in ("loguniform", "uniform") and rest.endswith(")"):
            try:
                bounds = [float(v) for v in rest[:-1].split(",")]
            except ValueError:
                raise ValueError(f"'{text}': the bounds are not numbers; {SPACE_HELP}") from None
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"'{text}': give two bounds lo < hi, e.g. {kind}(0.01, 1)")
            if kind == "loguniform" and bounds[0] <= 0:
                raise ValueError(f"'{text}': loguniform needs lo > 0")
            return kind, bounds
        parsed = yaml.safe_load(text) if text.startswith("[") else None
        if not isinstance(parsed, list):
            raise ValueError(f"'{text}' is not a search space; {SPACE_HELP}")
        spec = parsed
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{spec!r} is not a search space; {SPACE_HELP}")
    return "grid", [_number(v) for v in spec]


def _number(value: Any) -> Any:
    """``1e-6`` as the number it means (YAML 1.1, PyYAML's, reads exponents without a dot as text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class SweepSection(_Model):
    """What ``sslcore sweep`` searches (``sslcore run`` ignores this section; a trial's config.yaml has none)."""

    params: dict[str, Any] = Field(default_factory=dict, description=(
        "key.path: its search space: [a, b, c] (a grid: every value), 'loguniform(lo, hi)' or 'uniform(lo, hi)', "
        "e.g. {loss.temperature: 'loguniform(0.05, 0.5)', train.optimizer.lr: [0.06, 0.12]}"))
    trials: int = Field(1, ge=1, description="Samples of the distributions; each is crossed with every grid "
                                             "point (Ray Tune's num_samples)")
    metric: str = Field("knn_top1", description="The epoch metric to prune on and pick the best by")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop trials behind the others at "
                                                                   "each rung; none: train every trial to the end")
    grace_epochs: int | None = Field(None, ge=1, description="ASHA's first rung (default: the first epoch whose "
                                                             "metrics carry the metric)")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps 1 / reduction_factor of the trials at a rung")
    max_concurrent: int | None = Field(None, ge=1, description="Default: as many as the cluster's resources hold")
    cpus_per_trial: float | None = Field(None, gt=0, description="Default: scaling.cpus_per_worker, else 1")

    @field_validator("params")
    @classmethod
    def _spaces(cls, params: dict[str, Any]) -> dict[str, Any]:
        for key, spec in params.items():
            try:
                search_space(spec)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return params


class Experiment(_Model):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 0
    output_dir: str = Field("runs", description="Runs go to <output_dir>/<name>/.")
    method: Block
    encoder: Block | None = None
    augmentation: Block | None = None
    negatives: Block | None = None
    loss: Block | None = None
    clustering: Block | None = None
    data: Block
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    evaluators: list[Block] = Field(default_factory=list)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    plugins: list[str] = Field(default_factory=list, description="Extra modules to load as plugins.")
    sweep: SweepSection | None = Field(None, description="What sslcore sweep searches; sslcore run ignores it.")


@dataclass
class Resolved:
    """A validated experiment: the structure, every block filled in (the method's slot defaults and recipe
    under what the file gives), and the plain dict workers get."""

    experiment: Experiment
    blocks: dict[str, Block]  # slot -> {name, **validated params}, incl. method, data, optimizer
    evaluators: list[Block]
    source: str
    lines: dict[Loc, int] = field(default_factory=dict)  # key path -> its line in the file (0: from --set)
    fitted: dict[str, Any] = field(default_factory=dict)  # "slot.key" -> the value fitted to the images
    image_side: int | None = None  # the images' side the fitted values follow

    def as_dict(self) -> dict[str, Any]:
        out = self.experiment.model_dump(mode="json")
        out.update(copy.deepcopy(self.blocks))
        out["train"]["optimizer"] = out.pop("optimizer")
        out["evaluators"] = copy.deepcopy(self.evaluators)
        return out

    def error(self, loc: Loc, message: str) -> ConfigError:
        """A config error about the key at ``loc``, as validation reports them: ``file:line: key: message``."""
        return located_error(self.source, self.lines, loc, message)


class BlockError(ConfigError):
    """A config error about the key at ``loc``, found where the file is not known (building the method on a
    worker); :meth:`Resolved.error` and :func:`located_error` give it its ``file:line``."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{_dotted(loc)}: {message}")
        self.loc, self.message = loc, message


def located_error(source: str, lines: dict[Loc, int], loc: Loc, message: str) -> ConfigError:
    """``ConfigError("file:line: dotted.key: message")`` for the key at ``loc`` of the experiment ``source``."""
    errors = _Errors(source, lines)
    errors.add(loc, message)
    return ConfigError(*errors.items)


# -- YAML with line numbers ----------------------------------------------------------------------------

def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Parse ``path`` with ``yaml.safe_load`` semantics; also return the line of every key path.

    Refused, each as one line naming the file: a file that cannot be read or is not UTF-8 text (a binary, a
    UTF-16 or latin-1 file), invalid YAML, a top level that is not a mapping, and a key given twice in one
    mapping (YAML would keep the last one silently; merge keys ``<<:`` stay allowed).
    """
    path = Path(path)
    fix = "give the path of an experiment YAML file"
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not an experiment file; {fix}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the experiment file ({exc.strerror or exc}); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          f"an experiment file is YAML saved as UTF-8: re-save it as UTF-8, or {fix}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: a binary file, or UTF-16 read as UTF-8
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}:{line}: invalid YAML: unacceptable character #x{exc.character:04x} "
                          f"({exc.reason}); an experiment file is YAML saved as UTF-8: {fix}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the experiment file must be a mapping of keys (method:, data:, ...), "
                          f"not a {type(data).__name__}")
    lines: dict[Loc, int] = {}
    duplicates: list[str] = []
    _record_lines(node, (), lines, duplicates, set())
    if duplicates:
        raise ConfigError(*(f"{path}:{duplicate}" for duplicate in duplicates))
    return data, lines


def _record_lines(node: yaml.Node | None, loc: Loc, lines: dict[Loc, int], duplicates: list[str],
                  visited: set[int]) -> None:
    """Record the line of every key path under ``node``; a scalar key given twice in one mapping goes to
    ``duplicates`` as ``LINE: key.path: duplicate key (first at line N); keep one``.

    A node reached again through an alias (``*name``) is not walked again: keys under an alias take the
    alias's line, and a recursive alias (``&a [*a]``) or a chain of aliases stays one pass over the file.
    """
    if node is None:
        return
    lines.setdefault(loc, node.start_mark.line + 1)
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, Any], int] = {}  # (tag, text) of each key -> its line
        for key, value in node.value:
            child = (*loc, key.value)
            line = key.start_mark.line + 1
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in first:
                    duplicates.append(f"{line}: {_dotted(child)}: duplicate key (first at line "
                                      f"{first[key.tag, key.value]}); keep one")
                    continue
                first[key.tag, key.value] = line
            lines[child] = line
            _record_lines(value, child, lines, duplicates, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*loc, i), lines, duplicates, visited)


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[Loc, int]) -> None:
    """Apply ``--set key.path=value`` overrides in place; values are parsed as YAML (``0.1``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key.path=value, e.g. --set train.epochs=10")
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
        target: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            elif isinstance(target, dict):
                nxt = target.get(part)
                if isinstance(nxt, str) and depth == 0:  # `method: moco` shorthand
                    nxt = target[part] = {"name": nxt}
                if not isinstance(nxt, (dict, list)):
                    nxt = target[part] = {}
                target = nxt
            else:
                raise ConfigError(f"--set {item}: '{'.'.join(map(str, parts[:depth + 1]))}' is not a mapping")
        if isinstance(target, list):
            if not isinstance(parts[-1], int) or parts[-1] >= len(target):
                raise ConfigError(f"--set {item}: index {parts[-1]} is out of range")
        target[parts[-1]] = parsed
        lines[tuple(parts)] = 0


# -- validation ---------------------------------------------------------------------------------------

class _Errors:
    def __init__(self, source: str, lines: dict[Loc, int]) -> None:
        self.source, self.lines, self.items = source, lines, []

    def add(self, loc: Loc, message: str) -> None:
        line = next((self.lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in self.lines), None)
        where = "--set" if line == 0 else f"{self.source}:{line}" if line else self.source
        path = _dotted(loc)
        self.items.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def add_pydantic(self, prefix: Loc, exc: ValidationError, model: type[BaseModel] | None) -> None:
        for err in exc.errors():
            loc = (*prefix, *err["loc"])
            if err["type"] == "extra_forbidden":
                key = err["loc"][-1]
                fields = _fields_at(model, err["loc"][:-1])
                self.add(loc, f"unknown key '{key}'{did_you_mean(str(key), fields)}")
            elif err["type"] == "missing":
                self.add(loc, f"missing required key '{err['loc'][-1]}'")
            else:
                got = err.get("input")
                shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
                self.add(loc, f"{err['msg'].removeprefix('Value error, ')}{shown}")  # a validator's own words

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(*self.items)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(model: type[BaseModel] | None, loc: Loc) -> list[str]:
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        annotation = getattr(info, "annotation", None)
        model = next((a for a in (annotation, *getattr(annotation, "__args__", ())) if
                      isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def _as_block(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def resolve(data: dict[str, Any], registry: Registry, source: str = "<experiment>",
            lines: dict[Loc, int] | None = None) -> Resolved:
    """Validate an experiment dict (already loaded, overrides applied) against the registry."""
    errors = _Errors(source, lines or {})
    data = copy.deepcopy(data)
    for slot in ("method", "data", *SLOT_KINDS):
        if slot in data:
            data[slot] = _as_block(data[slot])
    if isinstance(data.get("evaluators"), list):
        data["evaluators"] = [_as_block(b) for b in data["evaluators"]]

    for i, module in enumerate(data.get("plugins") or []):
        if isinstance(module, str):
            info = registry.add_module(module)
            if info.error:
                errors.add(("plugins", i), f"cannot load plugin module '{module}': {info.error}")
    for clash in registry.clashes:
        errors.add((), clash)

    blocks: dict[str, Block] = {}
    method = _validate_block(errors, registry, "method", ("method",), data.get("method"))
    if method is not None:
        blocks["method"] = method
    method_name = data["method"].get("name") if isinstance(data.get("method"), dict) else None
    method_component = registry.components["method"].get(method_name)
    if method_component is not None and (data.get("train") is None or isinstance(data["train"], dict)):
        data["train"] = merge_recipe(method_component.recipe, data.get("train"))

    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        errors.add_pydantic((), exc, Experiment)
        experiment = None

    if method_component is not None:  # check the slots even when the method's params fail
        _resolve_slots(errors, registry, method_component, data, blocks)
    data_block = _validate_block(errors, registry, "dataset", ("data",), data.get("data"))
    if data_block is not None:
        blocks["data"] = data_block
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    optimizer = _validate_block(errors, registry, "optimizer", ("train", "optimizer"),
                                _as_block(train.get("optimizer", {"name": "sgd"})))
    if optimizer is not None:
        blocks["optimizer"] = optimizer
    evaluators = []
    for i, block in enumerate(data.get("evaluators") or []):
        validated = _validate_block(errors, registry, "evaluator", ("evaluators", i), block)
        if validated is not None:
            evaluators.append(validated)

    if experiment is not None:
        if method_component is not None:
            declared = {BIAS_AND_NORM, *method_component.recipe.get("param_groups", {})}
            for group in experiment.train.param_groups:
                if group not in declared:
                    errors.add(("train", "param_groups", group),
                               f"method '{method_name}' has no parameter group '{group}'"
                               f"{did_you_mean(group, declared)}")
        if experiment.scaling.backend == "local" and experiment.scaling.num_workers != 1:
            errors.add(("scaling", "num_workers"), f"the local backend runs one worker, not "
                                                   f"{experiment.scaling.num_workers}; use backend: ray for more")
        if experiment.train.batch_size % experiment.scaling.num_workers:
            errors.add(("train", "batch_size"),
                       f"{experiment.train.batch_size} does not split evenly over "
                       f"{experiment.scaling.num_workers} workers (scaling.num_workers); use a multiple of it")
    errors.raise_if_any()
    return Resolved(experiment=cast(Experiment, experiment),  # not None: its errors were raised
                    blocks=blocks, evaluators=evaluators, source=source, lines=dict(lines or {}))


def merge_recipe(recipe: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """The ``train`` block that runs: the method's ``recipe`` overridden key by key by the experiment's
    (``optimizer`` too, unless it names another optimizer; each of ``param_groups`` key by key)."""
    out = copy.deepcopy(recipe)
    for key, value in (given or {}).items():
        if key == "optimizer":  # onto the recipe's optimizer, else onto the default, SGD
            out[key] = _merge_default(out.get(key, {"name": "sgd"}), _as_block(value))
        elif key == "param_groups" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **{group: ({**out[key].get(group, {}), **settings}
                                               if isinstance(settings, dict) else settings)
                                       for group, settings in value.items()}}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_slots(errors: _Errors, registry: Registry, method: Component, data: dict[str, Any],
                   blocks: dict[str, Block]) -> None:
    """Fill each slot of ``method`` with its default under what the file gives, validate the block, and check
    that its component fits the slot: the protocol the slot needs, and indices for a source that needs them."""
    for slot, kind in SLOT_KINDS.items():
        given = data.get(slot)
        if slot not in method.slots:
            if given is not None:
                errors.add((slot,), f"method '{method.name}' does not use a '{slot}' block; remove it "
                                    f"(it uses: {', '.join(method.slots) or 'none'})")
            continue
        needs = method.slots[slot].needs
        validated = _validate_block(errors, registry, kind, (slot,), _merge_default(dict(method.slots[slot].default),
                                                                                    given))
        if validated is None:
            continue
        component = registry.get(kind, validated["name"])
        kinds = "losses" if kind == "loss" else kind.replace("_", " ") + "s"
        if not component.meets(needs):
            fitting = sorted(c.name for c in registry.components[kind].values() if c.meets(needs))
            errors.add((slot, "name"), f"method '{method.name}' needs {_describe(needs)} in its {slot} slot and "
                                       f"'{component.name}' is {_what(component)}; {kinds} that fit: "
                                       f"{', '.join(fitting) or 'none registered'}")
            continue
        if kind == "negative_source" and component.capability("needs_index") and \
                method.capability("uses_index") is False:
            fitting = sorted(c.name for c in registry.components[kind].values() if not c.capability("needs_index"))
            errors.add((slot, "name"), f"'{component.name}' needs each image's dataset index and method "
                                       f"'{method.name}' gives none (it does not declare uses_index); "
                                       f"{kinds} that fit: {', '.join(fitting) or 'none registered'}")
            continue
        blocks[slot] = validated


def _describe(protocol: type) -> str:
    """``PairedLoss (a paired loss: loss(z1, z2), ...)``: a protocol's name and the first line of its doc."""
    first = (protocol.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return f"{protocol.__name__} ({first[0].lower()}{first[1:]})" if first else protocol.__name__


def _what(component: Component) -> str:
    """What a component declares itself to be: the most specific protocol of its kind in its class's MRO."""
    base = KIND_PROTOCOLS.get(component.kind)
    mine = [c for c in getattr(component.provides, "__mro__", ()) if getattr(c, "_is_protocol", False)
            and base in c.__mro__ and c is not base]
    return f"a {mine[0].__name__}" if mine else f"a plain {base.__name__ if base else component.kind}"


def _merge_default(default: Block, given: Any) -> Any:
    if given is None:
        return copy.deepcopy(default)
    if isinstance(given, dict) and ("name" not in given or given.get("name") == default.get("name")):
        return {**default, **given}
    return given


def _validate_block(errors: _Errors, registry: Registry, kind: str, loc: Loc, block: Any) -> Block | None:
    """Check one ``{name: ..., **params}`` block; nested dataset blocks (``data:``) are checked too."""
    if block is None:
        return None  # a missing required block is reported by the structural pass
    if not isinstance(block, dict):
        errors.add(loc, f"expected a block like {{name: ..., ...}}, got {type(block).__name__}")
        return None
    name = block.get("name")
    if not isinstance(name, str):
        errors.add(loc, f"the {kind.replace('_', ' ')} block needs a 'name'")
        return None
    choices = registry.components[kind]
    component = choices.get(name)
    model = component.config if component else None
    if model is None:
        errors.add((*loc, "name"), f"unknown {kind.replace('_', ' ')} '{name}'{did_you_mean(name, choices)}")
        return None
    params = {k: v for k, v in block.items() if k != "name"}
    try:
        validated = model.model_validate(params)
    except ValidationError as exc:
        errors.add_pydantic(loc, exc, model)
        return None
    out = {"name": name, **validated.model_dump(mode="json")}
    for key, info in model.model_fields.items():
        nested_kind = (info.json_schema_extra or {}).get("sslcore_kind") if isinstance(
            info.json_schema_extra, dict) else None
        if nested_kind and out.get(key) is not None:
            nested = _validate_block(errors, registry, nested_kind, (*loc, key), _as_block(params.get(key)))
            if nested is None:
                return None
            out[key] = nested
    return out


def resolve_block(registry: Registry, kind: str, block: dict[str, Any], source: str) -> Block:
    """Validate one ``{name: ..., **params}`` block of ``kind`` on its own (an evaluator given on the command
    line); raises :class:`ConfigError` naming ``source``."""
    errors = _Errors(source, {})
    validated = _validate_block(errors, registry, kind, (), block)
    errors.raise_if_any()
    return cast(Block, validated)


def load_experiment(path: str | Path, registry: Registry, overrides: list[str] | None = None) -> Resolved:
    """Read, override and validate an experiment file; raises :class:`ConfigError` with every problem.
    What the file leaves out of the encoder and augmentation follows the images' size (:func:`fit_to_images`)."""
    data, lines = load_yaml(path)
    apply_overrides(data, overrides or [], lines)
    resolved = resolve(data, registry, source=str(path), lines=lines)
    return fit_to_images(resolved, data, registry)


#: how many of the first training images set the side that the fitted defaults follow
FIT_SAMPLE = 8
#: the slots whose left-out values follow the images, in order (the encoder first: a ViT's patch grid may
#: round the side the augmentation then takes)
FITTED_SLOTS = ("encoder", "augmentation")


def fit_to_images(resolved: Resolved, data: dict[str, Any], registry: Registry) -> Resolved:
    """``resolved`` with the encoder's and the augmentation's left-out values fitted to the training images:
    a component's config that defines ``fit_to_images(side, current) -> {key: value}`` says what its keys
    should be for images of ``side`` pixels (the median shorter side of the first :data:`FIT_SAMPLE`
    images); only the keys the experiment (file and ``--set``) does not give are changed, and the result is
    validated again. ``method: moco`` alone on CIFAR's 32 px images so trains 32 px views through the CIFAR
    stem, not 224 px views through the ImageNet one. Images that cannot be read here leave it unchanged (the
    data check reports them)."""
    side = _image_side(resolved, registry)
    if side is None:
        return resolved
    updated = copy.deepcopy(data)
    fitted: dict[str, Any] = {}
    for slot in FITTED_SLOTS:
        block = resolved.blocks.get(slot)
        if block is None:
            continue
        fit = getattr(registry.get(SLOT_KINDS[slot], block["name"]).config, "fit_to_images", None)
        given = _as_block(data.get(slot)) or {}
        if not isinstance(given, dict) or fit is None:
            continue
        values = {k: v for k, v in fit(side, block).items() if k not in given}
        if not values:
            continue
        updated[slot] = {**given, **values}  # merged onto the method's default block as the file's own values
        fitted.update({f"{slot}.{k}": v for k, v in values.items()})
        side = values.get("image_size", side)  # a ViT's input side is the augmentation's
    if not fitted:
        return resolved
    again = resolve(updated, registry, source=resolved.source, lines=resolved.lines)
    again.fitted, again.image_side = fitted, side
    return again


def _image_side(resolved: Resolved, registry: Registry) -> int | None:
    """The median shorter side of the first training images, or None when they cannot be read here."""
    from sslcore.api.errors import UnreadableImage, UserError

    try:
        dataset = registry.build("dataset", resolved.blocks["data"])
    except (UserError, OSError, KeyError, ValueError):  # the data check says what is wrong with the block
        return None
    sides = []
    for index in range(min(FIT_SAMPLE, len(dataset))):
        try:
            image = dataset[index][0]
        except UnreadableImage:
            continue
        sides.append(min(image.shape[:2]))
    return sorted(sides)[len(sides) // 2] if sides else None


# -- JSON Schema ------------------------------------------------------------------------------------------

def component_schema(registry: Registry, kind: str, name: str) -> dict[str, Any]:
    component = registry.get(kind, name)
    schema = component.config.model_json_schema()
    schema.setdefault("properties", {})["name"] = {"const": name}
    schema["required"] = ["name", *schema.get("required", [])]
    schema["title"] = f"{kind} '{name}' ({component.distribution})"
    return schema


def experiment_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema of the experiment file, each block a choice among the registered components."""
    schema = Experiment.model_json_schema()
    props = schema["properties"]

    def one_of(kind: str) -> dict[str, Any]:
        return {"oneOf": [{"type": "string", "enum": registry.names(kind)},
                          *(component_schema(registry, kind, n) for n in registry.names(kind))]}

    props["method"] = one_of("method")
    props["data"] = one_of("dataset")
    for slot, kind in SLOT_KINDS.items():
        props[slot] = one_of(kind)
    props["evaluators"] = {"type": "array", "items": one_of("evaluator")}
    return schema
