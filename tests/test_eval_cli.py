"""``sslcore eval`` and ``sslcore report`` end to end: a small real run, evaluated trained and untrained,
from its folder and from an exported backbone, then read back as report.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sslcore.testing import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def trained_run(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sslcore.testing import run_example_briefly

    tmp_path = tmp_path_factory.mktemp("eval_cli")
    test_set = {"name": "image_folder", "root": str(cifar10_dir / "test"), "max_per_class": 5}
    evaluators = [{"name": "knn", "k": 20, "every_epochs": 0, "data": test_set},  # the fast probe as a monitor
                  {"name": "linear_probe", "every_epochs": 1, "weight_decays": [1e-3], "data": test_set}]
    run_dir = run_example_briefly(EXAMPLES / "quickstart.yaml", cifar10_dir, tmp_path, "train.epochs=2",
                                  "train.eval_at_start=true", "data.max_per_class=20",
                                  f"evaluators={json.dumps(evaluators)}")
    monitored = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in monitored if "linear_fast_top1" in r] == [-1, 0, 1]  # start, every epoch
    return run_dir


def eval_cli(*args: str, cwd: Path):
    return run_cli("eval", *args, cwd=cwd)


def test_eval_a_run_trained_and_at_random_init_then_report(trained_run: Path) -> None:
    small = ["--set", "low_shot_svm.shots=[1,2]", "--set", "low_shot_svm.draws=2",
             "--set", "finetune.fractions=[0.1]", "--set", "finetune.epochs=1",
             "--set", "linear_probe.weight_decays=[0.001]"]
    names = ["-e", "linear_probe", "-e", "low_shot_svm", "-e", "finetune", "-e", "clustering_quality"]
    out = eval_cli(str(trained_run), *names, *small, cwd=trained_run.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    trained = json.loads(out.stdout.split("sslcore: eval ", 1)[1])
    assert set(trained) == {"linear_probe", "low_shot_svm", "finetune", "clustering_quality"}
    assert 0 <= trained["linear_probe"]["linear_fast_top1"] <= 1
    assert set(trained["low_shot_svm"]) == {f"svm_k{k}_{m}{s}" for k in (1, 2) for m in ("top1", "map")
                                            for s in ("", "_std")}
    assert trained["finetune"]["finetune_10pct_images"] == 20  # 10% of 200 training images, 2 per class
    assert -1 <= trained["clustering_quality"]["ami"] <= 1

    floor = eval_cli(str(trained_run), *names, *small, "--random-init", cwd=trained_run.parent)
    assert floor.returncode == 0, floor.stderr[-3000:]
    recorded = json.loads((trained_run / "evaluations.json").read_text())
    assert set(recorded) == {*trained, *(f"{name}@random_init" for name in trained)}
    assert recorded["linear_probe"]["epoch"] == 1 and recorded["linear_probe@random_init"]["epoch"] == -1
    assert recorded["linear_probe"]["evaluator"]["data"]["max_per_class"] == 5  # the run's kNN test set

    out = run_cli("report", str(trained_run), cwd=trained_run.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (trained_run / "report.md").read_text()
    assert "![training curves](report/train.png)" in report and (trained_run / "report" / "train.png").is_file()
    assert "![evaluation curves](report/eval.png)" in report
    assert "| knn_top1 |" in report  # before training and final, from summary.json
    svm_row = next(line for line in report.splitlines() if line.startswith("| 2 |"))
    assert svm_row.count("±") == 4  # top-1 and mAP, trained and random init
    assert "name: quickstart" in report  # the experiment


def test_eval_an_exported_backbone(trained_run: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported" / "backbone.pt"
    out = run_cli("export", str(trained_run), "-o", str(exported), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert exported.with_suffix(".yaml").is_file()  # the experiment travels with the weights
    out = eval_cli(str(exported), "-e", "knn", "--set", "k=5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    from_file = json.loads(out.stdout.split("sslcore: eval ", 1)[1])["knn"]
    out = eval_cli(str(trained_run), "-e", "knn", "--set", "k=5", "-o", str(tmp_path / "again"), cwd=tmp_path)
    assert json.loads(out.stdout.split("sslcore: eval ", 1)[1])["knn"] == from_file  # the same weights
    assert json.loads((exported.parent / "evaluations.json").read_text())["knn"]["evaluator"]["k"] == 5


@pytest.mark.parametrize(("args", "message"), [
    (["-e", "linear_prob"], "unknown evaluator 'linear_prob'"),
    (["-e", "low_shot_svm", "--set", "shot=[1]"], "unknown key 'shot'"),
    (["-e", "knn", "--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: no such file"),
])
def test_eval_user_errors_are_one_line(trained_run: Path, args: list[str], message: str) -> None:
    out = eval_cli(str(trained_run), *args, cwd=trained_run.parent)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr


def test_eval_of_a_missing_target_or_foreign_weights(tmp_path: Path, trained_run: Path) -> None:
    out = eval_cli(str(tmp_path / "nothing"), "-e", "knn", cwd=tmp_path)
    assert out.returncode == 2 and "no such run folder or weights file" in out.stderr
    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, foreign)
    out = eval_cli(str(foreign), "-e", "knn", "--config", str(trained_run / "config.yaml"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not fit the experiment's encoder" in out.stderr and "Traceback" not in out.stderr
