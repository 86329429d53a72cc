"""The ``sslcore`` command: run, sweep, validate, plugins, schema, export, eval, embed, search, report, new-plugin.

User errors (a bad experiment file, an unknown component, unreadable data, a NaN loss) print one line each
and exit with code 2, without a traceback, on the Ray backend as in-process.

Exit codes of ``sslcore run``: 0 trained; 2 a user error; 75 stopped by SIGTERM after writing a checkpoint
(preemption: ``--resume`` continues exactly); 130 stopped by Ctrl-C / SIGINT (the checkpoints written before
are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sslcore.api.errors import UserError

if TYPE_CHECKING:  # imported lazily at run time, to keep --help fast
    from sslcore.config import Resolved
    from sslcore.registry import Registry

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE",
                        help="also load MODULE as a plugin (repeatable)")
    parser = argparse.ArgumentParser(prog="sslcore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=[common], help="train an experiment file")
    run.add_argument("file", nargs="?", type=Path, help="experiment YAML (default with --resume: its config)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                     help="override a value of the file (repeatable), e.g. --set train.epochs=10")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    run.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also show Ray's, Ray Train's and aim's own output (always kept in the run's ray.log)")

    validate = commands.add_parser("validate", parents=[common], help="check an experiment file")
    validate.add_argument("file", type=Path)
    validate.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides")
    validate.add_argument("--resolved", action="store_true",
                          help="print the experiment that will run: the method's recipe and slot defaults under "
                               "the file's values, and each parameter group's learning rate")

    plugins = commands.add_parser("plugins", parents=[common], help="list plugins and their components")
    plugins.add_argument("--json", action="store_true", help="print JSON")

    schema = commands.add_parser("schema", parents=[common],
                                 help="JSON Schema of the experiment file, or of one component")
    schema.add_argument("kind", nargs="?", help="component kind, e.g. loss")
    schema.add_argument("name", nargs="?", help="component name, e.g. info_nce")

    from sslcore.commands.export import add_parser as add_export

    add_export(commands, common)

    evaluate = commands.add_parser("eval", parents=[common], help="run evaluators on a run or a backbone file")
    evaluate.add_argument("target", type=Path, help="a run folder, or a backbone.pt / checkpoint file")
    evaluate.add_argument("-e", "--evaluator", action="append", required=True, metavar="NAME", dest="evaluators",
                          help="evaluator to run (repeatable), e.g. linear_probe, low_shot_svm, finetune")
    evaluate.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE", dest="overrides",
                          help="change an evaluator's parameter (repeatable), e.g. --set protocol=moco")
    evaluate.add_argument("--config", type=Path, help="experiment YAML of a backbone file (encoder, transform, data)")
    evaluate.add_argument("--random-init", action="store_true",
                          help="evaluate the untrained encoder instead (the floor to compare against)")
    evaluate.add_argument("-o", "--output", type=Path, help="folder for evaluations.json and plots "
                                                            "(default: the run folder)")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")

    report = commands.add_parser("report", parents=[common], help="write RUN_DIR/report.md: config, curves, "
                                                                  "evaluation tables and plots")
    report.add_argument("run_dir", type=Path)

    from sslcore.commands.embed import add_parser as add_embed

    add_embed(commands, common)

    from sslcore.commands.new_plugin import add_parser as add_new_plugin
    from sslcore.commands.sweep import add_parser as add_sweep

    add_new_plugin(commands)
    add_sweep(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = _parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sslcore").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: the checkpoints written before are kept; continue with sslcore run --resume RUN_DIR",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _registry(args: argparse.Namespace) -> Registry:
    """The registry with the ``-p`` modules: one that cannot be loaded is an error (the user named it, as in
    ``plugins:``), a broken installed plugin a warning (the command may not need it)."""
    from sslcore.api.errors import PluginError
    from sslcore.registry import Registry

    registry = Registry(modules=args.plugin)
    named = [p for p in registry.plugins if p.error and p.module in args.plugin]
    if named:
        raise PluginError(*(f"-p {p.module}: cannot load it as a plugin ({p.error}); check the module name and "
                            "that its package is installed in this environment" for p in named))
    for line in registry.errors:
        print(f"warning: {line}", file=sys.stderr)
    return registry


def _load(args: argparse.Namespace, registry: Registry) -> Resolved:
    from sslcore.config import load_experiment

    return load_experiment(args.file, registry, args.overrides)


def _fitted_line(resolved: Resolved) -> str | None:
    """What the experiment left out and the images' size chose, said once."""
    if not resolved.fitted:
        return None
    values = ", ".join(f"{key} {json.dumps(value)}" for key, value in resolved.fitted.items())
    return (f"sslcore: fitted to the {resolved.image_side} px training images: {values} (the recipe's are for "
            f"larger images; give them in the experiment to choose otherwise)")


def cmd_run(args: argparse.Namespace) -> int:
    from sslcore.engine.launch import EXIT_PREEMPTED, launch, run_dir_of
    from sslcore.engine.rundir import RunDir

    if args.file is None:
        if args.resume is None:
            raise UserError("sslcore run: give an experiment file (or --resume RUN_DIR)")
        args.file = RunDir(args.resume).config_file
    registry = _registry(args)
    resolved = _load(args, registry)
    fitted = _fitted_line(resolved)
    if fitted:
        print(fitted, flush=True)
    metrics = launch(resolved, registry, args.plugin, resume=args.resume, address=args.address,
                     started=args.started, verbose=args.verbose)
    if metrics.get("preempted"):
        run = args.resume or Path(resolved.experiment.output_dir) / resolved.experiment.name
        print(f"sslcore: stopped by SIGTERM at step {int(metrics['step'])} with a checkpoint; continue with "
              f"sslcore run --resume {run}", file=sys.stderr)
        return EXIT_PREEMPTED
    from sslcore.engine.console import final_summary

    run = RunDir(args.resume) if args.resume else run_dir_of(resolved)
    print("\n".join(final_summary(run.path.resolve(), resolved.as_dict(), time.time() - args.started)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from sslcore.engine.launch import check_data, dry_build

    registry = _registry(args)
    resolved = _load(args, registry)
    method = dry_build(resolved, registry, dataset_size=check_data(resolved, registry))
    fitted = _fitted_line(resolved)
    if args.resolved:
        print(_resolved_yaml(resolved, method, fitted))
        return 0
    if fitted:
        print(fitted)
    blocks = ", ".join(f"{slot}={block['name']}" for slot, block in resolved.blocks.items())
    print(f"{args.file}: ok ({blocks})")
    return 0


def _resolved_yaml(resolved: Resolved, method: object, fitted: str | None = None) -> str:
    """The resolved experiment as YAML, headed by comments with the learning rate of each parameter group (and
    what was fitted to the images)."""
    import yaml

    from sslcore.engine.build import parameter_groups

    experiment = resolved.as_dict()
    train = experiment["train"]
    optimizer, batch = train["optimizer"], train["batch_size"]
    rule = {"linear": f"x {batch}/256", "sqrt": f"x sqrt({batch})", "none": "(no scaling)"}[train["lr_scaling"]]
    lines = [f"# {resolved.source}, resolved: the method's recipe and slot defaults under the file's values",
             f"# peak lr = base lr {rule} (train.lr_scaling: {train['lr_scaling']}), then warmup "
             f"{train['warmup_epochs']:g} epochs"
             + (f" from {train['warmup_start']:g} x peak" if train["warmup_start"] else "")
             + f" and {train['schedule']} schedule "
             + (f"x {train['gamma']:g} at epochs {', '.join(f'{m:g}' for m in train['milestones'])}"
                if train["schedule"] == "step" else f"to {train['final_lr']:g} x peak")]
    for group in parameter_groups(method, experiment["method"]["name"], train, optimizer, batch):
        count = sum(p.numel() for p in group["params"])
        extras = [flag for flag in ("lars_exclude", "fixed_lr") if group[flag]]
        lines.append(f"# param group {group['group']} ({len(group['params'])} tensors, {count / 1e6:.2f} M): "
                     f"peak lr {group['lr']:.6g}, weight decay {group['weight_decay']:g}"
                     + (f", {', '.join(extras)}" if extras else ""))
    if fitted:
        lines.append(f"# {fitted.removeprefix('sslcore: ')}")
    return "\n".join(lines) + "\n" + yaml.safe_dump(experiment, sort_keys=False).rstrip()


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry(args)
    infos = [p.as_dict() for p in registry.plugins]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        head = f"{info['name']} ({info['distribution']} {info['version']}, {info['source']})"
        if info["error"]:
            print(f"{head}: FAILED TO LOAD: {info['error']}")
            continue
        parts = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info["components"].items())
        print(f"{head}: {parts}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from sslcore.config import component_schema, experiment_schema

    registry = _registry(args)
    if args.kind is None:
        schema = experiment_schema(registry)
    elif args.name is None:
        raise UserError(f"sslcore schema {args.kind}: also give a name, e.g. "
                        f"sslcore schema {args.kind} {next(iter(_names(registry, args.kind)), 'NAME')}")
    else:
        schema = component_schema(registry, _kind(registry, args.kind), args.name)
    print(json.dumps(schema, indent=2))
    return 0


def _kind(registry: Registry, kind: str) -> str:
    from sslcore.registry import did_you_mean

    aliases = {"negatives": "negative_source", "data": "dataset", "augmentations": "augmentation"}
    kind = aliases.get(kind, kind)
    if kind not in registry.components:
        raise UserError(f"unknown component kind '{kind}'{did_you_mean(kind, registry.components)}")
    return kind


def _names(registry: Registry, kind: str) -> list[str]:
    return registry.names(_kind(registry, kind))


def cmd_export(args: argparse.Namespace) -> int:
    from sslcore.commands.export import cmd_export as export

    return export(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from sslcore.commands.evaluate import evaluate_target

    registry = _registry(args)
    results = evaluate_target(args.target, args.evaluators, registry, args.overrides, config=args.config,
                              random_init=args.random_init, output=args.output, device=args.device)
    for key, metrics in results.items():
        print(f"{key}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print("sslcore: eval " + json.dumps(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sslcore.commands.report import write_report

    if args.plugin:  # a report needs no plugin, but a -p that cannot be loaded is refused as everywhere
        _registry(args)
    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from sslcore.commands.embed import cmd_embed as embed

    return embed(args)


def cmd_search(args: argparse.Namespace) -> int:
    from sslcore.commands.embed import cmd_search as search

    return search(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sslcore.commands.sweep import cmd_sweep as sweep

    return sweep(args)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from sslcore.commands.new_plugin import cmd_new_plugin as new_plugin

    return new_plugin(args)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "schema": cmd_schema,
            "export": cmd_export, "eval": cmd_eval, "report": cmd_report, "new-plugin": cmd_new_plugin,
            "sweep": cmd_sweep, "embed": cmd_embed, "search": cmd_search}

if __name__ == "__main__":
    sys.exit(main())
