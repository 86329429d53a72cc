"""``sslcore sweep``: a search over an experiment's values on Ray Tune, pruning the trials that fall behind.

::

    sslcore sweep experiment.yaml --param loss.temperature='[0.1,0.2,0.4]' \
                                  --param train.optimizer.lr='loguniform(0.03,0.3)' --trials 2
    sslcore sweep --resume runs/NAME-sweep      # an interrupted sweep continues where it stopped

The search space is given by ``--param key.path=SPACE`` (repeatable) or by the file's ``sweep:`` section
(:class:`sslcore.config.SweepSection`, where the other settings live too; flags win). A list is a grid (every
value); ``loguniform(lo, hi)`` and ``uniform(lo, hi)`` are sampled ``--trials`` times, each sample crossed
with every grid point (Ray Tune's ``num_samples``).

Each trial is ``sslcore run`` of the experiment with the trial's values, in one process with
``--cpus-per-trial`` CPUs (and one GPU with ``scaling.use_gpu``), in a run folder of its own,
``<output_dir>/<name>-sweep/trials/trial_NNNNN``: it can be resumed, evaluated and reported like any run.
As many trials train at once as the cluster's resources hold (``--max-concurrent`` caps it). Every epoch
whose metrics carry ``--metric`` (default ``knn_top1``, from a kNN evaluator) is reported to Tune, and
ASHA (``--scheduler asha``, the default) stops a trial that is behind ``1 - 1/reduction_factor`` of the
trials at a rung (epochs ``grace_epochs x reduction_factor^k``); ``--scheduler none`` trains every trial
to the end.

Ctrl-C (or SIGTERM) stops the sweep with Ray Tune's state saved; ``--resume`` restores it (Tune's
``Tuner.restore``): finished trials stay finished, unfinished ones resume from their run folder's last
checkpoint. ASHA's rungs start empty again after a restore (Tune saves its search state, not the
scheduler's), so trials resumed then are compared only with the trials that report after it.

At the end: the table of trials (printed, and ``trials.md``), the metric per epoch of every trial
(``metric.png``), and the best trial's experiment (``best.yaml``, the best of the trials that trained every
epoch, by the metric at their last epoch), which ``sslcore run`` trains again.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sslcore.api.errors import ConfigError, UserError

if TYPE_CHECKING:
    from sslcore.config import Resolved

SWEEP_FILE = "sweep.json"
TUNE_FOLDER = "tune"
TRIALS_FOLDER = "trials"
EXIT_INTERRUPTED, EXIT_PREEMPTED = 130, 75
#: metrics every epoch carries (the training loop's own); any other comes from an evaluator or the method
EPOCH_METRICS = ("loss", "img_per_s", "epoch_seconds")


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sweep = commands.add_parser("sweep", parents=[common], help="search an experiment's values on Ray Tune, "
                                                                "pruning trials on an epoch metric (ASHA)")
    sweep.add_argument("file", nargs="?", type=Path, help="experiment YAML")
    sweep.add_argument("--param", action="append", default=[], metavar="KEY.PATH=SPACE", dest="params",
                       help="a value to search (repeatable): [a,b,c] (grid), loguniform(lo,hi) or uniform(lo,hi)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                       help="override a value of the file for every trial (repeatable)")
    sweep.add_argument("--trials", type=int, help="samples of the distributions, each crossed with the grid "
                                                  "(default 1)")
    sweep.add_argument("--metric", help="epoch metric to prune on and pick the best by (default knn_top1)")
    sweep.add_argument("--mode", choices=["max", "min"], help="whether a larger metric is better (default max)")
    sweep.add_argument("--scheduler", choices=["asha", "none"], help="asha (default) or none: every trial to "
                                                                     "the end")
    sweep.add_argument("--grace-epochs", type=int, help="ASHA's first rung (default: the first epoch that "
                                                        "reports the metric)")
    sweep.add_argument("--reduction-factor", type=float, help="ASHA keeps 1/this of the trials at a rung "
                                                              "(default 2)")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    sweep.add_argument("--cpus-per-trial", type=float, help="default: scaling.cpus_per_worker, else 1")
    sweep.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue the sweep in SWEEP_DIR")
    sweep.add_argument("--address", help="join this Ray cluster (default: start a local one); the output_dir "
                                         "must then be on storage every node shares")
    sweep.add_argument("-v", "--verbose", action="store_true", help="also show Ray Tune's own output")


FLAGS = ("trials", "metric", "mode", "scheduler", "grace_epochs", "reduction_factor", "max_concurrent",
         "cpus_per_trial")


# -- the sweep, as the driver prepares it -----------------------------------------------------------------

def prepare(args: argparse.Namespace, registry: Any) -> tuple[dict[str, Any], Resolved]:
    """The sweep of ``args.file`` (what sweep.json keeps): the experiment as the user gave it (file and
    ``--set``, without its ``sweep:`` section), the settings, and where it runs; and the experiment resolved.
    Every value of the space is validated here, so that a wrong key fails in one line before Ray starts."""
    from sslcore.config import SweepSection, apply_overrides, fit_to_images, load_yaml, resolve

    data, lines = load_yaml(args.file)
    apply_overrides(data, args.overrides, lines)
    section = data.get("sweep") if isinstance(data.get("sweep"), dict) else {}
    section = dict(section or {})
    params = dict(section.get("params") or {})
    for item in args.params:
        key, sep, space = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item}: expected key.path=SPACE, e.g. --param loss.temperature=[0.1,0.2]")
        params[key] = space
    section["params"] = params
    section.update({flag: getattr(args, flag) for flag in FLAGS if getattr(args, flag) is not None})
    data["sweep"] = section
    resolved = fit_to_images(resolve(data, registry, source=str(args.file), lines=lines), data, registry)
    settings: SweepSection = resolved.experiment.sweep  # type: ignore[assignment]  # set just above
    if not settings.params:
        raise UserError(f"sslcore sweep {args.file}: nothing to search; give --param key.path=[a,b] (or "
                        "sweep: {params: {key.path: [a, b]}} in the file)")
    experiment = resolved.experiment
    if experiment.scaling.num_workers != 1:
        raise resolved.error(("scaling", "num_workers"), "sslcore sweep trains each trial in one process (the "
                                                         "trials run side by side); set it to 1")
    base = copy.deepcopy(data)
    base.pop("sweep")
    for key, space in settings.params.items():
        _check_values(base, key, space, registry, str(args.file))
    folder = Path(experiment.output_dir).expanduser().resolve() / f"{experiment.name}-sweep"
    metric = settings.metric
    grace = settings.grace_epochs or _first_metric_epoch(metric, resolved.evaluators)
    if metric.startswith("knn") and not any(e["name"] == "knn" for e in resolved.evaluators):
        raise resolved.error(("sweep", "metric"), f"'{metric}' comes from the knn evaluator, which the experiment "
                                                  "has not; add one to evaluators: or choose another metric "
                                                  "(e.g. --metric loss --mode min)")
    return {"source": str(Path(args.file).resolve()), "experiment": base, "settings": settings.model_dump(),
            "grace_epochs": grace, "epochs": experiment.train.epochs, "name": experiment.name,
            "folder": str(folder), "plugins": list(args.plugin), "autoload": registry.autoload,
            "cwd": os.getcwd(), "use_gpu": experiment.scaling.use_gpu,
            "cpus": settings.cpus_per_trial or experiment.scaling.cpus_per_worker or 1,
            "aim_repo": (experiment.tracking.aim.repo or str(Path(experiment.output_dir).resolve() / ".aim"))
            if experiment.tracking.aim is not None else None}, resolved


def _check_values(base: dict[str, Any], key: str, space: Any, registry: Any, source: str) -> None:
    """Resolve the experiment with each value a trial can take (a distribution's bounds), so that a key the
    experiment does not have or a value its component refuses is an error now."""
    from sslcore.config import apply_overrides, resolve, search_space

    kind, values = search_space(space)
    for value in values:
        data = copy.deepcopy(base)
        try:
            apply_overrides(data, [f"{key}={json.dumps(value)}"], {})
            resolve(data, registry, source=source)
        except ConfigError as exc:
            raise ConfigError(*(f"sweep.params.{key} = {json.dumps(value)} ({kind}): {line}"
                                for line in exc.lines)) from None


def _first_metric_epoch(metric: str, evaluators: list[dict[str, Any]]) -> int:
    """The first epoch whose metrics carry ``metric``: 1 for the loop's own, else the evaluators' every_epochs."""
    if metric in EPOCH_METRICS:
        return 1
    return min((int(e.get("every_epochs") or 1) for e in evaluators), default=1)


def rungs(grace: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which ASHA compares trials (as Ray Tune's ``_Bracket`` places them), ascending."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1) if max_t >= grace else 0
    return sorted(int(grace * reduction_factor**k) for k in range(count) if grace * reduction_factor**k < max_t)


def param_space(settings: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    from sslcore.config import search_space

    space = {}
    for key, spec in settings["params"].items():
        kind, values = search_space(spec)
        space[key] = (tune.grid_search(values) if kind == "grid" else
                      tune.loguniform(*values) if kind == "loguniform" else tune.uniform(*values))
    return space


def trial_name(trial_id: str) -> str:
    """``trial_00003`` for Tune's ``5f3a1_00003`` (its counter, stable across restores)."""
    match = re.fullmatch(r"[0-9a-f]+_(\d+)", trial_id)
    return f"trial_{match.group(1)}" if match else f"trial_{trial_id}"


def trial_experiment(sweep: dict[str, Any], values: dict[str, Any], name: str) -> dict[str, Any]:
    """The experiment a trial runs: the user's, with the trial's values, named for the trial and kept in the
    sweep's folder (its aim runs in the user's repository, under the sweep's name)."""
    from sslcore.config import apply_overrides

    data = copy.deepcopy(sweep["experiment"])
    apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in values.items()], {})
    data["name"] = name
    data["output_dir"] = str(Path(sweep["folder"]) / TRIALS_FOLDER)
    if sweep["aim_repo"] is not None:
        tracking = data.setdefault("tracking", {}) or {}
        aim = tracking.get("aim") or {}
        aim.setdefault("repo", sweep["aim_repo"])
        aim.setdefault("experiment", f"{sweep['name']}-sweep")
        tracking["aim"] = aim
        data["tracking"] = tracking
    return data


# -- a trial, in its Ray Tune actor -------------------------------------------------------------------------

def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: ``sslcore run`` of the trial's experiment in this process, its epochs reported to Tune
    (``TuneSession``). A trial restarted by Tune's restore finds its run folder's checkpoints and resumes
    from the last (the Trainer does so for any run folder holding one)."""
    from ray import tune

    from sslcore.config import fit_to_images, resolve
    from sslcore.engine.loop import WorkerSpec, train_loop_per_worker
    from sslcore.engine.rundir import RunDir
    from sslcore.registry import Registry

    started = time.time()
    name = trial_name(tune.get_context().get_trial_id())
    run = RunDir(Path(sweep["folder"]) / TRIALS_FOLDER / name)
    run.path.mkdir(parents=True, exist_ok=True)
    run.clear_error()
    run.clear_stop()
    if os.path.isdir(sweep["cwd"]):
        os.chdir(sweep["cwd"])  # relative paths in the file mean the user's folder
    try:
        registry = Registry(autoload=sweep["autoload"], modules=sweep["plugins"])
        data = trial_experiment(sweep, config, name)
        resolved = fit_to_images(resolve(data, registry, source=sweep["source"]), data, registry)
        spec = WorkerSpec(experiment=resolved.as_dict(), run_dir=str(run.path),
                          plugins=(*sweep["plugins"], *resolved.experiment.plugins), autoload=sweep["autoload"],
                          source=sweep["source"], cwd=sweep["cwd"], cpus_per_worker=sweep["cpus"],
                          launched_at=started, backend="tune", sweep_metric=sweep["settings"]["metric"])
        train_loop_per_worker(spec)
    except UserError as exc:  # a NaN loss, unreadable data: the trial fails in one line, the sweep goes on
        run.write_error(0, exc.lines)
        raise TrialFailed(exc.lines[0]) from None


class TrialFailed(Exception):
    """A trial's user error (kept in its run folder); the driver prints it as one line."""


# -- the driver ------------------------------------------------------------------------------------------

def _values(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _callback(sweep: dict[str, Any]) -> Any:
    """A Tune callback that says on the console what each trial does, one line per event."""
    from ray.tune import Callback

    metric, epochs = sweep["settings"]["metric"], sweep["epochs"]

    class Lines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{trial_name(trial.trial_id)}: started ({_values(trial.config)})", flush=True)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            shown = "  ".join(f"{k} {result[k]:.4f}" for k in dict.fromkeys((metric, "loss")) if k in result)
            print(f"{trial_name(trial.trial_id)}: epoch {result.get('epochs')}/{epochs}  {shown}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done = (trial.last_result or {}).get("epochs", 0)
            outcome = "done" if done >= epochs else "stopped early by ASHA"
            print(f"{trial_name(trial.trial_id)}: {outcome} at epoch {done}/{epochs}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{trial_name(trial.trial_id)}: failed: {_trial_error(sweep, trial.trial_id)}", flush=True)

    return Lines()


def _trial_error(sweep: dict[str, Any], trial_id: str) -> str:
    from sslcore.engine.rundir import RunDir

    run = RunDir(Path(sweep["folder"]) / TRIALS_FOLDER / trial_name(trial_id))
    lines = run.read_error()
    return lines[0] if lines else f"see {Path(sweep['folder']) / TUNE_FOLDER / trial_name(trial_id) / 'error.txt'}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from sslcore.commands.cli import _fitted_line, _registry

    registry = _registry(args)
    if args.resume is not None:
        if args.file is not None or args.params or args.overrides or any(getattr(args, f) is not None
                                                                          for f in FLAGS):
            raise UserError("sslcore sweep --resume SWEEP_DIR: give nothing else (the sweep continues as it began)")
        sweep = _read_sweep(args.resume)
    elif args.file is None:
        raise UserError("sslcore sweep: give an experiment file (or --resume SWEEP_DIR)")
    else:
        sweep, resolved = prepare(args, registry)
        fitted = _fitted_line(resolved)
        if fitted:
            print(fitted, flush=True)
        folder = Path(sweep["folder"])
        if (folder / SWEEP_FILE).exists():
            raise UserError(f"{folder} already holds a sweep: pass --resume {folder} to continue it, or set a new "
                            "name (--set name=...)")
        if args.address is None:  # a remote cluster's nodes may see other files than this machine
            from sslcore.engine.launch import check_data

            check_data(resolved, registry)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SWEEP_FILE).write_text(json.dumps(sweep, indent=2))
    return _run(sweep, args)


def _read_sweep(folder: Path) -> dict[str, Any]:
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"--resume {folder}: no {SWEEP_FILE} there; give the folder of an earlier sweep "
                        "(<output_dir>/<name>-sweep)")
    return json.loads(path.read_text())


def _run(sweep: dict[str, Any], args: argparse.Namespace) -> int:
    import logging

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from sslcore.engine.launch import init_ray

    started = time.time()
    folder, settings = Path(sweep["folder"]), sweep["settings"]
    if not args.verbose:  # Tune's own tables and notices: the callback below says what each trial does
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.ERROR)
    started_here = init_ray(args.address, args.verbose, sweep["plugins"])
    resources = ray.cluster_resources()
    cpus, gpus = sweep["cpus"], 1 if sweep["use_gpu"] else 0
    if gpus and not resources.get("GPU"):
        raise UserError("scaling.use_gpu: true, but the Ray cluster has no GPU; set it to false or join a cluster "
                        "with GPUs (--address)")
    fits = int(min(resources.get("CPU", 1) // cpus, resources.get("GPU", 0) // gpus if gpus else math.inf))
    at_once = min(fits, settings["max_concurrent"] or fits)
    if at_once < 1:
        raise UserError(f"--cpus-per-trial {cpus:g}: the cluster has {resources.get('CPU', 0):g} CPUs; ask for "
                        "fewer")
    metric, mode, epochs = settings["metric"], settings["mode"], sweep["epochs"]
    if settings["scheduler"] == "asha":
        # stop_last_trials=False: a trial at its last epoch returns by itself, after writing backbone.pt and its
        # summary (Tune's stop would end it inside that epoch's report)
        scheduler: Any = ASHAScheduler(time_attr="epochs", max_t=epochs, grace_period=sweep["grace_epochs"],
                                       reduction_factor=settings["reduction_factor"], stop_last_trials=False)
        pruning = (f"ASHA on {metric} ({mode}) at epochs "
                   f"{', '.join(map(str, rungs(sweep['grace_epochs'], settings['reduction_factor'], epochs)))}")
    else:
        scheduler, pruning = FIFOScheduler(), f"every trial to the end, then the best by {metric} ({mode})"
    grid = math.prod(len(v) for v in (_space(s) for s in settings["params"].values()) if v is not None)
    count = grid * settings["trials"]
    print(f"sslcore: sweep of {count} trials ({_count_words(grid, settings['trials'])}), up to {at_once} at once "
          f"({cpus:g} CPUs{' and 1 GPU' if gpus else ''} each of {resources.get('CPU', 0):g}); {pruning}; "
          f"folder {folder}", flush=True)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": cpus, "gpu": gpus})
    tune_path = folder / TUNE_FOLDER
    run_config = tune.RunConfig(
        name=TUNE_FOLDER, storage_path=str(folder), verbose=2 if args.verbose else 0,
        callbacks=[_callback(sweep)], checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=0))
    if args.resume is not None and tune.Tuner.can_restore(str(tune_path)):
        print(f"sslcore: resuming the sweep in {folder}", flush=True)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True)
    else:  # a sweep stopped before Tune saved anything starts again
        tuner = tune.Tuner(
            trainable, param_space=param_space(settings), run_config=run_config,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=settings["trials"],
                                        max_concurrent_trials=at_once,
                                        trial_name_creator=lambda t: trial_name(t.trial_id),
                                        trial_dirname_creator=lambda t: trial_name(t.trial_id)))
    stopped: dict[str, bool] = {}

    def on_sigterm(signum: int, frame: object) -> None:  # Tune saves its state on SIGINT; SIGTERM asks the same
        stopped["sigterm"] = True
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        grid_result = tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started_here:
            ray.shutdown()
    trials = _trials(sweep, grid_result)
    unfinished = sum(t["outcome"] == "unfinished" for t in trials) + max(0, count - len(trials))  # not begun
    print("\n".join(write_results(sweep, trials, time.time() - started)), flush=True)
    if unfinished:
        print(f"sslcore: sweep interrupted with {unfinished} of {count} trials unfinished; continue with "
              f"sslcore sweep --resume {folder}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED if stopped.get("sigterm") else EXIT_INTERRUPTED
    return 0


def _space(spec: Any) -> list[Any] | None:
    from sslcore.config import search_space

    kind, values = search_space(spec)
    return values if kind == "grid" else None


def _count_words(grid: int, samples: int) -> str:
    if samples == 1:
        return f"a grid of {grid}"
    return f"{samples} samples" + (f" x a grid of {grid}" if grid > 1 else "")


# -- the results -----------------------------------------------------------------------------------------

def _trials(sweep: dict[str, Any], grid: Any) -> list[dict[str, Any]]:
    """Each trial of Tune's result grid: name, values, its metric per epoch, epochs done, outcome."""
    from ray.tune.experiment import Trial

    metric, epochs = sweep["settings"]["metric"], sweep["epochs"]
    status = {t.trial_id: t.status for t in grid._experiment_analysis.trials}  # a trial's status: not in Result
    status.update(saved_statuses(Path(sweep["folder"]) / TUNE_FOLDER))
    out = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(result, grid)
        run_dir = Path(sweep["folder"]) / TRIALS_FOLDER / trial_name(trial_id)
        history = trial_history(run_dir, metric)
        done = max([int((result.metrics or {}).get("epochs", 0)), *(e for e, _ in history)])
        state = status.get(trial_id)
        if result.error is not None or state == Trial.ERROR:
            outcome = "failed: " + _trial_error(sweep, trial_id)
        elif state != Trial.TERMINATED:
            outcome = "unfinished"
        else:
            outcome = "done" if done >= epochs else "stopped early"
        out.append({"trial": trial_name(trial_id), "values": dict(result.config), "history": history,
                    "epochs": done, "outcome": outcome, "metric": history[-1][1] if history else None,
                    "run_dir": str(run_dir)})
    return sorted(out, key=lambda t: t["trial"])


def trial_history(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """``[(epoch, metric)]`` of a trial, from the epochs its run folder recorded as reported (Tune's own
    results miss an epoch reported just before an interruption)."""
    from sslcore.engine.session import TuneSession

    path = run_dir / TuneSession.EPOCHS_FILE
    by_epoch: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if metric in record:
                by_epoch[int(record["epochs"])] = float(record[metric])
    return sorted(by_epoch.items())


def saved_statuses(tune_path: Path) -> dict[str, str]:
    """Each trial's status in the experiment state Tune saved last. After Ctrl-C the trials in memory read
    TERMINATED, but the state a restore starts from has them RUNNING: that is what says a trial is unfinished."""
    states = sorted(tune_path.glob("experiment_state-*.json"))  # the newest by its name's time, as Tune's restore
    if not states:
        return {}
    saved = json.loads(states[-1].read_text())
    out = {}
    for entry in saved.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        out[trial["trial_id"]] = trial["status"]
    return out


def _trial_id_of(result: Any, grid: Any) -> str:
    name = Path(result.path).name
    for trial in grid._experiment_analysis.trials:
        if trial_name(trial.trial_id) == name:
            return trial.trial_id
    return name


def best_trial(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best of the trials that trained every epoch, by the metric at their last epoch."""
    complete = [t for t in trials if t["outcome"] == "done" and t["metric"] is not None]
    if not complete:
        return None
    sign = 1 if sweep["settings"]["mode"] == "max" else -1
    return max(complete, key=lambda t: sign * t["metric"])


def write_results(sweep: dict[str, Any], trials: list[dict[str, Any]], seconds: float) -> list[str]:
    """Write trials.md, metric.png and best.yaml into the sweep's folder; returns the lines to print."""
    folder, metric = Path(sweep["folder"]), sweep["settings"]["metric"]
    keys = list(sweep["settings"]["params"])
    header = ["trial", *keys, metric, "epochs", "outcome"]
    rows = [[t["trial"], *(_short(t["values"].get(k)) for k in keys),
             "" if t["metric"] is None else f"{t['metric']:.4f}", f"{t['epochs']}/{sweep['epochs']}", t["outcome"]]
            for t in trials]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(map(str, r)) + " |" for r in rows)]
    (folder / "trials.md").write_text(f"# Sweep {sweep['name']}: {len(trials)} trials\n\n" + "\n".join(markdown)
                                      + "\n")
    plot_trials(trials, metric, sweep["epochs"], folder / "metric.png")
    pruned = sum(t["outcome"] == "stopped early" for t in trials)
    failed = sum(t["outcome"].startswith("failed") for t in trials)
    lines = ["", *table, "",
             f"sslcore: {len(trials)} trials, {pruned} stopped early, {failed} failed, in {seconds / 60:.1f} min; "
             f"table {folder / 'trials.md'}, curves {folder / 'metric.png'}"]
    best = best_trial(sweep, trials)
    if best is None:
        lines.append("sslcore: no trial trained every epoch, so there is no best experiment yet")
        return lines
    path = folder / "best.yaml"
    experiment = copy.deepcopy(sweep["experiment"])
    from sslcore.config import apply_overrides

    apply_overrides(experiment, [f"{k}={json.dumps(v)}" for k, v in best["values"].items()], {})
    experiment["name"] = f"{sweep['name']}-best"
    path.write_text(f"# The best of {len(trials)} trials of the sweep in {folder} by {metric} "
                    f"({sweep['settings']['mode']}): {best['trial']}, {metric} {best['metric']:.4f} after "
                    f"{best['epochs']} epochs\n# ({_values(best['values'])}); its run folder: {best['run_dir']}\n"
                    f"# From {sweep['source']}; train it again with (in {sweep['cwd']}, as the sweep): "
                    f"sslcore run {path}\n"
                    + yaml.safe_dump(experiment, sort_keys=False))
    lines.append(f"sslcore: best {best['trial']} ({_values(best['values'])}): {metric} {best['metric']:.4f}; "
                 f"its experiment: {path}")
    return lines


def plot_trials(trials: list[dict[str, Any]], metric: str, epochs: int, path: Path) -> None:
    """The metric per epoch of every trial, one line each; a trial stopped early ends in a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for trial in trials:
        if not trial["history"]:
            continue
        x, y = zip(*trial["history"])
        (line,) = axes.plot(x, y, marker="o", markersize=3, label=f"{trial['trial']} ({_values(trial['values'])})")
        if trial["outcome"] == "stopped early":
            axes.plot(x[-1], y[-1], marker="x", markersize=10, color=line.get_color())
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_xlim(0.5, epochs + 0.5)
    axes.set_title(f"{metric} per epoch of {len(trials)} trials (x: stopped early)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
