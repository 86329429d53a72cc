"""CONTRIBUTING.md's 30-line loss plugin, taken from the page as written: it meets the loss contract, trains
MoCo for two steps from the command line without touching sslcore/, and validate keeps it out of a slot
that needs a paired loss; and the page's tests of it (its "Testing a plugin" block) pass."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from sslcore.registry import Registry
from sslcore.testing import check_component, run_cli

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def loss_plugin(tmp_path: Path) -> Path:
    """The first Python block of CONTRIBUTING.md, as the module my_lab_losses under ``tmp_path``."""
    code = re.search(r"```python\n(.*?)```", CONTRIBUTING.read_text(), re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 32
    package = tmp_path / "my_lab_losses"
    package.mkdir()
    (package / "__init__.py").write_text(code)
    return tmp_path


def contributing_tests_block() -> str:
    """The Python block of CONTRIBUTING.md's "Testing a plugin": a test module of my_lab_losses."""
    blocks = re.findall(r"```python\n(.*?)```", CONTRIBUTING.read_text(), re.DOTALL)
    (block,) = [block for block in blocks if block.startswith("# tests/test_my_lab_losses.py")]
    return block


def test_the_tests_of_contributing_pass_on_its_loss(tmp_path: Path, monkeypatch) -> None:
    """On the loss installed as the distribution my-lab-losses: its dist-info with the entry point on sys.path,
    what `pip install -e .` writes for section 4's pyproject.toml."""
    root = loss_plugin(tmp_path)
    (root / "test_my_lab_losses.py").write_text(contributing_tests_block())
    info = root / "my_lab_losses-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-lab-losses\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[sslcore]\nmy_lab_losses = my_lab_losses\n")
    monkeypatch.syspath_prepend(str(root))  # the spawned gloo workers get this sys.path too
    try:
        tests = importlib.import_module("test_my_lab_losses")
        tests.test_contract(Registry(autoload=False))
        tests.test_entry_point()
        tests.test_two_workers_match_one_process()
    finally:
        for module in ("my_lab_losses", "test_my_lab_losses"):
            sys.modules.pop(module, None)


def test_the_loss_of_contributing_meets_the_contract(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(loss_plugin(tmp_path)))
    registry = Registry(autoload=False)
    registry.add_module("my_lab_losses")
    try:
        check_component(registry, "loss", "alignment")
    finally:
        registry.remove_plugin("my_lab_losses")
        sys.modules.pop("my_lab_losses", None)


def test_the_loss_of_contributing_trains_moco_and_is_refused_by_simclr(tmp_path: Path, cifar10_subset: dict,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{loss_plugin(tmp_path)}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    data = f"data: {{name: image_folder, root: {cifar10_subset['train']}}}"
    (tmp_path / "moco.yaml").write_text(f"""
name: lab
method: {{name: moco, bn_splits: 2}}
encoder: {{name: resnet18, cifar_stem: false}}
augmentation: {{name: moco_v2, size: 32}}
negatives: {{name: in_batch}}
loss: {{name: alignment, temperature: 0.1}}
{data}
train: {{epochs: 1, batch_size: 8, max_steps_per_epoch: 2}}
scaling: {{backend: local}}
tracking: {{aim: null, progress_bar: false}}
""")
    out = run_cli("run", "moco.yaml", "-p", "my_lab_losses", "-p", "sslcore_moco.plugin", cwd=tmp_path,
                  autoload=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "lab" / "backbone.pt").is_file()

    (tmp_path / "simclr.yaml").write_text(f"method: simclr\nloss: {{name: alignment}}\n{data}\n")
    out = run_cli("validate", "simclr.yaml", "-p", "my_lab_losses", "-p", "sslcore_simclr.plugin", cwd=tmp_path,
                  autoload=False)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "loss.name: method 'simclr' needs PairedLoss" in line and "'alignment' is a ContrastiveLoss" in line
