"""``sslcore new-plugin NAME --kind KIND``: write a plugin distribution that installs and passes its own tests.

It writes ``DIR/sslcore-NAME/``: a ``pyproject.toml`` whose ``sslcore`` entry point is ``sslcore_NAME.plugin``
(src layout), that module registering one working component of the kind under NAME (a real, minimal one whose
docstrings say what to change), a README and ``tests/test_NAME.py`` on sslcore's pytest plugin
(:mod:`sslcore.testing`); a method also gets an example experiment on CIFAR-10. The templates are the files
of ``plugin_templates/``: shared ones at its top, one folder per kind (``plugin.py``, ``test.py``, ``about.md``
and ``usage.md`` for the README, ``example.yaml`` for a method), filled in by :class:`string.Template`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.resources
import importlib.util
import re
import string
import textwrap
from pathlib import Path

from sslcore.api.errors import UserError

TEMPLATES = importlib.resources.files("sslcore.commands") / "plugin_templates"

#: the kinds a plugin can be generated for, each with its folder of templates: every kind of
#: sslcore.registry.KIND_HOOKS, in its order (the tests check both; written out so that the CLI starts without
#: importing the registry)
KINDS = ("augmentation", "encoder", "negative_source", "clustering", "loss", "evaluator", "dataset", "optimizer",
         "method")

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

#: the generated component's class is NAME in CamelCase with its kind's suffix, unless NAME ends with it already
CLASS_SUFFIXES = {"augmentation": "Augmentation", "encoder": "Encoder", "negative_source": "Negatives",
                  "clustering": "Clustering", "loss": "Loss", "evaluator": "Evaluator", "dataset": "Dataset",
                  "optimizer": "Optimizer", "method": "Method"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``new-plugin`` subcommand and its arguments."""
    parser = commands.add_parser(
        "new-plugin", help="write a plugin distribution with one working component of a kind, and its tests",
        description="Write DIR/sslcore-NAME/: pyproject.toml with the entry point, src/sslcore_NAME/plugin.py "
                    "registering a working component NAME of the kind, a README and tests on sslcore.testing.")
    parser.add_argument("name", metavar="NAME",
                        help="the component's name in experiment files, also the module sslcore_NAME: lower-case "
                             "letters, digits and underscores, starting with a letter")
    parser.add_argument("--kind", required=True, choices=KINDS, help="what the plugin registers")
    parser.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR",
                        help="the folder to write sslcore-NAME/ into (default: the current folder)")


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """Write the distribution, then print its files and the next three commands."""
    target = args.output / f"sslcore-{args.name}"
    files = plugin_files(args.name, args.kind)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"sslcore new-plugin: {target} already exists and is not empty; choose another NAME or "
                        "-o DIR, or remove it")
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    # ./ before a relative path, which then reads as a folder and not as the name of a distribution on an index
    shown = str(target) if target.is_absolute() or str(target).startswith(".") else f"./{target}"
    print(f"wrote {shown}/: the {args.kind} '{args.name}', registered by the entry point sslcore_{args.name}.plugin")
    for relative in files:
        print(f"  {relative}")
    print("next:")
    print(f"  pip install -e {shown}")
    print(f"  pytest {shown}/tests")
    print("  sslcore plugins")
    return 0


def plugin_files(name: str, kind: str) -> dict[str, str]:
    """Each file of the distribution of the ``kind`` component ``name``: its path in ``sslcore-NAME/`` and text.

    Raises :class:`UserError` for a NAME that cannot be used: not an identifier part, a component of the kind
    or a module of that name already installed, a class of the plugin that would shadow one it imports.
    """
    _check_name(name, kind)
    camel = "".join(part.capitalize() for part in name.split("_"))
    suffix = CLASS_SUFFIXES[kind]
    values = {"name": name, "Name": camel, "Class": camel if camel.endswith(suffix) else camel + suffix,
              "kind": kind, "version": _version()}
    values["classes"] = ", ".join(sorted((values["Class"], f"{camel}Config")))  # imported, in isort's order
    values["about"] = _render(f"{kind}/about.md.tmpl", values).rstrip()
    values["summary"] = values["about"].split("\n", 1)[0]  # pyproject's description, the package's docstring
    values["summary_wrapped"] = textwrap.fill(values["summary"], width=110)
    values["usage"] = _render(f"{kind}/usage.md.tmpl", values).rstrip()
    templates = {"pyproject.toml": "pyproject.toml.tmpl", "README.md": "README.md.tmpl",
                 f"src/sslcore_{name}/__init__.py": "__init__.py.tmpl",
                 f"src/sslcore_{name}/plugin.py": f"{kind}/plugin.py.tmpl",
                 f"tests/test_{name}.py": f"{kind}/test.py.tmpl"}
    if TEMPLATES.joinpath(kind, "example.yaml.tmpl").is_file():
        templates[f"examples/{name}_cifar10.yaml"] = f"{kind}/example.yaml.tmpl"
    files = {relative: _render(template, values) for relative, template in templates.items()}
    for relative, text in files.items():
        if relative.endswith(".py"):
            _check_no_shadowing(name, relative, text)
    return files


def _render(template: str, values: dict[str, str]) -> str:
    """The file ``template`` of ``plugin_templates/`` with its ``${key}`` filled in from ``values``."""
    return string.Template(TEMPLATES.joinpath(template).read_text(encoding="utf-8")).substitute(values)


def _version() -> str:
    from sslcore import __version__

    return __version__


def _check_name(name: str, kind: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        suggestion = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
        if suggestion[:1].isdigit():
            suggestion = f"my_{suggestion}"
        example = f" such as '{suggestion}'" if NAME_PATTERN.fullmatch(suggestion) else ""
        raise UserError(f"sslcore new-plugin: '{name}' cannot be a plugin's name (NAME): use lower-case letters, "
                        f"digits and underscores, starting with a letter{example}")
    from sslcore.registry import Registry

    registry = Registry()  # the built-in components and the installed plugins, as `sslcore run` sees them
    if name in registry.components[kind]:
        owner = registry.components[kind][name].distribution
        raise UserError(f"sslcore new-plugin: {owner} already registers a {kind} '{name}' (NAME); choose another "
                        "name, or the two would clash")
    if importlib.util.find_spec(f"sslcore_{name}") is not None:
        raise UserError(f"sslcore new-plugin: a module sslcore_{name} is already installed (NAME); choose another "
                        "name, or one would hide the other")


def _check_no_shadowing(name: str, relative: str, text: str) -> None:
    """Refuse a NAME that makes a class or function of a generated module with the name of something it imports
    (``--kind loss`` named ``paired`` would define a class PairedLoss over sslcore's PairedLoss)."""
    tree = ast.parse(text, filename=relative)
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom | ast.Import)
                for alias in node.names}
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    clash = sorted(imported & defined)
    if clash:
        raise UserError(f"sslcore new-plugin: the name '{name}' (NAME) would make {relative} define {clash[0]}, "
                        "which it also imports; choose another name")
