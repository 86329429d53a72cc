"""A run folder, ``<output_dir>/<name>/``, and the one owner of its files' names and formats.

    config.yaml           the resolved experiment (what ``sslcore validate --resolved`` prints)
    checkpoint_NNNNNN/    state.pt: model (method state included), optimizer, scheduler, scaler, epoch, step,
                          dataset_size, aim run hash; the epoch NNNNNN is 0-based
    metrics.jsonl         one record per log window, evaluation and E-step (rank 0)
    summary.json          start-up time, the evaluators before and after training
    evaluations.json      what ``sslcore eval`` measured, by evaluator
    backbone.pt           the encoder's state_dict after the last epoch
    error.json            the one-line errors of a worker that stopped on a user error (read by the driver)
    report.md, report/    what ``sslcore report`` writes

``sslcore run`` and ``--resume``, ``sslcore export``, ``eval`` and ``report`` go through :class:`RunDir`, and
every torch file is read by :func:`load_torch_file`.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import yaml

from sslcore.api.errors import UserError

CHECKPOINT_FILE = "state.pt"


def load_torch_file(path: Path, problem: str = "{path} cannot be read as torch weights ({reason})") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that cannot be read is the one line
    ``problem`` (formatted with the path and the reason)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise UserError(problem.format(path=path, reason=reason)) from None


class RunDir:
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    EVALUATIONS = "evaluations.json"
    BACKBONE = "backbone.pt"
    ERROR = "error.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- the experiment ---------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def write_config(self, experiment: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.config_file, "w") as f:
            yaml.safe_dump(experiment, f, sort_keys=False)

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_file.read_text())

    # -- checkpoints ------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files, oldest first (local and Ray Train checkpoints alike)."""
        return sorted(self.path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_folder(self, epoch: int) -> Path:
        return self.path / f"checkpoint_{epoch:06d}"

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        """The state a checkpoint holds (see the module docstring), on the CPU."""
        state = load_torch_file(path, "checkpoint {path} cannot be read ({reason}): delete "
                                      f"{path.parent} to resume from the checkpoint before it")
        if not isinstance(state, dict) or "model" not in state:
            raise UserError(f"{path} is not an sslcore checkpoint (no 'model' in it)")
        return state

    # -- records ----------------------------------------------------------------------------------------

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; a last line cut short by a stopped run is left out."""
        records = []
        if self.metrics_file.is_file():
            for line in self.metrics_file.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def read_summary(self) -> dict[str, Any]:
        path = self.path / self.SUMMARY
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_summary(self, update: dict[str, Any]) -> None:
        self._write_json(self.SUMMARY, {**self.read_summary(), **update})

    def read_evaluations(self) -> dict[str, Any]:
        path = self.path / self.EVALUATIONS
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_evaluation(self, key: str, entry: dict[str, Any]) -> None:
        """Merge one evaluation into evaluations.json (written whole each time: a stopped run keeps the rest)."""
        self._write_json(self.EVALUATIONS, {**self.read_evaluations(),
                                            key: {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}})

    @property
    def backbone_file(self) -> Path:
        return self.path / self.BACKBONE

    # -- errors -----------------------------------------------------------------------------------------

    def write_error(self, rank: int, lines: list[str]) -> None:
        self._write_json(self.ERROR, {"rank": rank, "lines": lines})

    def read_error(self) -> list[str] | None:
        path = self.path / self.ERROR
        return json.loads(path.read_text())["lines"] if path.is_file() else None

    def clear_error(self) -> None:
        (self.path / self.ERROR).unlink(missing_ok=True)

    def _write_json(self, name: str, payload: dict[str, Any]) -> None:
        temporary = self.path / f".{name}.tmp"
        temporary.write_text(json.dumps(payload, indent=2))
        temporary.replace(self.path / name)
