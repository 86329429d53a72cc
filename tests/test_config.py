"""The experiment file: every error one line with file, line, key path and a fix; overrides; defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sslcore.api.errors import ConfigError
from sslcore.config import apply_overrides, experiment_schema, load_experiment, load_yaml
from sslcore.registry import Registry


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(autoload=False, modules=["sslcore_moco.plugin"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
name: unit
method: {name: moco, momentum: 0.99}
encoder: {name: resnet18, cifar_stem: true}
negatives: {name: queue, size: 4096}
data: {name: image_folder, root: /tmp/images}
train:
  epochs: 2
  batch_size: 256
  optimizer: {name: sgd, lr: 0.06}
"""


def errors_of(path: Path, registry: Registry, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_experiment(path, registry, overrides)
    return info.value.lines


def test_valid_file_fills_method_defaults(tmp_path: Path, registry: Registry) -> None:
    resolved = load_experiment(write(tmp_path, GOOD), registry)
    assert resolved.blocks["negatives"] == {"name": "queue", "size": 4096}
    # not given: the method's defaults, with the component's own defaults filled in
    assert resolved.blocks["loss"]["name"] == "info_nce" and resolved.blocks["loss"]["temperature"] == 0.2
    assert resolved.blocks["augmentation"]["name"] == "moco_v2"
    assert resolved.blocks["optimizer"]["lr"] == 0.06 and resolved.blocks["optimizer"]["momentum"] == 0.9
    assert resolved.as_dict()["train"]["optimizer"]["name"] == "sgd"


def test_method_shorthand_is_a_complete_experiment(tmp_path: Path, registry: Registry) -> None:
    resolved = load_experiment(write(tmp_path, "method: moco\ndata: {name: image_folder, root: /x}\n"), registry)
    assert resolved.blocks["encoder"]["name"] == "resnet50"
    assert resolved.blocks["negatives"]["size"] == 65536


def test_typo_in_a_component_key_names_line_path_and_suggestion(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD.replace("momentum: 0.99", "momentun: 0.99"))
    (line,) = errors_of(path, registry)
    assert line == f"{path}:2: method.momentun: unknown key 'momentun' — did you mean 'momentum'?"


def test_typo_in_a_top_level_section(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD.replace("  epochs: 2", "  epoch: 2"))
    (line,) = errors_of(path, registry)
    assert line == f"{path}:7: train.epoch: unknown key 'epoch' — did you mean 'epochs'?"


def test_unknown_component_suggests_the_closest(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD + "loss: {name: info_nc}\n")
    (line,) = errors_of(path, registry)
    assert line == f"{path}:10: loss.name: unknown loss 'info_nc' — did you mean 'info_nce'?"


def test_wrong_type_names_the_value(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD.replace("size: 4096", "size: lots"))
    (line,) = errors_of(path, registry)
    assert line.startswith(f"{path}:4: negatives.size: Input should be a valid integer")
    assert "'lots'" in line


def test_all_errors_are_collected(tmp_path: Path, registry: Registry) -> None:
    text = GOOD.replace("momentum: 0.99", "momentum: 2").replace("cifar_stem: true", "cifar_stm: true")
    lines = errors_of(write(tmp_path, text + "scaling: {num_wokers: 2}\n"), registry)
    assert len(lines) == 3
    assert any("method.momentum: Input should be less than 1" in e for e in lines)
    assert any("encoder.cifar_stm: unknown key 'cifar_stm' — did you mean 'cifar_stem'?" in e for e in lines)
    assert any("scaling.num_wokers" in e and "num_workers" in e for e in lines)


def test_missing_required_block_and_key(tmp_path: Path, registry: Registry) -> None:
    lines = errors_of(write(tmp_path, "method: moco\ndata: {name: image_folder}\n"), registry)
    assert lines == [f"{tmp_path / 'experiment.yaml'}:2: data.root: missing required key 'root'"]
    lines = errors_of(write(tmp_path, "method: moco\n"), registry)
    assert lines == [f"{tmp_path / 'experiment.yaml'}:1: data: missing required key 'data'"]


def test_block_for_a_slot_the_method_does_not_use(tmp_path: Path, registry: Registry) -> None:
    lines = errors_of(write(tmp_path, GOOD + "clustering: {name: faiss_kmeans}\n"), registry)
    assert "method 'moco' does not use a 'clustering' block" in lines[0]


def test_nested_dataset_block_of_an_evaluator(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD + "evaluators:\n  - {name: knn, data: {name: image_foldr, root: /x}}\n")
    (line,) = errors_of(path, registry)
    assert "evaluators[0].data.name: unknown dataset 'image_foldr' — did you mean 'image_folder'?" in line


def test_overrides(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD)
    resolved = load_experiment(path, registry, ["train.epochs=7", "negatives.size=8192", "loss.temperature=0.1",
                                                "scaling.backend=local"])
    assert resolved.experiment.train.epochs == 7
    assert resolved.blocks["negatives"]["size"] == 8192
    assert resolved.blocks["loss"] == {"name": "info_nce", "temperature": 0.1}
    (line,) = errors_of(path, registry, ["train.lr=0.1"])
    assert line.startswith("--set: train.lr: unknown key 'lr'")


def test_override_shorthand_method(tmp_path: Path) -> None:
    data = {"method": "moco"}
    apply_overrides(data, ["method.momentum=0.9"], {})
    assert data == {"method": {"name": "moco", "momentum": 0.9}}


def test_yaml_syntax_error(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, "method: moco\ndata: {name: image_folder, root: /x\n")
    (line,) = errors_of(path, registry)
    assert line.startswith(f"{path}:3: invalid YAML")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "method: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(path)


def test_queue_not_a_multiple_of_the_global_batch_is_a_config_error(tmp_path: Path, registry: Registry) -> None:
    from sslcore.engine.launch import dry_build

    resolved = load_experiment(write(tmp_path, GOOD.replace("size: 4096", "size: 4000")), registry)
    with pytest.raises(ConfigError) as info:
        dry_build(resolved, registry, dataset_size=1000)
    (line,) = info.value.lines
    assert line.startswith(f"{tmp_path / 'experiment.yaml'}:4: negatives: queue size 4000")
    assert "3840" in line and "4096" in line


def test_schema_lists_registered_components(registry: Registry) -> None:
    schema = experiment_schema(registry)
    names = schema["properties"]["loss"]["oneOf"][0]["enum"]
    assert "info_nce" in names
    assert "method" in schema["required"] and "data" in schema["required"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSLCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "sslcore", *args, "-p", "sslcore_moco.plugin"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "0.png")
    good = write(tmp_path, GOOD.replace("/tmp/images", str(tmp_path / "images")))
    out = run_cli("validate", str(good))
    assert out.returncode == 0, out.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(GOOD.lstrip())  # root: /tmp/images, which does not exist
    out = run_cli("validate", str(missing))
    assert out.returncode == 2 and "no folder '/tmp/images' (data.root)" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("name: moco", "name: mocco").lstrip())
    out = run_cli("validate", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {bad}:2: method.name: unknown method 'mocco' — did you mean 'moco'?"
    assert "Traceback" not in out.stderr


def test_cli_schema_of_one_component() -> None:
    out = run_cli("schema", "loss", "info_nce")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["properties"]["temperature"]["default"] == 0.2
    out = run_cli("schema", "los", "info_nce")
    assert out.returncode == 2 and "did you mean 'loss'" in out.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_files_validate(example: Path) -> None:
    from sslcore.engine.launch import dry_build

    plugins = sorted(d for d in (Path(__file__).parents[1] / "plugins").iterdir() if (d / "pyproject.toml").is_file())
    registry = Registry(autoload=False, modules=[f"sslcore_{d.name}.plugin" for d in plugins])
    assert not registry.errors
    resolved = load_experiment(example, registry)
    assert resolved.blocks["method"]["name"] in {d.name for d in plugins}
    dry_build(resolved, registry)


def test_local_backend_runs_one_worker(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, GOOD + "scaling: {backend: local, num_workers: 2}\n")
    (line,) = errors_of(path, registry)
    assert line == (f"{path}:10: scaling.num_workers: the local backend runs one worker, not 2; "
                    "use backend: ray for more")


def test_train_overrides_merge_onto_the_recipe_key_by_key(tmp_path: Path, registry: Registry) -> None:
    """MoCo's recipe under the file's train block: a key changes, the rest stays the method's; an optimizer of
    another name replaces the method's."""
    path = write(tmp_path, "method: moco\ndata: {name: image_folder, root: /x}\n")
    train = load_experiment(path, registry, ["train.optimizer.lr=0.05", "train.warmup_epochs=5"]).as_dict()["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert (train["warmup_epochs"], train["epochs"], train["lr_scaling"]) == (5, 200, "linear")
    train = load_experiment(path, registry, ["train.optimizer={name: lars, lr: 0.3}"]).as_dict()["train"]
    assert train["optimizer"]["name"] == "lars" and train["optimizer"]["weight_decay"] == 1e-6  # LARS' default
