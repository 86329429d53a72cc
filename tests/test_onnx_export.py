"""``sslcore export --format onnx``: the backbone of a real run (a ResNet) and of a backbone file (a ViT) as ONNX
that onnxruntime runs as torch does, on real CIFAR-10 images at batch sizes the export's own check did not use."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sslcore.api.errors import UserError
from sslcore.commands.cli import _parser, cmd_export
from sslcore.commands.export import CHECK_BATCHES, RELATIVE_TOLERANCE, check_onnx, export_onnx
from sslcore.components.encoders import plain_torchvision_resnet, plain_torchvision_vit
from sslcore.engine.rundir import RunDir
from sslcore.testing import run_cli, tiny_encoder

MOCO = "sslcore_moco.plugin"
SIZE = 32
#: batch sizes for the test's own comparison: neither of the export's check batches (CHECK_BATCHES, 2 and 3)
BATCHES = (1, 5)


def experiment(encoder: dict, train_images: Path, output_dir: Path) -> dict:
    """A MoCo experiment of one step of 8 of 20 real images (2 per class), with its checkpoint at the end."""
    return {"name": "onnx", "output_dir": str(output_dir), "seed": 0,
            "method": {"name": "moco", "momentum": 0.99, "bn_splits": 2}, "encoder": encoder,
            "augmentation": {"name": "moco_v2", "size": SIZE}, "negatives": {"name": "in_batch"},
            "data": {"name": "image_folder", "root": str(train_images), "max_per_class": 2},
            "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
            "scaling": {"backend": "local"}, "tracking": {"aim": None, "progress_bar": False}, "plugins": [MOCO]}


@pytest.fixture(scope="module")
def resnet_run(cifar10_subset: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a real one-step run of a ResNet-18 (its ImageNet stem: the fast one at 32 px)."""
    tmp_path = tmp_path_factory.mktemp("onnx_run")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(experiment({"name": "resnet18", "cifar_stem": False}, cifar10_subset["train"],
                                                tmp_path / "runs")))
    out = run_cli("run", str(config), cwd=tmp_path, autoload=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return tmp_path / "runs" / "onnx"


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", "1")


def export(*args: str | Path) -> int:
    """``sslcore export ARGS -p sslcore_moco.plugin`` in this process, through sslcore's parser; a user error is
    raised (``sslcore.commands.cli.main`` prints it as one line and returns 2)."""
    return cmd_export(_parser().parse_args(["export", *map(str, args), "-p", MOCO]))


def eval_images(test_images: Path, count: int, registry) -> torch.Tensor:
    """The first test image of each of ``count`` classes (10 at most) through the experiment's eval transform."""
    augmentation = registry.build("augmentation", {"name": "moco_v2", "size": SIZE})
    files = [sorted(folder.iterdir())[0] for folder in sorted(test_images.iterdir())[:count]]
    return torch.stack([augmentation.eval(np.asarray(Image.open(f).convert("RGB"))) for f in files])


def assert_onnxruntime_computes_as(model: torch.nn.Module, onnx_file: Path, images: torch.Tensor) -> None:
    """onnxruntime on ``onnx_file`` gives ``model``'s features, at each batch size of BATCHES."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for batch in BATCHES:
        with torch.no_grad():
            expected = model.eval()(images[:batch]).numpy()
        (got,) = session.run(["features"], {"images": images[:batch].numpy()})
        assert got.shape == expected.shape == (batch, expected.shape[1])
        difference = np.abs(got - expected).max()
        assert difference <= RELATIVE_TOLERANCE * np.abs(expected).max(), (batch, difference)


def test_a_resnet_run_exports_to_onnx_that_computes_the_checkpoints_features(
        resnet_run: Path, cifar10_subset: dict[str, Path], tmp_path: Path, registry, capsys) -> None:
    output = tmp_path / "exported" / "backbone.onnx"
    assert export(resnet_run, "-o", output, "--format", "onnx") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"wrote {re.escape(str(output))}: ONNX opset \d+, input images batch x 3 x {SIZE} x {SIZE} "
                        r"float32 \(batch dynamic\), output features batch x 512; onnxruntime matches torch at batch 2 "
                        r"and 3: max \|difference\| \S+ <= tolerance \S+ \(0.0001 x max \|feature\|\)", line), line
    assert output.with_suffix(".yaml").read_text() == (resnet_run / "config.yaml").read_text()
    # the reference: plain torchvision with the query encoder's weights of the run's checkpoint
    model = plain_torchvision_resnet("resnet18", cifar_stem=False)
    state = torch.load(RunDir(resnet_run).latest_checkpoint(), weights_only=True)["model"]
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    assert_onnxruntime_computes_as(model, output, eval_images(cifar10_subset["test"], max(BATCHES), registry))
    # the module docstring's way to use it: onnxruntime alone, no torch and no sslcore
    snippet = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime
        session = onnxruntime.InferenceSession({str(output)!r}, providers=["CPUExecutionProvider"])
        (features,) = session.run(["features"], {{"images": np.zeros((8, 3, {SIZE}, {SIZE}), np.float32)}})
        assert features.shape == (8, 512), features.shape
        assert not any(m.split(".")[0] in ("torch", "sslcore") for m in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_vit_backbone_file_exports_to_onnx(cifar10_subset: dict[str, Path], tmp_path: Path, registry,
                                             capsys) -> None:
    """A backbone.pt with its backbone.yaml (as ``sslcore export`` writes them) of a ViT whose position embeddings
    would be interpolated at other sizes (dynamic_img_size): the file takes the eval size."""
    encoder = {"name": "vit_tiny", "depth": 2, "image_size": SIZE, "patch_size": 4, "dynamic_img_size": True}
    weights = tmp_path / "backbone.pt"
    torch.manual_seed(0)
    torch.save(registry.build("encoder", encoder).state_dict(), weights)
    weights.with_suffix(".yaml").write_text(yaml.safe_dump(experiment(encoder, cifar10_subset["train"], tmp_path)))
    output = tmp_path / "vit.onnx"
    assert export(weights, "-o", output, "--format", "onnx") == 0
    assert f"input images batch x 3 x {SIZE} x {SIZE} float32 (batch dynamic), output features batch x 192;" \
        in capsys.readouterr().out
    model = plain_torchvision_vit("vit_tiny", SIZE, 4, depth=2)
    model.load_state_dict(torch.load(weights, weights_only=True))
    assert_onnxruntime_computes_as(model, output, eval_images(cifar10_subset["test"], max(BATCHES), registry))


def test_opset_and_a_file_that_does_not_compute_what_torch_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = tiny_encoder().eval()
    output = tmp_path / "tiny.onnx"
    check = export_onnx(encoder, output, SIZE, opset=21)
    assert check.opset == 21 and check.input_shape == ["batch", 3, SIZE, SIZE] and check.output_shape == ["batch", 8]
    assert check.batches == list(CHECK_BATCHES)
    other = tiny_encoder().eval()  # other weights: the file is not this model
    batches = [torch.randn(batch, 3, SIZE, SIZE) for batch in CHECK_BATCHES]
    with pytest.raises(UserError, match=r"tiny.onnx: the ONNX file fails its check \(onnxruntime's features differ "
                                        r"from torch's by up to .* at batch 2, above the tolerance"):
        check_onnx(output, other, batches)
    assert not output.exists()


def test_export_errors_are_one_line(resnet_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys) -> None:
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((resnet_run / "config.yaml").read_text())
    with pytest.raises(UserError, match=f"^{untrained}: no checkpoint or backbone.pt yet; train at least "
                                        "checkpoint.every_epochs"):
        export(untrained, "-o", tmp_path / "b.onnx", "--format", "onnx")
    with pytest.raises(UserError, match="--opset 11: torch's ONNX exporter writes opset 18 or newer"):
        export(resnet_run, "-o", tmp_path / "b.onnx", "--format", "onnx", "--opset", "11")
    with pytest.raises(UserError, match="--opset 20: an opset is for --format onnx only"):
        export(resnet_run, "-o", tmp_path / "b.pt", "--opset", "20")
    with pytest.raises(SystemExit) as exit_code:
        export(resnet_run, "-o", tmp_path / "b.tflite", "--format", "tflite")
    assert exit_code.value.code == 2 and "invalid choice: 'tflite' (choose from" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where it is not installed: import fails
    with pytest.raises(UserError, match=r"^sslcore export --format onnx needs onnxruntime, not installed: "
                                        r"pip install 'sslcore\[onnx\]'$"):
        export(resnet_run, "-o", tmp_path / "b.onnx", "--format", "onnx")
    assert not list(tmp_path.glob("b.*"))
