"""A run folder, ``<output_dir>/<name>/``, and the one owner of its files' names and formats.

    config.yaml           the resolved experiment (what ``sslcore validate --resolved`` prints)
    checkpoint_NNNNNNNNN/ state.pt: model (method state included), optimizer, scheduler, scaler, the position
                          (epoch, batches done in it, optimizer step), the random states of every worker,
                          dataset_size, the number of metrics.jsonl records, aim run hash; state.sha256: its
                          checksum and size. NNNNNNNNN is the optimizer step it was taken after.
    metrics.jsonl         one record per log window, evaluation and E-step (rank 0)
    summary.json          start-up time, the evaluators before and after training
    evaluations.json      what ``sslcore eval`` measured, by evaluator
    backbone.pt           the encoder's state_dict after the last epoch
    report.md, report/    what ``sslcore report`` writes
    ray.log               Ray Train's own log lines of the last run on the Ray backend (tracebacks included)

Hidden, and only while a command runs: ``.error.json`` (the one-line errors of a worker that stopped on a
user error, read and removed by the driver), ``.stop`` (a stop request: the workers checkpoint at the next
step and return), ``.ray/`` (Ray Train's own bookkeeping), ``.checkpoint-*`` (a checkpoint being written).

Checkpoints are sslcore's own on both backends: written by rank 0 under a temporary name, checksummed and
renamed into place, verified when read, and a resume takes the newest one that verifies (Ray Train's
checkpoint manager is not used, so nothing of Ray's is needed to resume). ``sslcore run`` and ``--resume``,
``sslcore export``, ``eval`` and ``report`` go through :class:`RunDir`, and every torch file is read by
:func:`load_torch_file`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sslcore.api.errors import UserError

CHECKPOINT_FILE = "state.pt"
CHECKSUM_FILE = "state.sha256"
logger = logging.getLogger("sslcore.checkpoints")


#: how a file written by ``torch.save`` begins: a zip archive, or a pickle (the format before torch 1.6)
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def load_torch_file(path: Path, problem: str = "{path} cannot be read as torch weights ({reason})") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that cannot be read is the one line
    ``problem`` (formatted with the path and the reason).

    A file that does not start as ``torch.save`` writes (a text file, an image) is refused before torch's
    unpickler sees it: on such bytes it fails with whatever error the bytes happen to cause (KeyError, ...)."""
    import torch

    try:
        with open(path, "rb") as file:
            start = file.read(4)
    except OSError as exc:
        raise UserError(problem.format(path=path, reason=f"cannot read it: {exc.strerror or exc}")) from None
    if not start.startswith(TORCH_FILE_STARTS):
        raise UserError(problem.format(path=path, reason="not a torch file: torch.save writes a zip archive"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, which would run the file's code: never do that here
        reason = ("it holds objects other than tensors and plain containers, which sslcore does not unpickle"
                  if "weights_only" in str(exc) else "not a torch file: its pickle is broken")
        raise UserError(problem.format(path=path, reason=reason)) from None
    except Exception as exc:  # a damaged file makes the reader fail in many ways (zip, pickle, storage)
        message = " ".join(str(exc).split()) or type(exc).__name__
        if len(message) > 160:
            message = message[:160].rsplit(" ", 1)[0] + " ..."
        raise UserError(problem.format(path=path, reason=f"{type(exc).__name__}: {message}")) from None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class RunDir:
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    EVALUATIONS = "evaluations.json"
    BACKBONE = "backbone.pt"
    ERROR = ".error.json"
    STOP = ".stop"
    RAY = ".ray"
    RAY_LOG = "ray.log"
    CONSOLE = "console.jsonl"  # on Ray: rank 0's console lines, which the driver draws

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- the experiment ---------------------------------------------------------------------------------

    @property
    def console_file(self) -> Path:
        return self.path / self.CONSOLE

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
        """The run's checkpoint files, oldest first: by the step in the folder's name (folders of another
        name, such as Ray Train's of runs before sslcore 0.3, by time)."""
        def order(path: Path) -> tuple[int, float]:
            suffix = path.parent.name.removeprefix("checkpoint_")
            return (int(suffix), 0.0) if suffix.isdigit() else (-1, path.stat().st_mtime)

        return sorted(self.path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=order)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_folder(self, step: int) -> Path:
        return self.path / f"checkpoint_{step:09d}"

    def write_checkpoint(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``: into a temporary folder of the run folder, with its
        checksum, then renamed into place (a crash leaves no half checkpoint under a checkpoint name); then
        only the newest ``keep`` are kept. Returns the state.pt file."""
        import torch

        temporary = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.path))
        os.chmod(temporary, 0o755)  # mkdtemp makes it private; a checkpoint is as readable as the run folder
        try:
            file = temporary / CHECKPOINT_FILE
            with open(file, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            (temporary / CHECKSUM_FILE).write_text(f"{file_digest(file)} {file.stat().st_size}\n")
            target = self.checkpoint_folder(step)
            if target.exists():  # the same step again, after a resume from an earlier checkpoint
                shutil.rmtree(target)
            os.replace(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old.parent)
        return target / CHECKPOINT_FILE

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        """The state a checkpoint holds (see the module docstring), on the CPU, after checking it against its
        checksum; a checkpoint that is damaged or not sslcore's is a one-line :class:`UserError`."""
        checksum = path.parent / CHECKSUM_FILE
        if checksum.is_file():
            expected, _, size = checksum.read_text().strip().partition(" ")
            actual_size = path.stat().st_size if path.is_file() else -1
            if str(actual_size) != size:
                raise UserError(f"checkpoint {path} is damaged: {actual_size} bytes where {size} were written")
            if file_digest(path) != expected:
                raise UserError(f"checkpoint {path} is damaged: its content does not match its checksum")
        state = load_torch_file(path, "checkpoint {path} cannot be read ({reason})")
        if not isinstance(state, dict) or "model" not in state:
            raise UserError(f"{path} is not an sslcore checkpoint (no 'model' in it)")
        return state

    def resume_state(self, report: bool = True) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, and its state; each newer one that does not is
        reported in one warning line and left as it is (nothing in the run folder is changed). None: the run
        has no checkpoint. No usable checkpoint at all is a :class:`UserError`."""
        found = self.checkpoints()
        problems = []
        for path in reversed(found):
            try:
                state = self.load_checkpoint(path)
            except UserError as exc:
                problems.append(exc.lines[0])
                continue
            for problem in problems if report else []:
                logger.warning("%s; resuming from the checkpoint before it", problem)
            return path, state
        if problems:
            raise UserError(f"{self.path}: none of its {len(found)} checkpoints can be used ({'; '.join(problems)})"
                            f"; the run cannot be resumed: start it again under a new name (--set name=...)")
        return None

    def remove_partial_checkpoints(self) -> None:
        """Remove checkpoints that a stopped run left half written (never under a checkpoint name)."""
        for partial in self.path.glob(".checkpoint-*"):
            shutil.rmtree(partial, ignore_errors=True)

    # -- a stop request (SIGTERM) -----------------------------------------------------------------------

    @property
    def stop_file(self) -> Path:
        return self.path / self.STOP

    def request_stop(self, reason: str) -> None:
        """Ask the workers to checkpoint at the next step and return (they poll :meth:`stop_requested`)."""
        self.stop_file.write_text(reason)

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

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

    def truncate_metrics(self, records: int) -> None:
        """Keep the first ``records`` records of metrics.jsonl (what a checkpoint had seen): the steps after
        it are trained again, so a resumed run holds each step once."""
        if not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n")][:records]
        if len(kept) == len(lines):
            return
        temporary = self.path / f".{self.METRICS}.tmp"
        temporary.write_text("".join(kept))
        temporary.replace(self.metrics_file)

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
        try:
            return json.loads(path.read_text())["lines"] if path.is_file() else None
        except (OSError, ValueError, KeyError):
            return None

    def clear_error(self) -> None:
        (self.path / self.ERROR).unlink(missing_ok=True)

    def _write_json(self, name: str, payload: dict[str, Any]) -> None:
        # one temporary file per process: every worker that hits the same error writes the error file at once
        temporary = self.path / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(payload, indent=2))
        temporary.replace(self.path / name)
