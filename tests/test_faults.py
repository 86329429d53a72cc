"""Faults on both backends, with real processes, signals and Ray: a run that is stopped, killed or handed a
damaged checkpoint ends exactly as the uninterrupted run does, or says why in one line and changes nothing.

The reference is one uninterrupted local run (2 epochs of 5 steps); a Ray worker computes the same bits
(one worker, the same threads), so every faulty run, on either backend, is compared with it bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import env, experiment, folder_contents, run

from sslcore.engine.rundir import RunDir

CLI = [sys.executable, "-m", "sslcore"]
EXIT_PREEMPTED, EXIT_INTERRUPTED = 75, 130
TRAIN = {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 5, "log_every_steps": 1,
         "optimizer": {"name": "sgd", "lr": 0.05}}


def faulty_experiment(tmp_path: Path, subset: dict, backend: str = "local", **overrides: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("scaling", {"backend": backend, "num_workers": 1})
    return experiment(tmp_path, subset, evaluators=[], train=dict(TRAIN), **overrides)


def losses_by_step(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["subset"] == "train"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(cifar10_subset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: its loss at every step and its final backbone's digest."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run("run", str(faulty_experiment(tmp, cifar10_subset)))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp / "runs" / "unit"
    losses = losses_by_step(run_dir)
    assert [step for step, _ in losses] == list(range(1, 11))
    report("uninterrupted (local)", run_dir)
    return {"losses": losses, "backbone": digest(run_dir / "backbone.pt")}


def report(case: str, run_dir: Path) -> None:
    """What the note of a fault run quotes (with pytest -s): its last loss and its backbone's digest."""
    print(f"\n{case}: last loss {losses_by_step(run_dir)[-1][1]!r}, backbone.pt sha256 "
          f"{digest(run_dir / 'backbone.pt')[:16]}")


def start(path: Path, *args: str) -> subprocess.Popen:
    # SIGINT as a terminal gives it: a shell's background job (CI's, say) inherits it ignored, and Python
    # keeps an ignored SIGINT ignored
    return subprocess.Popen([*CLI, "run", str(path), *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a record of ``step`` (the run is then at step ``step + 1``)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and any(s >= step for s, _ in losses_by_step(run_dir))):
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended first: {out[-2000:]} {err[-3000:]}")
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def python_traceback_free(stderr: str) -> list[str]:
    """stderr's lines, checked to hold no Python traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.splitlines()


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_sigterm_checkpoints_inside_the_epoch_and_the_resumed_run_ends_as_the_uninterrupted_one(
        tmp_path: Path, cifar10_subset: dict, reference: dict, backend: str) -> None:
    path = faulty_experiment(tmp_path, cifar10_subset, backend)
    run_dir = tmp_path / "runs" / "unit"
    process = start(path)
    wait_for_step(process, run_dir, 6)  # in epoch 2
    process.send_signal(signal.SIGTERM)  # to the driver only, as SLURM or Kubernetes do
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    lines = python_traceback_free(stderr)
    assert f"continue with sslcore run --resume {run_dir}" in lines[-1]
    latest = RunDir(run_dir).latest_checkpoint()
    state = torch.load(latest, weights_only=True)
    assert state["epoch"] == 1 and 0 < state["batches"] < 5, "the run stopped at an epoch end; the test is void"
    assert not (run_dir / "backbone.pt").exists() and not (run_dir / RunDir.STOP).exists()

    # Resumed in-process on either backend: a Ray worker computes the local run's bits, so this proves the
    # checkpoint that the driver's SIGTERM left complete, without a second Ray launch (~30 s). A Ray worker
    # resuming from a checkpoint inside an epoch is the killed worker's test below; `run --resume` through Ray,
    # test_engine's test_a_run_on_a_joined_cluster_resumes_on_a_new_one_from_the_run_folders_checkpoints.
    out = run("run", "--resume", str(run_dir), "--set", "scaling.backend=local")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"resuming {run_dir} at epoch 2, batch {state['batches'] + 1} (step {state['step']})" in out.stdout
    report(f"SIGTERM at step {state['step']} and resumed ({backend})", run_dir)
    assert losses_by_step(run_dir) == reference["losses"]  # each step once, and the same bits
    assert digest(run_dir / "backbone.pt") == reference["backbone"]


@pytest.mark.ray
def test_a_killed_ray_worker_is_restarted_from_the_last_checkpoint_and_ends_as_the_uninterrupted_run(
        tmp_path: Path, cifar10_subset: dict, reference: dict) -> None:
    path = faulty_experiment(tmp_path, cifar10_subset, "ray", checkpoint={"every_steps": 2})
    run_dir = tmp_path / "runs" / "unit"
    process = start(path)
    wait_for_step(process, run_dir, 7)
    workers = ray_train_workers()
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)  # a lost process, as by the OOM killer or a failed machine
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (stdout + stderr)[-3000:]
    assert f"resuming {run_dir} at epoch 2, batch" in stdout  # from the checkpoint of step 6, or of 8
    report("Ray worker killed after step 7, restarted by Ray Train", run_dir)
    assert losses_by_step(run_dir) == reference["losses"]
    assert digest(run_dir / "backbone.pt") == reference["backbone"]


def ray_train_workers() -> list[int]:
    """The pids of the Ray Train worker processes on this machine (Ray names them in their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_damaged_latest_checkpoints_are_reported_and_the_last_good_one_resumes(
        tmp_path: Path, cifar10_subset: dict, reference: dict) -> None:
    """A checkpoint cut short and one with a changed byte (found by its checksum) are each one warning line;
    the run goes on from the one before them, and ends as the uninterrupted run."""
    path = faulty_experiment(tmp_path, cifar10_subset, checkpoint={"every_steps": 2, "keep": 3})
    out = run("run", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "unit"
    oldest, middle, latest = RunDir(run_dir).checkpoints()
    assert [p.parent.name for p in (oldest, middle, latest)] == [f"checkpoint_{s:09d}" for s in (6, 8, 10)]
    latest.write_bytes(latest.read_bytes()[:5000])
    flipped = bytearray(middle.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    middle.write_bytes(bytes(flipped))

    out = run("run", "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in python_traceback_free(out.stderr) if "checkpoint" in line]
    assert len(warnings) == 2 and f"{latest} is damaged" in warnings[0] and f"{middle} is damaged" in warnings[1]
    assert f"resuming {run_dir} at epoch 2, batch 2 (step 6)" in out.stdout
    assert losses_by_step(run_dir) == reference["losses"]
    assert digest(run_dir / "backbone.pt") == reference["backbone"]


def test_a_resume_that_fails_leaves_the_run_folder_as_it_was(tmp_path: Path, cifar10_subset: dict) -> None:
    path = faulty_experiment(tmp_path, cifar10_subset)
    assert run("run", str(path), "--set", "train.epochs=1").returncode == 0
    run_dir = tmp_path / "runs" / "unit"
    before = folder_contents(run_dir)
    out = run("run", "--resume", str(run_dir), "--set", "train.epochs=2", "--set", "data.max_per_class=4")
    assert out.returncode == 2
    (line,) = [x for x in python_traceback_free(out.stderr) if x.startswith("error:")]
    assert "was trained on 200 images and the data block now gives 40" in line
    assert folder_contents(run_dir) == before  # config.yaml, metrics.jsonl and the checkpoint untouched


@pytest.fixture
def another_ray_instance() -> subprocess.Popen:
    """A Ray instance of someone else's on the same machine, for the length of a test."""
    code = "import ray, sys, time; ray.init(include_dashboard=False); print('up', flush=True); time.sleep(600)"
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, start_new_session=True)
    assert other.stdout.readline().strip() == "up"
    yield other
    os.killpg(other.pid, signal.SIGTERM)
    other.wait(timeout=60)


@pytest.mark.ray
# The two paths of a worker's user error: a single worker returns, one of several raises. The single worker
# runs beside another Ray instance, which asks more of it and nothing less (the same assertions, one cluster
# more): a case of 1 worker alone would cost another Ray launch (~40 s on 2 cores) and prove nothing more.
@pytest.mark.parametrize("workers", [2, "1, beside another Ray instance"])
def test_a_nan_loss_on_ray_is_one_line_and_not_retried(tmp_path: Path, cifar10_subset: dict, workers: int | str,
                                                        request: pytest.FixtureRequest) -> None:
    if isinstance(workers, str):  # Ray Train's helpers must find this run's cluster, not fail on two
        request.getfixturevalue("another_ray_instance")
    count = workers if isinstance(workers, int) else 1
    path = faulty_experiment(tmp_path, cifar10_subset, scaling={"backend": "ray", "num_workers": count})
    started = time.monotonic()
    out = run("run", str(path), "--set", "train.optimizer.lr=1.0e+30")
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    lines = python_traceback_free(out.stderr)
    (error,) = [x for x in lines if x.startswith("error:")]
    assert "loss is nan" in error and "train.optimizer.lr" in error
    # besides it, at most Ray's own C++ notices (core_worker.cc)
    assert all(x == error or ".cc:" in x for x in lines), lines
    if count > 1:  # the worker raised, so that the other is not left in a collective: Ray's traceback is kept
        log = (tmp_path / "runs" / "unit" / RunDir.RAY_LOG).read_text()
        assert "loss is nan" in log and "Traceback" in log
    assert not (tmp_path / "runs" / "unit" / RunDir.ERROR).exists()
    print(f"NaN on {workers} Ray worker(s): exit 2 after {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_ctrl_c_stops_at_once_with_one_line_and_leaves_no_process(tmp_path: Path, cifar10_subset: dict,
                                                                 backend: str) -> None:
    path = faulty_experiment(tmp_path, cifar10_subset, backend)
    run_dir = tmp_path / "runs" / "unit"
    process = start(path, "--set", "train.epochs=50")
    wait_for_step(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C at a terminal: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    lines = [x for x in python_traceback_free(stderr) if ".cc:" not in x]
    assert lines == ["interrupted: the checkpoints written before are kept; continue with sslcore run --resume "
                     "RUN_DIR"], stderr
    deadline = time.monotonic() + 30
    while (left := processes_of_session(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def processes_of_session(session: int) -> list[str]:
    """The command lines of the processes still in the session of ``session`` (Ray's included)."""
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session:  # the session id, after state, ppid and pgrp
                    left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
            except (OSError, IndexError, ValueError):
                continue
    return left
