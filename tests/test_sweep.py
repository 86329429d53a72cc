"""``sslcore sweep`` on a real Ray Tune: ASHA stops a trial that is behind, Ctrl-C (a real SIGINT to the real
command) stops the sweep with Tune's state saved, and ``--resume`` finishes it, each unfinished trial resuming
from its run folder's checkpoint; the table, the curves and the best experiment come out at the end.

The search space is built so that ASHA must stop the second trial: the trials differ in the batch size only,
with MoCo's in-batch negatives and an InfoNCE temperature of 10. The logits then lie in [-0.1, 0.1], so the
loss is within 0.2 of log(batch size) whatever the features are: within [2.57, 2.97] for a batch of 16, within
[3.96, 4.36] for 64. With one trial at a time the first reaches the rung first, and the second, behind it
there, is stopped."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_engine import env

from sslcore.commands.cli import main
from sslcore.commands.sweep import rungs

CLI = [sys.executable, "-m", "sslcore"]


def sweep_experiment(tmp_path: Path, subset: dict[str, Path], **overrides: object) -> Path:
    config = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "method": {"name": "moco", "momentum": 0.99},
        "encoder": {"name": "resnet18", "cifar_stem": False},
        "augmentation": {"name": "moco_v2", "size": 32},
        "negatives": {"name": "in_batch"},
        "loss": {"name": "info_nce", "temperature": 10.0},
        "data": {"name": "image_folder", "root": str(subset["train"])},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 1.0e-6}, "warmup_epochs": 0},
        "checkpoint": {"every_epochs": 1},
        "tracking": {"aim": None},
        "plugins": ["sslcore_moco.plugin"],
        "sweep": {"params": {"train.batch_size": [16, 64]}, "metric": "loss", "mode": "min",
                  "max_concurrent": 1, "grace_epochs": 1, "reduction_factor": 2},
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.ray
def test_asha_stops_a_trial_and_an_interrupted_sweep_resumes(cifar10_subset: dict, tmp_path: Path) -> None:
    file = sweep_experiment(tmp_path, cifar10_subset)
    folder = tmp_path / "runs" / "tiny-sweep"
    first_trial = folder / "trials" / "trial_00000"
    process = subprocess.Popen([*CLI, "sweep", str(file)], env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(first_trial.glob("checkpoint_*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)  # Ctrl-C, after the first trial's first checkpoint
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert f"sslcore: sweep interrupted with 2 of 2 trials unfinished; continue with sslcore sweep --resume {folder}" \
           in err, err
    assert not (first_trial / "backbone.pt").exists()  # it was stopped in the middle

    resumed = subprocess.run([*CLI, "sweep", "--resume", str(folder)], env=env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "sslcore: resuming the sweep in" in resumed.stdout
    # the interrupted trial went on from its last checkpoint, not from the start
    console = [json.loads(line)["line"] for line in (first_trial / "console.jsonl").read_text().splitlines()]
    assert any(line.startswith(f"sslcore: resuming {first_trial} at epoch ") for line in console), console
    assert (first_trial / "backbone.pt").is_file()

    table = (folder / "trials.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| trial_")}
    assert rows["trial_00000"][1] == "16" and rows["trial_00000"][3:5] == ["3/3", "done |"], table
    assert rows["trial_00001"][1] == "64" and rows["trial_00001"][4] == "stopped early |", table
    assert math.log(16) - 0.2 < float(rows["trial_00000"][2]) < math.log(16) + 0.2, table
    assert math.log(64) - 0.2 < float(rows["trial_00001"][2]) < math.log(64) + 0.2, table
    assert "sslcore: 2 trials, 1 stopped early, 0 failed" in resumed.stdout
    assert (folder / "metric.png").stat().st_size > 10_000

    best = folder / "best.yaml"
    experiment = yaml.safe_load(best.read_text())
    assert experiment["train"]["batch_size"] == 16 and "sweep" not in experiment and experiment["name"] == "tiny-best"
    validated = subprocess.run([*CLI, "validate", str(best)], env=env(), capture_output=True, text=True, timeout=120)
    assert validated.returncode == 0, validated.stderr
    # each trial is a run like any other: its folder says what it trained
    config = yaml.safe_load((first_trial / "config.yaml").read_text())
    assert config["train"]["batch_size"] == 16 and config["sweep"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--param", "loss.temperature=loguniform(0,1)"], "loguniform needs lo > 0"),
    (["--param", "loss.temprature=[0.1,0.2]"], "unknown key 'temprature' — did you mean 'temperature'?"),
    (["--param", "train.optimizer.lr=[0.1,0]"], "sweep.params.train.optimizer.lr = 0 (grid): "),
    (["--param", "loss.temperature=0.1"], "'0.1' is not a search space; give [a, b, c]"),
    (["--set", "sweep.params={}"], "nothing to search"),
    (["--set", "scaling.num_workers=2"], "scaling.num_workers: sslcore sweep trains each trial in one process"),
    (["--metric", "knn_top1", "--mode", "max"], "'knn_top1' comes from the knn evaluator, which the experiment "
                                                "has not"),
])
def test_a_sweep_that_cannot_run_is_one_line_before_ray_starts(cifar10_subset: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture, args: list[str],
                                                              message: str) -> None:
    file = sweep_experiment(tmp_path, cifar10_subset)
    if args[0] == "--param":
        data = yaml.safe_load(file.read_text())
        data["sweep"]["params"] = {}
        file.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(file), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_folder_without_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no sweep.json there" in capsys.readouterr().err


@pytest.mark.parametrize(("grace", "factor", "epochs"), [(1, 2, 4), (5, 2, 15), (1, 3, 27), (2, 2, 2)])
def test_the_rungs_printed_are_ashas(grace: int, factor: float, epochs: int) -> None:
    from ray.tune.schedulers.async_hyperband import _Bracket

    milestones = sorted(m for m, _ in _Bracket(grace, epochs, factor, 0)._rungs if m < epochs)
    assert rungs(grace, factor, epochs) == milestones
