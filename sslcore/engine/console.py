"""What a person sees of a run: sslcore's own lines and one progress bar, the same on both backends.

In-process, the training loop draws on this terminal through a :class:`Console`. On Ray, rank 0 writes the
same lines and bar positions to the run folder's ``console.jsonl`` (:class:`ConsoleFile`), and the driver's
:class:`ConsoleTail` draws them here; Ray's own output (its workers' stdout and stderr, Ray Train's and aim's
log lines) then goes to the run's ``ray.log`` only, and to the console too with ``--verbose``.

At a terminal the bar shows the epoch, the loss, img/s and tqdm's ETA; in a log (stdout not a terminal) there
is no bar, and each epoch is one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol, TextIO


class Lines(Protocol):
    """Where the loop's lines and bar positions go."""

    def line(self, text: str, err: bool = False) -> None:
        """One line for the person (``err``: a warning, on stderr)."""

    def progress(self, done: int, total: int, description: str) -> None:
        """``done`` of ``total`` steps; ``description``: the epoch, loss and rate."""

    def close(self) -> None: ...


class Console:
    """Lines and one tqdm bar on this process's terminal; no bar unless ``interactive``."""

    def __init__(self, interactive: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.interactive = interactive
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.bar: Any = None

    def line(self, text: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        if self.bar is not None:
            self.bar.write(text, file=stream)  # above the bar, which is drawn again below it
        else:
            print(text, file=stream, flush=True)

    def progress(self, done: int, total: int, description: str) -> None:
        if not self.interactive:
            return
        if self.bar is None or self.bar.total != total:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, file=self.out,
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self.bar.set_description_str(description, refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleFile:
    """The worker side on Ray: each line and (at most every ``every`` seconds) the bar's position, appended as a
    JSON line to ``path``. Lines are short single writes to a file opened for appending, so those of several
    workers (their warnings) do not interleave."""

    def __init__(self, path: Path, every: float = 0.25) -> None:
        self.path, self.every = path, every
        self._last = 0.0

    def _write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(event) + "\n")

    def line(self, text: str, err: bool = False) -> None:
        self._write({"line": text, "err": err})

    def progress(self, done: int, total: int, description: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.every or done == total:
            self._last = now
            self._write({"done": done, "total": total, "description": description})

    def close(self) -> None:
        self._last = 0.0


class ConsoleTail(threading.Thread):
    """The driver side on Ray: draws what the workers append to ``path`` on ``console`` until :meth:`stop`,
    which draws the rest."""

    def __init__(self, path: Path, console: Console, poll: float = 0.1) -> None:
        super().__init__(name="sslcore-console", daemon=True)
        self.path, self.console, self.poll = path, console, poll
        self._offset = path.stat().st_size if path.is_file() else 0  # what earlier launches wrote was drawn then
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.poll):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path) as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete.encode())
        for raw in complete.splitlines():
            event = json.loads(raw)
            if "line" in event:
                self.console.line(event["line"], err=event["err"])
            else:
                self.console.progress(event["done"], event["total"], event["description"])

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()
        self._drain()
        self.console.close()


class LinesHandler(logging.Handler):
    """sslcore's warnings (a skipped image, a damaged checkpoint) of a Ray worker, sent to the console as the
    driver prints its own."""

    def __init__(self, lines: Lines) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):  # the run folder went away: the record is still in Ray's worker log
            self.lines.line(self.format(record), err=True)


def duration(seconds: float) -> str:
    """``4 min 52 s``, ``38.2 s``, ``1 h 3 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def final_summary(run_dir: Path, experiment: dict[str, Any], seconds: float) -> list[str]:
    """The lines that end a run: what it trained, its evaluations before and after training, and where its
    folder, its curves (aim) and its report are."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    final, initial = summary.get("final", {}), summary.get("initial", {})
    here = Path.cwd()

    def shown(path: Path) -> str:
        return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)

    lines = [f"sslcore: trained {experiment['name']} in {duration(seconds)}: {experiment['train']['epochs']} epochs, "
             f"{final.get('step', 0)} steps, {final.get('img_per_s', 0):.0f} img/s in the last epoch, "
             f"final loss {final.get('loss', float('nan')):.4f}"]
    evaluated = [k for k in final if k not in ("epoch", "step", "loss", "img_per_s", "epoch_seconds", "lr")
                 and isinstance(final[k], float) and (k in initial or k.startswith(("knn", "linear", "probe")))]
    for key in evaluated:
        if key in initial:
            lines.append(f"  {key:<12} {initial[key]:.4g} before training, {final[key]:.4g} after "
                         f"({final[key] - initial[key]:+.4g})")
        else:
            lines.append(f"  {key:<12} {final[key]:.4g}")
    lines.append(f"  {'run folder':<12} {shown(run_dir)} (config.yaml, checkpoints, metrics.jsonl, backbone.pt)")
    aim = experiment["tracking"]["aim"]
    if aim is not None:
        repo = Path(aim["repo"] or Path(experiment["output_dir"]) / ".aim").expanduser().resolve()
        lines.append(f"  {'curves':<12} aim up --repo {shown(repo)}")
    lines.append(f"  {'report':<12} sslcore report {shown(run_dir)}")
    return lines
