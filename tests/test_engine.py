"""The engine end to end on real CIFAR-10 JPEGs: resume after a crash, export, NaN, Ray with 2 workers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sslcore.engine.rundir import RunDir

CLI = [sys.executable, "-m", "sslcore"]


def experiment(tmp_path: Path, subset: dict[str, Path], **overrides: object) -> Path:
    """A small MoCo experiment on the real-image subset; ``overrides`` replace top-level sections."""
    config = {
        "name": "unit",
        "output_dir": str(tmp_path / "runs"),
        "seed": 3,
        "method": {"name": "moco", "momentum": 0.99, "bn_splits": 2},
        "encoder": {"name": "resnet18", "cifar_stem": False},
        "augmentation": {"name": "moco_v2", "size": 32},
        "negatives": {"name": "queue", "size": 64},
        "data": {"name": "image_folder", "root": str(subset["train"])},
        "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 5, "log_every_steps": 1,
                  "optimizer": {"name": "sgd", "lr": 0.05}},
        "scaling": {"backend": "local"},
        "evaluators": [{"name": "knn", "k": 20, "every_epochs": 1,
                        "data": {"name": "image_folder", "root": str(subset["test"])}}],
        "tracking": {"aim": None, "progress_bar": False},
        "plugins": ["sslcore_moco.plugin"],
    }
    config.update(overrides)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "SSLCORE_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env(), capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path, epoch: int) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["subset"] == "train" and r["epoch"] == epoch]


BYOL = {"method": {"name": "byol", "projector_hidden_dim": 64, "dim": 32, "predictor_hidden_dim": 64,
                   "base_momentum": 0.9},
        "augmentation": {"name": "byol", "size": 32}, "negatives": None,
        "plugins": ["sslcore_byol.plugin"]}


def train_records(run_dir: Path, epoch: int) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["subset"] == "train" and r["epoch"] == epoch]


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_resume_after_a_crash_repeats_the_uninterrupted_run(tmp_path: Path, cifar10_subset: dict,
                                                            method: str) -> None:
    """Killed during epoch 2 and resumed, a run repeats the uninterrupted one bit for bit: MoCo's queue and
    key encoder, BYOL's target and its scheduled tau (a function of the restored step)."""
    overrides = BYOL if method == "byol" else {}
    (tmp_path / "a").mkdir()
    straight = experiment(tmp_path / "a", cifar10_subset, **overrides)
    out = run("run", str(straight))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = train_records(tmp_path / "a" / "runs" / "unit", epoch=1)
    assert len(expected) == 5

    (tmp_path / "b").mkdir()
    crashed = experiment(tmp_path / "b", cifar10_subset, **overrides)
    run_dir = tmp_path / "b" / "runs" / "unit"
    process = subprocess.Popen([*CLI, "run", str(crashed)], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not RunDir(run_dir).checkpoints():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # dies during epoch 2, as a crash or a lost machine would
    process.wait()
    assert len(RunDir(run_dir).checkpoints()) == 1, "epoch 2 finished before the kill; the test is void"

    out = run("run", "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    resumed = train_records(run_dir, epoch=1)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]  # same data, state and optimizer
    # the steps logged between the checkpoint and the kill were cut from metrics.jsonl: each step is there once
    assert [r["step"] for r in train_records(run_dir, 0) + resumed] == list(range(1, 11))
    assert [r["lr"] for r in resumed] == [r["lr"] for r in expected]
    if method == "byol":
        taus = [r["tau"] for r in resumed]
        assert taus == [r["tau"] for r in expected]
        # tau_k = 1 - (1 - 0.9)(cos(pi k / K) + 1) / 2 at the last step k of each window; K = 10 steps
        assert taus == [pytest.approx(1 - 0.1 * (math.cos(math.pi * k / 10) + 1) / 2) for k in range(5, 10)]


def test_run_refuses_to_overwrite_and_export_loads_into_plain_torchvision(
        tmp_path: Path, cifar10_subset: dict) -> None:
    test_set = {"name": "image_folder", "root": str(cifar10_subset["test"])}
    path = experiment(tmp_path, cifar10_subset, train={"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2},
                      evaluators=[{"name": "knn", "k": 20, "data": test_set},
                                  {"name": "knn", "k": 1, "data": test_set, "train_data": test_set}])
    out = run("run", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "unit"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["final"]["knn_top1"] <= 1.0
    assert summary["final"]["knn_top1@1"] == 1.0  # k=1 with the test set as memory: each image finds itself
    files = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "backbone.pt", "checkpoint_000000002"} <= files

    again = run("run", str(path))
    assert again.returncode == 2
    assert f"{run_dir} already holds a run: pass --resume" in again.stderr

    exported = tmp_path / "backbone.pt"
    out = run("export", str(run_dir), "-o", str(exported))
    assert out.returncode == 0, out.stderr[-3000:]
    check = textwrap.dedent(f"""
        import sys, torch, torchvision
        model = torchvision.models.resnet18()
        model.fc = torch.nn.Identity()
        model.load_state_dict(torch.load({str(exported)!r}, weights_only=True))
        final = torch.load({str(run_dir / 'backbone.pt')!r}, weights_only=True)
        assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
        assert not any(m.startswith("sslcore") for m in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path: Path, cifar10_subset: dict) -> None:
    path = experiment(tmp_path, cifar10_subset)
    out = run("run", str(path), "--set", "train.optimizer.lr=1.0e+30", "--set", "checkpoint.every_epochs=1")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "loss is nan" in line.lower() and "train.optimizer.lr" in line
    assert "Traceback" not in out.stderr


def test_corrupt_image_is_skipped_during_training(tmp_path: Path, cifar10_subset: dict) -> None:
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    for src in sorted((cifar10_subset["train"] / "airplane").iterdir())[:15] + sorted(
            (cifar10_subset["train"] / "bird").iterdir())[:8]:  # 23 real images and a broken one: 3 batches of 8
        (images / f"{src.parent.name}_{src.name}").symlink_to(src.resolve())
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    path = experiment(tmp_path, cifar10_subset, data={"name": "image_folder", "root": str(images.parent)},
                      evaluators=[], train={"epochs": 1, "batch_size": 8})
    out = run("run", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping unreadable image" in out.stderr and "broken.jpg" in out.stderr


def test_empty_data_folder_is_a_user_error(tmp_path: Path, cifar10_subset: dict) -> None:
    (tmp_path / "empty").mkdir()
    path = experiment(tmp_path, cifar10_subset, data={"name": "image_folder", "root": str(tmp_path / "empty")})
    out = run("run", str(path))
    assert out.returncode == 2
    assert "no images" in out.stderr and str(tmp_path / "empty") in out.stderr
    assert "Traceback" not in out.stderr


LAB_LOSS = """
from sslcore import hookimpl
from sslcore.components.losses import InfoNCEConfig, InfoNCELoss


@hookimpl
def register_losses(register):
    register("lab_info_nce", InfoNCELoss, config=InfoNCEConfig)
"""


@pytest.mark.ray
def test_ray_train_with_two_cpu_workers(tmp_path: Path, cifar10_subset: dict) -> None:
    # The loss comes from a module only the driver can import (sys.path, not PYTHONPATH, not installed):
    # the workers get it through Ray's py_modules.
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "tp_lab_loss.py").write_text(LAB_LOSS)
    path = experiment(tmp_path, cifar10_subset, scaling={"backend": "ray", "num_workers": 2},
                      method={"name": "moco", "momentum": 0.99, "shuffle_bn": "auto"},
                      loss={"name": "lab_info_nce", "temperature": 0.2},
                      plugins=["sslcore_moco.plugin", "tp_lab_loss"],
                      tracking={"aim": {"repo": "aim"}, "progress_bar": True})  # relative: to the user's folder
    driver = (f"import sys; sys.path.insert(0, {str(lab)!r}); from sslcore.commands.cli import main; "
              f"sys.exit(main(['run', {str(path)!r}]))")
    out = subprocess.run([sys.executable, "-c", driver], env=env(), capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    run_dir = tmp_path / "runs" / "unit"
    # the console a person reads: sslcore's lines, drawn by the driver; Ray's and aim's own in ray.log only
    shown = out.stdout.splitlines()
    assert shown[0] == f"sslcore: training on Ray Train (scaling.backend: ray); run folder {run_dir}"
    assert [line.split("  ")[0] for line in shown if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert shown[-1] == "  report       sslcore report runs/unit"
    chatter = ("RayTrainWorker", "TrainController", "core_worker", "RunStatusReporter", "writer thread",
               "TrainingReport")
    assert not [line for line in (out.stdout + out.stderr).splitlines() if any(c in line for c in chatter)]
    assert "RunStatusReporter" in (run_dir / "ray.log").read_text()  # aim's, from the worker's own output
    assert len(train_losses(run_dir, epoch=1)) == 5
    assert len(list(run_dir.glob("checkpoint_*/state.pt"))) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["startup_seconds"] > 0
    assert 0.0 <= summary["final"]["knn_top1"] <= 1.0
    # aim: the SDK reads tracked values back only after a reindex
    aim_bin = Path(sys.executable).with_name("aim")
    subprocess.run([str(aim_bin), "storage", "--repo", str(tmp_path / "aim"), "reindex", "-y"], check=True,
                   capture_output=True, timeout=120)
    import aim

    repo = aim.Repo(str(tmp_path / "aim"))
    (aim_run,) = list(repo.iter_runs())
    tracked = {(m.name, m.context.to_dict().get("subset")): m.values.values_list() for m in aim_run.metrics()}
    assert len(tracked[("loss", "train")]) == 10  # 5 steps x 2 epochs, logged every step
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [r["knn_top1"] for r in records if r["subset"] == "eval"]  # every epoch
    assert len(knn) == 2 and knn[-1] == summary["final"]["knn_top1"]
    assert sorted(tracked[("knn_top1", "eval")]) == pytest.approx(sorted(knn))


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it() -> None:
    import torch

    from sslcore.engine.loop import resolve_precision

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    native = "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, torch.device("cpu")) == explicit


def test_a_component_that_rejects_its_settings_is_a_one_line_error(tmp_path: Path, cifar10_subset: dict) -> None:
    path = experiment(tmp_path, cifar10_subset, negatives={"name": "queue", "size": 60})
    out = run("run", str(path))
    assert out.returncode == 2, out.stderr[-3000:]
    line = next(i + 1 for i, text in enumerate(path.read_text().splitlines()) if text.startswith("negatives:"))
    assert out.stderr.strip().splitlines() == [
        f"error: {path}:{line}: negatives: queue size 60 is not a multiple of the global batch size 16 "
        f"(train.batch_size): use 48 or 64"]


def test_compile_trains_and_keeps_checkpoint_names(tmp_path: Path, cifar10_subset: dict) -> None:
    import torch

    path = experiment(tmp_path, cifar10_subset, evaluators=[],
                      train={"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2, "log_every_steps": 1,
                             "optimizer": {"name": "sgd", "lr": 0.05}, "compile": True})
    out = run("run", str(path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "unit"
    losses = train_losses(run_dir, 0)
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    state = torch.load(next(run_dir.glob("checkpoint_*/state.pt")), weights_only=True)["model"]
    assert "backbone.conv1.weight" in state and not any("_orig_mod" in key for key in state)


def test_adamw_fp16_channels_last_constant_schedule(tmp_path: Path, cifar10_subset: dict) -> None:
    path = experiment(tmp_path, cifar10_subset, evaluators=[],
                      train={"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3, "log_every_steps": 1,
                             "optimizer": {"name": "adamw", "lr": 1.0e-3}, "precision": "fp16",
                             "channels_last": True, "schedule": "constant", "lr_scaling": "none"})
    out = run("run", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "unit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [1.0e-3] * 3
    assert all(0 < r["loss"] < 10 for r in records)


@pytest.mark.ray
def test_a_run_on_a_joined_cluster_resumes_on_a_new_one_from_the_run_folders_checkpoints(
        tmp_path: Path, cifar10_subset: dict) -> None:
    """``--address`` joins a running cluster; and nothing of Ray Train's is needed to resume: its bookkeeping
    lives only while a launch runs, so the run goes on from its folder on a cluster of its own once the one
    it trained on is stopped. (Joining and resuming share the first launch: each costs ~30 s on 2 cores.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cluster_env = {**env(), "RAY_AUTH_MODE": "disabled"}  # a private cluster on loopback, for this test only
    path = experiment(tmp_path, cifar10_subset, scaling={"backend": "ray", "num_workers": 1}, evaluators=[],
                      train={"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3, "log_every_steps": 1})
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                           env=cluster_env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        out = subprocess.run([*CLI, "run", str(path), "--address", f"127.0.0.1:{port}"], env=cluster_env,
                             capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=cluster_env, capture_output=True, timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert f":{port} (2 CPUs" in out.stdout  # the cluster started above, not a new local one
    run_dir = tmp_path / "runs" / "unit"
    assert (run_dir / "backbone.pt").is_file()
    assert not ray_train_bookkeeping(run_dir)
    out = run("run", "--resume", str(run_dir), "--set", "train.epochs=2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert f"resuming {run_dir} at epoch 2 (step 3)" in out.stdout
    assert f"127.0.0.1:{port}" not in out.stdout  # a cluster of its own
    assert not ray_train_bookkeeping(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6)]
    assert [p.parent.name for p in RunDir(run_dir).checkpoints()] == ["checkpoint_000000003", "checkpoint_000000006"]


def ray_train_bookkeeping(run_dir: Path) -> list[Path]:
    """What Ray Train keeps of a launch in the run folder (nothing, once the launch has ended)."""
    return [p for p in (run_dir / RunDir.RAY, *run_dir.rglob("checkpoint_manager_snapshot.json")) if p.exists()]


def test_a_run_whose_every_checkpoint_is_damaged_is_one_line_and_left_as_it_was(tmp_path: Path,
                                                                               cifar10_subset: dict) -> None:
    path = experiment(tmp_path, cifar10_subset, evaluators=[],
                      train={"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 1})
    out = run("run", str(path), "--set", "train.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "unit"
    (state,) = RunDir(run_dir).checkpoints()
    state.write_bytes(state.read_bytes()[:1000])  # a checkpoint cut short, as by a full disk
    before = folder_contents(run_dir)
    out = run("run", "--resume", str(run_dir), "--set", "train.epochs=2")
    assert out.returncode == 2
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert f"checkpoint {state} is damaged" in line and "cannot be resumed" in line
    assert "Traceback" not in out.stderr
    assert folder_contents(run_dir) == before


def folder_contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) by its relative path, with its content's digest."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
