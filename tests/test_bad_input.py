"""Bad input through the real CLI: one ``error: ...`` line naming the file and the fix, exit code 2, nothing
written; or, where training can go on (an empty class folder), one logged warning."""

from __future__ import annotations

import io
import logging
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sslcore.commands.cli import main
from sslcore.registry import Registry

MOCO = "sslcore_moco.plugin"
MISSING_MODULE = "sslcore_no_such_plugin_module"
EXPERIMENT = """
name: bad_input
method: {name: moco}
encoder: {name: resnet18, cifar_stem: true}
augmentation: {name: moco_v2, size: 16}
negatives: {name: in_batch}
data: {name: image_folder, root: IMAGES}
scaling: {backend: local}
"""


def write_images(root: Path, classes: dict[str, int]) -> Path:
    """An ImageFolder of real PNGs: ``classes`` maps each class folder to its number of images."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ (2 classes of 3 PNGs); exp.yaml without evaluators and exp_knn.yaml with a kNN on images/;
    run/, a run folder of exp.yaml with the encoder's real backbone.pt and no evaluators."""
    from sslcore.config import load_experiment
    from sslcore.engine.launch import dry_build

    base = tmp_path_factory.mktemp("bad_input")
    images = write_images(base / "images", {"cat": 3, "dog": 3})
    text = textwrap.dedent(EXPERIMENT).lstrip().replace("IMAGES", str(images))
    (base / "exp.yaml").write_text(text)
    (base / "exp_knn.yaml").write_text(text + f"evaluators: [{{name: knn, k: 2, data: {{name: image_folder, "
                                              f"root: {images}}}}}]\n")
    (base / "run").mkdir()
    (base / "run" / "config.yaml").write_text(text)
    registry = Registry(autoload=False, modules=[MOCO])
    method = dry_build(load_experiment(base / "exp.yaml", registry), registry)
    torch.save(method.backbone.state_dict(), base / "run" / "backbone.pt")
    return base


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", "1")


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """``sslcore ARGS -p sslcore_moco.plugin`` in this process; returns the exit code and stderr."""
    code = main([*map(str, args), "-p", MOCO])
    return code, capsys.readouterr().err


def one_error(stderr: str, *names: str | Path) -> str:
    """The single ``error:`` line of ``stderr``, checked to name each of ``names``."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


NOT_UTF8 = {
    "random bytes": bytes(random.Random(0).randrange(256) for _ in range(4096)),
    "png": png_bytes(),
    "utf-16": "method: moco\ndata: {name: image_folder, root: /x}\n".encode("utf-16"),
    "utf-16 without BOM": "method: moco\n".encode("utf-16-le"),
    "latin-1": "name: caf\xe9\nmethod: moco\n".encode("latin-1"),
}


@pytest.mark.parametrize("content", NOT_UTF8.values(), ids=NOT_UTF8.keys())
@pytest.mark.parametrize("command", ["run", "validate", "eval --config"])
def test_an_experiment_file_that_is_not_utf8_text(capsys, workspace: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, command: str,
                                                  content: bytes) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "x.yaml"
    bad.write_bytes(content)
    args = {"run": ["run", bad], "validate": ["validate", bad],
            "eval --config": ["eval", workspace / "run" / "backbone.pt", "-e", "knn", "--config", bad,
                              "-o", tmp_path / "out"]}[command]
    code, stderr = cli(capsys, *args)
    assert code == 2
    line = one_error(stderr, f"{bad}:")
    assert "UTF-8" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]  # no runs/, no out/


@pytest.mark.parametrize(("content", "message"), [
    (None, "is a folder, not an experiment file; give the path of an experiment YAML file"),
    ("- method: moco\n- data: x\n", "the experiment file must be a mapping of keys (method:, data:, ...), not a list"),
    ("just words\n", "the experiment file must be a mapping of keys (method:, data:, ...), not a str"),
    ("method: moco\ndata: [1, 2\nx: 3\n", "invalid YAML: expected ',' or ']', but got ':'"),
])
def test_a_folder_or_a_file_that_is_no_experiment(capsys, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "experiment.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    code, stderr = cli(capsys, "validate", path)
    assert code == 2
    assert message in one_error(stderr, path)


def test_a_missing_experiment_file(capsys, tmp_path: Path) -> None:
    code, stderr = cli(capsys, "validate", tmp_path / "nothing.yaml")
    assert code == 2
    assert "cannot read the experiment file (No such file or directory)" in one_error(stderr, tmp_path / "nothing.yaml")


@pytest.mark.parametrize(("text", "line"), [
    ("method: moco\ntrain: {epochs: 1}\ndata: {name: image_folder, root: /x}\ntrain: {epochs: 2}\n",
     "4: train: duplicate key (first at line 2); keep one"),
    ("method: moco\ndata: {name: image_folder, root: /x}\ntrain:\n  optimizer:\n    lr: 0.1\n    momentum: 0.9\n"
     "    lr: 0.2\n", "7: train.optimizer.lr: duplicate key (first at line 5); keep one"),
    ("method: moco\ndata: {name: image_folder, root: /x, 'root': /y}\n",
     "2: data.root: duplicate key (first at line 2); keep one"),
])
def test_a_duplicate_key_is_refused(capsys, tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    code, stderr = cli(capsys, "validate", path)
    assert code == 2
    assert one_error(stderr) == f"error: {path}:{line}"


def test_merge_keys_stay_allowed(capsys, workspace: Path, tmp_path: Path) -> None:
    images = workspace / "images"
    path = tmp_path / "experiment.yaml"
    path.write_text((workspace / "exp.yaml").read_text().replace("data: {", "data: &train {max_per_class: 3, ")
                    + "evaluators: [{name: knn, k: 2, data: {<<: *train, max_per_class: 2}}]\n")
    code = main(["validate", str(path), "--resolved", "-p", MOCO])
    out = capsys.readouterr()
    assert code == 0, out.err
    resolved = yaml.safe_load(out.out)
    assert resolved["data"]["max_per_class"] == 3
    evaluator_data = resolved["evaluators"][0]["data"]
    assert evaluator_data["root"] == str(images) and evaluator_data["max_per_class"] == 2  # the key after << wins


WEIGHTS = {
    "a text file": b"hello notes\n",  # torch's unpickler: KeyError
    "random bytes": bytes(random.Random(1).randrange(256) for _ in range(4096)),
    "a broken zip": b"PK\x03\x04" + bytes(random.Random(2).randrange(256) for _ in range(4096)),
}


@pytest.mark.parametrize("content", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_weights_that_are_not_a_torch_file(capsys, workspace: Path, tmp_path: Path, content: bytes) -> None:
    weights = tmp_path / "notes.txt"
    weights.write_bytes(content)
    code, stderr = cli(capsys, "eval", weights, "--config", workspace / "exp_knn.yaml", "-e", "knn")
    assert code == 2
    one_error(stderr, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no evaluations.json


@pytest.mark.parametrize(("value", "kind"), [(torch.zeros(3), "Tensor"), ([1, 2], "list")])
def test_weights_that_hold_no_state_dict(capsys, workspace: Path, tmp_path: Path, value: object, kind: str) -> None:
    weights = tmp_path / "backbone.pt"
    torch.save(value, weights)
    code, stderr = cli(capsys, "eval", weights, "--config", workspace / "exp_knn.yaml", "-e", "knn")
    assert code == 2
    assert one_error(stderr) == (f"error: {weights}: holds a {kind}, not a state_dict or an sslcore checkpoint; give "
                                 "a backbone.pt (sslcore export, or the end of training) or a checkpoint's state.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt"]


def test_eval_of_a_run_without_evaluators_says_how_to_give_the_test_data(capsys, workspace: Path,
                                                                         tmp_path: Path) -> None:
    run = workspace / "run"
    code, stderr = cli(capsys, "eval", run, "-e", "knn", "-o", tmp_path / "out")
    assert code == 2
    assert one_error(stderr) == (f"error: {run / 'config.yaml'}: the run has no evaluator to take the test data "
                                 "of knn from; give it with --set data.name=image_folder --set data.root=TEST_FOLDER")
    code, stderr = cli(capsys, "eval", run, "-e", "knn", "--set", f"data.root={workspace / 'images'}")
    assert code == 2 and "the run has no evaluator to take the test data of knn from" in one_error(stderr)
    assert not (tmp_path / "out").exists()
    # the fix the message gives works
    code, stderr = cli(capsys, "eval", run, "-e", "knn", "--set", "data.name=image_folder", "--set",
                       f"data.root={workspace / 'images'}", "--set", "k=2", "-o", tmp_path / "out")
    assert code == 0, stderr
    assert (tmp_path / "out" / "evaluations.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "bogus"], "error: sslcore eval --device bogus: not a device torch knows; use cpu or cuda"),
    (["-o", "NOTES"], "error: sslcore eval -o NOTES: cannot make the output folder (File exists); give a folder "
                      "for evaluations.json"),
    (["--config", "FOLDER"], "error: sslcore eval --config FOLDER: not a file; give the experiment YAML of the "
                             "weights"),
])
def test_eval_device_output_and_config_arguments(capsys, workspace: Path, tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder\n")
    args = [str(notes) if a == "NOTES" else str(tmp_path) if a == "FOLDER" else a for a in args]
    code, stderr = cli(capsys, "eval", workspace / "run", "-e", "knn", "--set", "data.name=image_folder",
                       "--set", f"data.root={workspace / 'images'}", "--set", "k=2", *args)
    assert code == 2
    assert one_error(stderr) == message.replace("NOTES", str(notes)).replace("FOLDER", str(tmp_path))
    assert not (workspace / "run" / "evaluations.json").exists()


COMMANDS = {
    "run": ["run", "WORK/exp.yaml"],
    "validate": ["validate", "WORK/exp.yaml"],
    "plugins": ["plugins"],
    "schema": ["schema"],
    "eval": ["eval", "WORK/run", "-e", "knn", "--config", "WORK/exp_knn.yaml", "-o", "OUT"],
    "export": ["export", "WORK/run", "-o", "OUT/backbone.pt"],
    "report": ["report", "WORK/run"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_plugin_module_that_cannot_be_imported_is_an_error(capsys, workspace: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a.replace("WORK", str(workspace)).replace("OUT", str(tmp_path / "out")) for a in command]
    code = main([*args, "-p", MOCO, "-p", MISSING_MODULE])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert one_error(captured.err) == (
        f"error: -p {MISSING_MODULE}: cannot load it as a plugin (ModuleNotFoundError: No module named "
        f"'{MISSING_MODULE}'); check the module name and that its package is installed in this environment")
    assert list(tmp_path.iterdir()) == []  # no runs/, no out/
    assert not (workspace / "run" / "report.md").exists()


def test_a_broken_installed_plugin_stays_a_warning_unless_named(capsys, workspace: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution whose ``sslcore`` entry point fails to import: a warning for a command that does not need
    it; an error once the user names its module with ``-p``."""
    (tmp_path / "tp_broken_at_import.py").write_text("raise ImportError('needs a library that is not installed')\n")
    info = tmp_path / "tp_broken_at_import-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-broken-at-import\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sslcore]\ntp_broken_at_import = tp_broken_at_import\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD")
    code, stderr = cli(capsys, "validate", workspace / "exp.yaml")
    assert code == 0
    (warning,) = [line for line in stderr.splitlines() if "tp_broken_at_import" in line]
    assert warning.startswith("warning: plugin 'tp_broken_at_import' from 'tp-broken-at-import' failed to load")
    code, stderr = cli(capsys, "validate", workspace / "exp.yaml", "-p", "tp_broken_at_import")
    assert code == 2
    assert "-p tp_broken_at_import: cannot load it as a plugin (ImportError: needs a library that is not " \
           "installed (tp_broken_at_import.py:1))" in one_error(stderr)


def test_an_empty_class_folder_is_a_warning_and_still_a_class(tmp_path: Path, caplog) -> None:
    root = write_images(tmp_path / "images", {"bird": 0, "cat": 2, "dog": 0, "fish": 1})
    (root / "dog" / "notes.txt").write_text("no images here\n")
    with caplog.at_level(logging.WARNING, logger="sslcore.components.datasets"):
        dataset = Registry(autoload=False).build("dataset", {"name": "image_folder", "root": str(root)})
    assert dataset.classes == ["bird", "cat", "dog", "fish"] and sorted(dataset.targets) == [1, 1, 3]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"image_folder: 2 class folder(s) under '{root}' (data.root) hold no ")
    assert ": bird, dog; they still count as classes (labels 0..3)" in record.getMessage()


def test_an_image_folder_of_empty_class_folders_is_an_error(capsys, workspace: Path, tmp_path: Path) -> None:
    root = write_images(tmp_path / "images", {"cat": 0, "dog": 0})
    path = tmp_path / "experiment.yaml"
    path.write_text((workspace / "exp.yaml").read_text().replace(str(workspace / "images"), str(root)))
    code, stderr = cli(capsys, "validate", path)
    assert code == 2
    assert one_error(stderr, root).startswith(f"error: image_folder: no images found under '{root}' (data.root)")


def test_an_image_list_that_is_not_text(capsys, workspace: Path, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_bytes(png_bytes())
    path = tmp_path / "experiment.yaml"
    path.write_text((workspace / "exp.yaml").read_text().replace(
        f"{{name: image_folder, root: {workspace / 'images'}}}", f"{{name: file_list, path: {listing}}}"))
    code, stderr = cli(capsys, "validate", path)
    assert code == 2
    assert "is not UTF-8 text" in one_error(stderr, listing)
