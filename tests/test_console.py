"""What a person sees: the backend `auto` chooses (and says), one progress bar at a terminal, one line per epoch
in a log, no Ray or aim chatter, a final summary; and the defaults that follow the images' size."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sslcore.config import load_experiment, resolve
from sslcore.engine.console import Console, ConsoleFile, ConsoleTail, duration, final_summary
from sslcore.engine.launch import choose_backend
from sslcore.registry import Registry

CLI = [sys.executable, "-m", "sslcore"]


def resolved(registry: Registry, root: Path, **scaling: object):
    return resolve({"method": "moco", "data": {"name": "image_folder", "root": str(root)},
                    "train": {"batch_size": 256}, "scaling": scaling}, registry)


def test_auto_trains_one_worker_in_this_process_and_more_or_a_cluster_on_ray(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.add_module("sslcore_moco.plugin")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_backend(resolved(registry, tmp_path), None)[0] == "local"  # auto is the default
    assert choose_backend(resolved(registry, tmp_path, num_workers=2), None) == (
        "ray", "scaling.backend auto: 2 workers")
    assert choose_backend(resolved(registry, tmp_path), "10.0.0.1:6379") == (
        "ray", "scaling.backend auto: the Ray cluster at 10.0.0.1:6379")
    assert choose_backend(resolved(registry, tmp_path, backend="ray"), None)[0] == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert choose_backend(resolved(registry, tmp_path), None)[0] == "ray"
    assert choose_backend(resolved(registry, tmp_path, backend="local"), None)[0] == "local"


def test_the_console_file_is_drawn_by_the_tail_as_in_process(tmp_path: Path) -> None:
    """The Ray path's worker side and driver side: lines in order, warnings to stderr, the bar's last position;
    a line half written waits for its end, and what an earlier launch wrote is not drawn again."""
    path = tmp_path / "console.jsonl"
    path.write_text(json.dumps({"line": "from the launch before", "err": False}) + "\n")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as out_file, open(err, "w") as err_file:
        console = Console(interactive=True, out=out_file, err=err_file)
        tail = ConsoleTail(path, console, poll=0.01)
        tail.start()
        writer = ConsoleFile(path, every=0.0)
        writer.line("epoch 1/2  loss 4.8")
        writer.line("WARNING sslcore.data: skipping unreadable image x.jpg", err=True)
        for step in range(1, 5):
            writer.progress(step, 4, f"epoch 2/2 loss 4.{step}")
        with open(path, "a") as file:
            file.write('{"line": "half')
        time.sleep(0.1)
        with open(path, "a") as file:
            file.write(' and the rest", "err": false}\n')
        tail.stop()
    shown = out.read_text()
    assert "from the launch before" not in shown
    assert shown.index("epoch 1/2  loss 4.8") < shown.index("half and the rest")
    assert "epoch 2/2 loss 4.4" in shown and "4/4" in shown
    assert err.read_text() == "WARNING sslcore.data: skipping unreadable image x.jpg\n"


def test_durations_read_as_a_person_says_them() -> None:
    assert [duration(s) for s in (38.24, 292, 3780)] == ["38.2 s", "4 min 52 s", "1 h 3 min"]


def quick_experiment(tmp_path: Path, subset: dict[str, Path], **overrides: object) -> Path:
    config = {"name": "console", "output_dir": "runs", "method": {"name": "moco", "momentum": 0.99},
              "encoder": {"name": "resnet18", "cifar_stem": False}, "augmentation": {"name": "moco_v2", "size": 32},
              "negatives": {"name": "in_batch"},
              "data": {"name": "image_folder", "root": str(subset["train"])},
              "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 3, "eval_at_start": True},
              "evaluators": [{"name": "knn", "k": 20, "every_epochs": 1,
                              "data": {"name": "image_folder", "root": str(subset["test"])}}],
              "tracking": {"aim": {"repo": "runs/.aim"}}, "plugins": ["sslcore_moco.plugin"], **overrides}
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_at_a_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """``sslcore ARGS`` with its stdout and stderr on a pseudo-terminal, as a person at a terminal runs it."""
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a terminal's 40 x 150
    env = {**os.environ, "SSLCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    process = subprocess.Popen([*CLI, *args], stdout=secondary, stderr=secondary, cwd=cwd, env=env)
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(primary)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_at_a_terminal_one_bar_and_a_summary_a_person_reads(tmp_path: Path, cifar10_subset: dict) -> None:
    path = quick_experiment(tmp_path, cifar10_subset)
    code, shown = run_at_a_terminal(["run", str(path)], tmp_path)
    assert code == 0, shown[-3000:]
    lines = [line.strip() for line in shown.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0].startswith("sslcore: training in this process (scaling.backend auto: one worker on this "
                               "machine; scaling.backend: ray for Ray Train); run folder ")
    bars = [line for line in lines if line.startswith("epoch ") and "|" in line]
    assert bars and all("/6 [" in bar for bar in bars), bars  # the steps done of all, the time taken and left
    assert any(bar.startswith("epoch 2/2 loss ") and " img/s |" in bar for bar in bars), bars
    epochs = [line for line in lines if line.startswith("epoch ") and "|" not in line]
    assert [line.split("  ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "knn_top1" in epochs[-1] and " img/s  " in epochs[-1]
    summary = lines[lines.index(next(line for line in lines if line.startswith("sslcore: trained console in "))):]
    assert summary[1].startswith("knn_top1") and "before training" in summary[1] and "after" in summary[1]
    assert summary[-3:] == ["run folder   runs/console (config.yaml, checkpoints, metrics.jsonl, backbone.pt)",
                            "curves       aim up --repo runs/.aim", "report       sslcore report runs/console"]
    assert not any("aim.sdk" in line or "writer thread" in line or "RunStatusReporter" in line for line in lines)
    record = json.loads((tmp_path / "runs" / "console" / "summary.json").read_text())
    assert record["backend"] == "local"


def write_images(folder: Path, side: int, count: int = 4) -> None:
    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)).save(folder / "a" / f"{i}.png")


def fitted(tmp_path: Path, registry: Registry, side: int, text: str) -> tuple[dict, dict]:
    write_images(tmp_path / f"images{side}", side)
    path = tmp_path / "experiment.yaml"
    path.write_text(text.format(root=tmp_path / f"images{side}"))
    result = load_experiment(path, registry)
    return result.fitted, result.as_dict()


@pytest.mark.parametrize("side", [28, 32])
def test_left_out_sizes_and_stems_follow_small_images(tmp_path: Path, registry: Registry, side: int) -> None:
    registry.add_module("sslcore_moco.plugin")
    chosen, experiment = fitted(tmp_path, registry, side, "method: moco\ndata: {{name: image_folder, root: {root}}}\n")
    assert chosen == {"encoder.cifar_stem": True, "augmentation.size": side}
    assert experiment["encoder"]["cifar_stem"] and experiment["augmentation"]["size"] == side
    assert experiment["encoder"]["name"] == "resnet50"  # the recipe's encoder, with the stem of small images


def test_what_the_experiment_gives_is_kept_and_large_images_keep_the_recipe(tmp_path: Path,
                                                                              registry: Registry) -> None:
    registry.add_module("sslcore_moco.plugin")
    chosen, experiment = fitted(tmp_path, registry, 32, "method: moco\nencoder: {{name: resnet18, cifar_stem: false}}\n"
                                                        "data: {{name: image_folder, root: {root}}}\n")
    assert chosen == {"augmentation.size": 32} and experiment["encoder"]["cifar_stem"] is False
    chosen, experiment = fitted(tmp_path, registry, 256, "method: moco\ndata: {{name: image_folder, root: {root}}}\n")
    assert chosen == {} and experiment["augmentation"]["size"] == 224 and not experiment["encoder"]["cifar_stem"]


def test_a_vit_takes_the_images_side_in_4_px_patches_and_the_views_follow(tmp_path: Path,
                                                                          registry: Registry) -> None:
    registry.add_module("sslcore_moco.plugin")
    chosen, experiment = fitted(tmp_path, registry, 30, "method: moco\nencoder: vit_tiny\n"
                                                        "data: {{name: image_folder, root: {root}}}\n")
    # vit_tiny's own 32 px: 30 px images make 28 px = 7 x 7 patches of 4 px, and the views follow the ViT
    assert chosen == {"encoder.image_size": 28, "encoder.patch_size": 4, "augmentation.size": 28}
    assert (experiment["encoder"]["image_size"], experiment["augmentation"]["size"]) == (28, 28)
    chosen, _ = fitted(tmp_path / "b", registry, 30, "method: moco\nencoder: {{name: vit_tiny, image_size: 224, "
                                                      "patch_size: 16}}\ndata: {{name: image_folder, root: {root}}}\n")
    assert chosen == {"augmentation.size": 30}  # the file gives the ViT's sizes: kept


def test_final_summary_names_the_run_folder_the_aim_command_and_the_report(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "initial": {"knn_top1": 0.303}, "final": {"epoch": 14, "step": 585, "loss": 4.2, "img_per_s": 331.0,
                                                   "epoch_seconds": 15.0, "knn_top1": 0.381}}))
    monkeypatch.chdir(tmp_path)
    experiment = {"name": "x", "output_dir": "runs", "train": {"epochs": 15}, "tracking": {"aim": {"repo": None}}}
    assert final_summary(run, experiment, 292.0) == [
        "sslcore: trained x in 4 min 52 s: 15 epochs, 585 steps, 331 img/s in the last epoch, final loss 4.2000",
        "  knn_top1     0.303 before training, 0.381 after (+0.078)",
        "  run folder   runs/x (config.yaml, checkpoints, metrics.jsonl, backbone.pt)",
        "  curves       aim up --repo runs/.aim",
        "  report       sslcore report runs/x"]
