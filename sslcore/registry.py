"""The plugin registry: finds plugins, calls their registration hooks, records where each name came from.

Plugins come from three places, in this order:

1. sslcore's built-in component modules (registered exactly like any plugin);
2. the ``sslcore`` entry-point group of installed distributions, unless ``SSLCORE_DISABLE_PLUGIN_AUTOLOAD=1``;
3. extra modules named by ``plugins: [...]`` in the experiment file or ``-p module`` on the command line.

Each plugin is loaded on its own: one that fails to import or to register is recorded with its error
and skipped, so unrelated commands keep working.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel, ConfigDict

from sslcore.api import hookspecs
from sslcore.api.errors import PluginError, UserError
from sslcore.api.hookspecs import (
    Augmentation,
    Clustering,
    ContrastiveLoss,
    Dataset,
    Encoder,
    Evaluator,
    Loss,
    Method,
    NegativeSource,
    PairedLoss,
    Slot,
)

ENTRY_POINT_GROUP = "sslcore"
DISABLE_AUTOLOAD_ENV = "SSLCORE_DISABLE_PLUGIN_AUTOLOAD"

#: component kind -> registration hook
KIND_HOOKS: dict[str, str] = {
    "augmentation": "register_augmentations",
    "encoder": "register_encoders",
    "negative_source": "register_negative_sources",
    "clustering": "register_clusterings",
    "loss": "register_losses",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
    "optimizer": "register_optimizers",
    "method": "register_methods",
}

#: component kind -> the protocol every component of the kind meets (optimizers: torch.optim.Optimizer)
KIND_PROTOCOLS: dict[str, type] = {
    "augmentation": Augmentation, "encoder": Encoder, "negative_source": NegativeSource, "loss": Loss,
    "clustering": Clustering, "evaluator": Evaluator, "dataset": Dataset, "method": Method,
}

#: the two calls the core knows; every loss declares one of them, or a refinement of Loss of its plugin's own
LOSS_CALLS = (ContrastiveLoss, PairedLoss)


def declared_loss_call(cls: type | None) -> type | None:
    """The protocol by which a loss class declares its call: ContrastiveLoss, PairedLoss, or another runtime
    protocol refining Loss that the class subclasses (SwAV's SwappedPredictionLoss); None when it declares
    none."""
    for base in getattr(cls, "__mro__", ()):
        if base in LOSS_CALLS:
            return base
    for base in getattr(cls, "__mro__", ()):
        if base is not Loss and getattr(base, "_is_protocol", False) and issubclass(base, Loss) \
                and "forward" in vars(base):
            return base
    return None

BUILTIN_MODULES = (
    "sslcore.components.augmentations",
    "sslcore.components.encoders",
    "sslcore.components.timm_encoders",
    "sslcore.components.negatives",
    "sslcore.components.losses",
    "sslcore.components.clustering",
    "sslcore.components.evaluators",
    "sslcore.components.probes",
    "sslcore.components.datasets",
    "sslcore.components.optimizers",
)

SLOT_KINDS = {"encoder": "encoder", "augmentation": "augmentation", "negatives": "negative_source",
              "loss": "loss", "clustering": "clustering"}


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Component:
    """One registered component: what a ``{name: ...}`` block in the experiment file refers to.

    ``provides``: the class the factory returns (the factory itself when it is a class), None when not
    declared; ``slots`` and ``recipe``: a method's slots and default ``train`` block.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type[BaseModel]
    plugin: str
    distribution: str
    provides: type | None = None
    slots: dict[str, Slot] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)

    def build(self, params: BaseModel | dict[str, Any], **kwargs: Any) -> Any:
        if not isinstance(params, BaseModel):
            params = self.config.model_validate(params)
        return self.factory(params, **kwargs)

    def meets(self, protocol: type) -> bool:
        """Whether this component fits a slot that needs ``protocol``: every component meets its kind's
        protocol (checked on the built object); a refinement (PatchEncoder, PairedLoss) only when its class
        declares it by subclassing."""
        return protocol is KIND_PROTOCOLS.get(self.kind) or protocol in getattr(self.provides, "__mro__", ())

    def capability(self, name: str) -> bool | None:
        """A capability its class declares (``needs_index``, ``uses_index``); None when its class is not known
        before it is built (a factory function registered without ``provides``); undeclared: the protocol's default,
        False."""
        return None if self.provides is None else bool(getattr(self.provides, name, False))


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    source: str  # "builtin", "entry_point" or "module"
    module: str
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        hooks = sorted(KIND_HOOKS[k] for k in self.components)
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "source": self.source, "module": self.module, "hooks": hooks,
                "components": self.components, "error": self.error}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' — did you mean 'x'?' when a close match exists, else a list of the valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" — did you mean '{close[0]}'?"
    return f" (choose from: {', '.join(choices)})" if choices else ""


def _forbid_extra(model: type[BaseModel]) -> type[BaseModel]:
    if model.model_config.get("extra") == "forbid":
        return model
    return type(model.__name__, (model,), {"model_config": ConfigDict(extra="forbid"),
                                           "__module__": model.__module__})


class Registry:
    """All components known to this process, with their provenance."""

    def __init__(self, autoload: bool | None = None, modules: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager("sslcore")
        self.pm.add_hookspecs(hookspecs)
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KIND_HOOKS}
        self.plugins: list[PluginInfo] = []
        self.clashes: list[str] = []
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        self.autoload = autoload
        for name in BUILTIN_MODULES:
            self.add_module(name, source="builtin")
        if autoload:
            self.load_entry_points()
        for name in modules:
            self.add_module(name)

    # -- loading -------------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else ""
            if any(p.name == ep.name and p.distribution == dist for p in self.plugins):
                continue  # the same distribution seen twice on sys.path
            try:
                obj = ep.load()
            except Exception as exc:
                self._record_failure(ep.name, dist, version, "entry_point", ep.value, exc)
                continue
            self.add_plugin(obj, name=ep.name, distribution=dist, version=version, source="entry_point")

    def add_module(self, module_name: str, source: str = "module") -> PluginInfo:
        """Load a module by its dotted name as a plugin (``-p``, ``plugins:`` and the built-ins)."""
        for info in self.plugins:
            if info.module == module_name:
                return info
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            return self._record_failure(module_name, module_name, "", source, module_name, exc)
        dist, version = _distribution_of(module_name) if source != "builtin" else ("sslcore", _own_version())
        return self.add_plugin(module, name=module_name, distribution=dist, version=version, source=source)

    def add_plugin(self, plugin: ModuleType | object, name: str | None = None, distribution: str | None = None,
                   version: str = "", source: str = "module") -> PluginInfo:
        """Register a plugin object (a module or any object with hook implementations)."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        name = name or module
        info = PluginInfo(name=name, distribution=distribution or name, version=version, source=source,
                          module=module)
        staged: list[Component] = []
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            info.error = _one_line(exc)
            self.plugins.append(info)
            return info
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        try:
            for kind, hook_name in KIND_HOOKS.items():
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                caller(register=self._register_callback(kind, info, staged))
            self._check_clashes(staged)
        except Exception as exc:
            self.pm.unregister(plugin)
            info.error = _one_line(exc)
            if isinstance(exc, PluginError):
                self.clashes.append(str(exc))
            self.plugins.append(info)
            return info
        for comp in staged:
            self.components[comp.kind][comp.name] = comp
            info.components.setdefault(comp.kind, []).append(comp.name)
        self.plugins.append(info)
        return info

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and its components (tests use this in ``finally``)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for kind in self.components.values():
            for comp_name in [n for n, c in kind.items() if c.plugin == name]:
                del kind[comp_name]
        self.plugins = [p for p in self.plugins if p.name != name]

    def _register_callback(self, kind: str, info: PluginInfo, staged: list[Component]) -> Callable[..., None]:
        hook = KIND_HOOKS[kind]

        def register(name: str, factory: Callable[..., Any], *, config: type[BaseModel] | None = None,
                     provides: type | None = None, **method: Any) -> None:
            if not isinstance(name, str) or not name:
                raise TypeError(f"{hook}: name must be a non-empty string, got {name!r}")
            if not callable(factory):
                raise TypeError(f"{hook}: factory for '{name}' is not callable")
            if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
                raise TypeError(f"{hook}: config for '{name}' must be a pydantic model class")
            provides = provides or (factory if isinstance(factory, type) else None)
            if kind == "loss" and declared_loss_call(provides) is None:
                raise TypeError(f"loss '{name}': declare its call by subclassing sslcore.api.hookspecs."
                                "ContrastiveLoss (loss(q, k, negatives, exclude)), PairedLoss (loss(z1, z2)) or "
                                "a Protocol refining Loss that declares forward, or pass provides= that class")
            if kind == "optimizer" and not {"lr", "weight_decay"} <= set(getattr(config, "model_fields", {})):
                raise TypeError(f"optimizer '{name}': its config must have 'lr' and 'weight_decay' fields")
            slots, recipe = _method_declarations(name, method) if kind == "method" else ({}, {})
            if method and kind != "method":
                raise TypeError(f"{hook}: unexpected keyword arguments {sorted(method)} for '{name}'")
            staged.append(Component(kind=kind, name=name, factory=factory, config=_forbid_extra(config or _NoParams),
                                    plugin=info.name, distribution=info.distribution, provides=provides,
                                    slots=slots, recipe=recipe))
        return register

    def _check_clashes(self, staged: list[Component]) -> None:
        seen: dict[tuple[str, str], Component] = {}
        for comp in staged:
            key = (comp.kind, comp.name)
            existing = self.components[comp.kind].get(comp.name) or seen.get(key)
            if existing is not None:
                raise PluginError(
                    f"{comp.kind} '{comp.name}' is registered by both '{existing.distribution}' "
                    f"(plugin {existing.plugin}) and '{comp.distribution}' (plugin {comp.plugin}); "
                    f"uninstall one of them or disable autoload with {DISABLE_AUTOLOAD_ENV}=1")
            seen[key] = comp

    def _record_failure(self, name: str, dist: str, version: str, source: str, module: str,
                        exc: BaseException) -> PluginInfo:
        info = PluginInfo(name=name, distribution=dist, version=version, source=source, module=module,
                          error=_one_line(exc))
        self.plugins.append(info)
        return info

    # -- lookup --------------------------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        return [f"plugin '{p.name}' from '{p.distribution}' failed to load: {p.error}"
                for p in self.plugins if p.error]

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def build(self, kind: str, block: dict[str, Any], **kwargs: Any) -> Any:
        """Build the component that a ``{name: ..., **params}`` block describes."""
        params = {k: v for k, v in block.items() if k != "name"}
        return self.get(kind, block["name"]).build(params, **kwargs)

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            raise UserError(f"unknown {kind.replace('_', ' ')} '{name}'"
                            f"{did_you_mean(name, self.components[kind])}") from None


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The attributes and methods of ``protocol`` that ``obj`` lacks (why ``isinstance(obj, protocol)`` fails)."""
    members: set[str] = set()
    for base in protocol.__mro__:
        if getattr(base, "_is_protocol", False) and base.__module__ != "typing":  # the protocols, not Protocol
            members |= {name for name in (*vars(base), *getattr(base, "__annotations__", {}))
                        if not name.startswith("_") or name in ("__call__", "__len__", "__getitem__")}
    return sorted(name for name in members if not hasattr(obj, name))


def _method_declarations(name: str, method: dict[str, Any]) -> tuple[dict[str, Slot], dict[str, Any]]:
    """A method's ``slots`` and ``recipe``, checked: known slot names, each a :class:`Slot` whose protocol
    is its kind's or a refinement of it, and a recipe that is a valid ``train`` block."""
    from pydantic import ValidationError

    from sslcore.api.recipe import TrainConfig

    unknown = set(method) - {"slots", "recipe"}
    if unknown:
        raise TypeError(f"register_methods: unexpected keyword arguments {sorted(unknown)} for '{name}'")
    slots, recipe = dict(method.get("slots") or {}), dict(method.get("recipe") or {})
    for slot, declared in slots.items():
        if slot not in SLOT_KINDS:
            raise TypeError(f"method '{name}' declares unknown slot '{slot}'; valid slots: {sorted(SLOT_KINDS)}")
        protocol = KIND_PROTOCOLS[SLOT_KINDS[slot]]
        if not isinstance(declared, Slot) or protocol not in getattr(declared.needs, "__mro__", ()):
            raise TypeError(f"method '{name}': slot '{slot}' must be a Slot(protocol, default block) whose protocol "
                            f"is {protocol.__name__} or a refinement of it, got {declared!r}")
    try:
        TrainConfig.model_validate(recipe)
    except ValidationError as exc:
        raise TypeError(f"method '{name}': its recipe is not a valid train block: "
                        f"{_one_line(exc)}") from None
    return slots, recipe


def _one_line(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line where it was raised; the frame that caught it and the import
    machinery's frames are left out (a module that is not there has no line to show)."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    machinery = os.path.dirname(importlib.__file__)
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)[1:]
              if not frame.filename.startswith("<frozen") and os.path.dirname(frame.filename) != machinery]
    if frames:
        last = frames[-1]
        text += f" ({os.path.basename(last.filename)}:{last.lineno})"
    return text


def _own_version() -> str:
    from sslcore import __version__

    return __version__


_packages: tuple[tuple[tuple[str, int], ...], dict[str, list[str]]] | None = None


def installed_packages() -> dict[str, list[str]]:
    """``importlib.metadata.packages_distributions()``: each importable top-level name, the distributions that
    install it. Building it lists every installed distribution's files (~0.6 s with this project's
    dependencies), so it is built once and again only when a folder of ``sys.path`` changed (an install)."""
    global _packages
    key = tuple((entry, os.stat(entry).st_mtime_ns) for entry in sys.path if os.path.isdir(entry))
    if _packages is None or _packages[0] != key:
        _packages = (key, importlib.metadata.packages_distributions())
    return _packages[1]


def _distribution_of(module_name: str) -> tuple[str, str]:
    top = module_name.split(".")[0]
    dists = installed_packages().get(top, [])
    if dists:
        try:
            return dists[0], importlib.metadata.version(dists[0])
        except importlib.metadata.PackageNotFoundError:
            pass
    return module_name, ""
