"""Rank 0's record of a run: metrics.jsonl in the run folder, and aim."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

HISTOGRAM_BINS = 32


class Tracker:
    """Writes metrics to the run's metrics.jsonl and, when configured, to an aim run.

    ``run_hash`` continues the aim run of an interrupted training (it is stored in checkpoints);
    ``records`` counts the records metrics.jsonl holds (a checkpoint keeps the count, and a resume cuts the
    file back to it).
    """

    def __init__(self, metrics_file: Path, name: str, aim_repo: str | None, aim_experiment: str | None,
                 hparams: dict[str, Any], run_hash: str | None = None) -> None:
        self.records = len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0
        self.metrics_file = open(metrics_file, "a")  # noqa: SIM115 — closed in close()
        self.aim_run = None
        if aim_repo is not None:
            import aim

            Path(aim_repo).mkdir(parents=True, exist_ok=True)
            repo = aim.Repo.from_path(aim_repo, init=True)
            # no system metrics (aim's thread samples CPU, memory and disk every 10 s otherwise): a run's
            # curves are its own
            self.aim_run = aim.Run(run_hash=run_hash, repo=repo, experiment=aim_experiment or name,
                                   log_system_params=False, capture_terminal_logs=False,
                                   system_tracking_interval=None)
            if run_hash is None:
                self.aim_run["hparams"] = hparams
                self.aim_run.name = name

    @property
    def run_hash(self) -> str | None:
        return self.aim_run.hash if self.aim_run is not None else None

    def log(self, metrics: dict[str, Any], step: int, epoch: int, subset: str) -> None:
        """Record ``metrics`` at a global ``step``; ``subset`` is "train", "eval" or "epoch_start".

        A value is a float, or a 1-D tensor of samples (cluster sizes, say): a distribution, kept in
        metrics.jsonl as a histogram ``{"bin_edges": [...], "counts": [...]}`` and in aim as a Distribution;
        or a PIL image, tracked by aim as an Image and left out of metrics.jsonl (whoever made it writes
        the PNG to the run folder).
        """
        from PIL import Image

        images = {k for k, v in metrics.items() if isinstance(v, Image.Image)}
        distributions = {k: v.detach().cpu().double().numpy() for k, v in metrics.items()
                         if isinstance(v, torch.Tensor)}
        record = {"subset": subset, "epoch": epoch, "step": step,
                  **{k: v for k, v in metrics.items() if k not in images}}
        for key, samples in distributions.items():
            counts, edges = np.histogram(samples, bins=HISTOGRAM_BINS)
            record[key] = {"bin_edges": edges.tolist(), "counts": counts.tolist()}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        self.records += 1
        if self.aim_run is not None:
            import aim

            for key, value in metrics.items():
                if key in distributions:
                    value = aim.Distribution(samples=distributions[key], bin_count=HISTOGRAM_BINS)
                elif key in images:
                    value = aim.Image(value)
                self.aim_run.track(value, name=key, step=step, epoch=epoch, context={"subset": subset})

    def close(self) -> None:
        self.metrics_file.close()
        if self.aim_run is not None:
            self.aim_run.close()

