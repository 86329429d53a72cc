"""``sslcore report RUN_DIR``: one Markdown page that tells what a run did, readable without the aim UI.

``RUN_DIR/report.md`` holds the experiment (config.yaml), the training curves and the evaluation curves
(PNGs in ``RUN_DIR/report/``, drawn from metrics.jsonl), the evaluator results before and after training
(summary.json) and from ``sslcore eval`` (evaluations.json, trained against ``--random-init`` side by
side; the low-shot SVM as a k-by-metric table), and every picture the run wrote (embedding maps,
reconstructions, prototypes).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from sslcore.api.errors import UserError
from sslcore.commands.evaluate import RANDOM_INIT
from sslcore.engine.rundir import RunDir

REPORT_FILE = "report.md"
FIGURES = "report"
TRAIN_CURVES = ("loss", "lr", "img_per_s")
SVM_KEY = re.compile(r"svm_k(\d+)_(top1|map)(_std)?$")


def _plot_curves(records: list[dict[str, Any]], subset: str, x_key: str, keys: list[str], path: Path) -> bool:
    """One panel per metric of ``keys`` against ``x_key``, from the records of ``subset``; False: no data."""
    from matplotlib.figure import Figure

    series = {key: [(r[x_key] + (1 if x_key == "epoch" else 0), r[key]) for r in records
                    if r.get("subset") == subset and isinstance(r.get(key), (int, float))] for key in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), dpi=100)
    for i, (key, points) in enumerate(series.items()):
        axes = figure.add_subplot(rows, columns, i + 1)
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        axes.set_title(key)
        axes.set_xlabel("step" if x_key == "step" else "epoch (0: before training)")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return True


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows), ""]


def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _svm_table(trained: dict[str, float], floor: dict[str, float]) -> list[str]:
    shots = sorted({int(m.group(1)) for key in trained if (m := SVM_KEY.match(key))})

    def cell(metrics: dict[str, float], k: int, name: str) -> str:
        if f"svm_k{k}_{name}" not in metrics:
            return ""
        return f"{metrics[f'svm_k{k}_{name}']:.4f} ± {metrics.get(f'svm_k{k}_{name}_std', 0.0):.4f}"

    header = ["k per class", "top-1 (trained)", "top-1 (random init)", "mAP (trained)", "mAP (random init)"]
    return _table(header, [[k, cell(trained, k, "top1"), cell(floor, k, "top1"), cell(trained, k, "map"),
                            cell(floor, k, "map")] for k in shots])


def _evaluations_section(evaluations: dict[str, Any]) -> list[str]:
    lines = ["## Evaluations (`sslcore eval`)", ""]
    names = sorted({key.split("@")[0] for key in evaluations})
    for name in names:
        trained = evaluations.get(name, {})
        floor = evaluations.get(f"{name}@{RANDOM_INIT}", {})
        block = (trained or floor).get("evaluator", {})
        settings = {k: v for k, v in block.items() if k != "name"}
        lines += [f"### {name}", "", "<details><summary>settings</summary>", "", "```yaml",
                  yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", "", "</details>", ""]
        if trained:
            lines += [f"Trained weights: `{trained['weights']}` (epoch {trained['epoch'] + 1}), "
                      f"{trained['seconds']} s.", ""]
        t_metrics, f_metrics = _scalars(trained.get("metrics")), _scalars(floor.get("metrics"))
        if name == "low_shot_svm":
            lines += _svm_table(t_metrics, f_metrics)
            continue
        keys = list(dict.fromkeys([*t_metrics, *f_metrics]))
        lines += _table(["metric", "trained", "random init"], [[k, t_metrics.get(k), f_metrics.get(k)] for k in keys])
    return lines


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and its figures); returns its path."""
    run = RunDir(run_dir)
    if not run.has_config():
        raise UserError(f"sslcore report {run_dir}: no {RunDir.CONFIG}; give the folder of a run (runs/<name>)")
    config_file = run.config_file
    records = run.read_metrics()
    summary = run.read_summary()
    evaluations = run.read_evaluations()

    lines = [f"# Run report: {run_dir.name}", ""]
    final = _scalars(summary.get("final"))
    if final:
        lines += [f"Trained {int(final.get('epoch', -1)) + 1} epochs ({int(final.get('step', 0))} steps); "
                  f"final loss {_fmt(final.get('loss'))}.", ""]
    else:
        lines += ["No finished training recorded in summary.json (a stopped or running run).", ""]

    lines += ["## Curves", ""]
    if _plot_curves(records, "train", "step", list(TRAIN_CURVES), run_dir / FIGURES / "train.png"):
        lines += [f"![training curves]({FIGURES}/train.png)", ""]
    extra = sorted({k for r in records if r.get("subset") == "train" for k, v in r.items()
                    if isinstance(v, (int, float)) and k not in (*TRAIN_CURVES, "epoch", "step")})
    if extra and _plot_curves(records, "train", "step", extra, run_dir / FIGURES / "train_terms.png"):
        lines += [f"![method metrics]({FIGURES}/train_terms.png)", ""]
    eval_keys = sorted({k for r in records if r.get("subset") == "eval" for k, v in r.items()
                        if isinstance(v, (int, float)) and k not in ("epoch", "step")})
    if _plot_curves(records, "eval", "epoch", eval_keys, run_dir / FIGURES / "eval.png"):
        lines += [f"![evaluation curves]({FIGURES}/eval.png)", ""]

    initial = _scalars(summary.get("initial"))
    during = {k: v for k, v in final.items() if k in eval_keys}
    if initial or during:
        lines += ["## Evaluators of the run", "", "Before training (random init) and after the last epoch.", ""]
        keys = list(dict.fromkeys([*initial, *during]))
        lines += _table(["metric", "before training", "final"], [[k, initial.get(k), during.get(k)] for k in keys])
    if evaluations:
        lines += _evaluations_section(evaluations)

    pictures = sorted(p for p in run_dir.glob("*.png"))
    if pictures:
        lines += ["## Pictures", ""]
        grouped: dict[str, list[Path]] = defaultdict(list)
        for picture in pictures:
            grouped[re.sub(r"_(init|epoch\d+)$", "", picture.stem)].append(picture)
        for group, files in grouped.items():
            lines += [f"### {group}", ""]
            lines += [f"![{p.stem}]({p.name})" for p in files] + [""]

    lines += ["## Experiment", "", "```yaml", config_file.read_text().rstrip(), "```", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
