"""``sslcore export TARGET -o OUTPUT [--format state_dict|onnx]``: the trained backbone of a run (its latest
checkpoint) or of a weights file (a backbone.pt or a checkpoint's state.pt, with its experiment as ``sslcore eval``
finds it), as a plain ``state_dict`` (the default) or as an ONNX model.

For the torchvision ResNets the ``state_dict`` loads with no sslcore import::

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    # with cifar_stem: true also
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

For a timm encoder (``encoder: {name: timm, model: M, ...}``) it loads, with no sslcore import, into timm's own
model, given those of the block's img_size, patch_size, dynamic_img_size and drop_path_rate that it sets::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

``--format onnx`` (``pip install 'sslcore[onnx]'``) writes the backbone in eval mode, float32, through torch's
own exporter (``torch.onnx.export``, the torch.export-based one): one input ``images``, N x 3 x S x S with S the
eval transform's size (the augmentation block's) and the batch N dynamic; one output ``features``, N x D. It
loads with onnxruntime alone, no torch and no sslcore::

    import numpy as np, onnxruntime
    session = onnxruntime.InferenceSession("backbone.onnx", providers=["CPUExecutionProvider"])
    images = np.zeros((8, 3, 32, 32), np.float32)  # any N; resized, cropped and normalised as the eval transform
    (features,) = session.run(["features"], {"images": images})  # 8 x D

The image side is fixed, also for a ViT with ``dynamic_img_size``: at the eval size the position embeddings
are the trained table itself, and interpolating them to other grids is not in the file. Before it reports
success the command checks the file: ``onnx.checker``, then onnxruntime's features against torch's on seeded
batches of two sizes (see :data:`RELATIVE_TOLERANCE`); a file that fails is removed.

Beside the written file goes the run's experiment (``backbone.yaml`` for ``backbone.pt`` or ``backbone.onnx``):
the encoder, and the augmentation whose eval transform (size, mean, std) the images need; from it ``sslcore eval``
rebuilds the encoder of a ``state_dict``.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sslcore.api.errors import UserError

if TYPE_CHECKING:  # imported where used: cli.py builds this command's parser for every command, --help included
    import torch
    from torch import nn

    from sslcore.config import Resolved
    from sslcore.registry import Registry

FORMATS = ("state_dict", "onnx")
ONNX_INSTALL = "pip install 'sslcore[onnx]'"
#: the lowest opset torch's exporter writes (its ONNX functions, torchlib, are written for 18); asked for less,
#: it writes 18 and only logs that it could not convert
MIN_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "features"
#: the batch sizes the check runs (the export traces the first; the second proves the batch axis dynamic)
CHECK_BATCHES = (2, 3)
#: onnxruntime's features may differ from torch's by this fraction of the largest |feature|: both compute in
#: float32 (eps 1.2e-7) but order their sums differently (other convolution algorithms, fused attention and
#: normalisation), an error of about sqrt(K) eps of the magnitudes summed per K-term sum, growing through the
#: layers. Measured: 3e-7 to 1.1e-6 of the largest feature (torchvision ResNet-18/50 with either stem, sslcore's
#: ViT-Ti/S/B, timm's ResNet, ViTs, ConvNeXt, EfficientNet, Swin), 100x below this; a wrong operator or weight
#: differs by tens of percent.
RELATIVE_TOLERANCE = 1e-4


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand and its arguments (``common``: the parent with ``-p/--plugin``)."""
    parser = commands.add_parser(
        "export", parents=[common], help="write a run's backbone as a state_dict or as ONNX",
        description="Write the backbone of a run's latest checkpoint (or of a backbone.pt / state.pt) as a "
                    "state_dict or an ONNX model, with the run's experiment beside it (OUTPUT's name, .yaml).")
    parser.add_argument("target", type=Path, metavar="TARGET",
                        help="a run folder, or a backbone.pt / checkpoint file")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT",
                        help="the file to write, e.g. backbone.pt or backbone.onnx")
    parser.add_argument("--format", choices=FORMATS, default="state_dict",
                        help="state_dict (default): torch.save of the backbone's weights; onnx: the backbone as an "
                             "ONNX model, checked with onnxruntime (pip install 'sslcore[onnx]')")
    parser.add_argument("--opset", type=int, metavar="N",
                        help=f"ONNX opset to write ({MIN_OPSET} or newer; default: torch's exporter's)")
    parser.add_argument("--config", type=Path, help="experiment YAML of a weights file (default: the .yaml beside "
                                                    "it, else the config.yaml of its run folder)")


def cmd_export(args: argparse.Namespace) -> int:
    """Write the backbone in the format asked; print one line on what was written."""
    from sslcore.commands.cli import _registry

    registry = _registry(args)
    if args.format == "state_dict":
        if args.opset is not None:
            raise UserError(f"sslcore export --opset {args.opset}: an opset is for --format onnx only")
        print(f"wrote {export_backbone(args.target, args.output, registry, args.config)}")
    else:
        check = export_backbone_onnx(args.target, args.output, registry, args.config, args.opset)
        print(check.line(args.output))
    return 0


def export_backbone(target: Path, output: Path, registry: Registry, config: Path | None = None) -> Path:
    """Write the backbone of ``target`` (see :func:`load_backbone`) to ``output`` as a ``state_dict``, and its
    experiment beside it; returns ``output``."""
    import torch

    backbone, config_file, _ = load_backbone(target, registry, config)
    _make_parent(output)
    torch.save(backbone.state_dict(), output)
    output.with_suffix(".yaml").write_text(config_file.read_text())
    return output


def export_backbone_onnx(target: Path, output: Path, registry: Registry, config: Path | None = None,
                         opset: int | None = None) -> OnnxCheck:
    """Write the backbone of ``target`` (see :func:`load_backbone`) to ``output`` as ONNX for the eval transform's
    image size (:func:`export_onnx`, which checks the file), and its experiment beside it."""
    if opset is not None and opset < MIN_OPSET:
        raise UserError(f"sslcore export --opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or newer; "
                        "give one of those, or leave --opset out for its default")
    onnx_modules()  # before the backbone is built: a missing package is the first thing to hear
    backbone, config_file, resolved = load_backbone(target, registry, config)
    augmentation = registry.build("augmentation", resolved.as_dict()["augmentation"])
    _make_parent(output)
    check = export_onnx(backbone, output, augmentation.eval_size, opset)
    output.with_suffix(".yaml").write_text(config_file.read_text())
    return check


def load_backbone(target: Path, registry: Registry,
                  config: Path | None = None) -> tuple[nn.Module, Path, Resolved]:
    """The trained backbone of ``target`` on the CPU, float32, in eval mode; the experiment file it was built
    from; and that experiment resolved. ``target``: a run folder (its latest checkpoint, else its backbone.pt) or
    a weights file, whose experiment is ``config``, else found as ``sslcore eval`` finds it."""
    import torch

    from sslcore.commands.evaluate import find_target
    from sslcore.commands.evaluate import load_backbone as load
    from sslcore.engine.rundir import RunDir

    if target.is_dir() and config is None and not RunDir(target).has_config():
        raise UserError(f"{target}: no {RunDir.CONFIG}; give the folder of a run (runs/<name>)")
    found = find_target(target, registry, config, device="cpu", command="export")
    backbone = load(found, registry).backbone  # per-image state sized as in the checkpoint, as for sslcore eval
    return backbone.to(torch.float32, memory_format=torch.contiguous_format).eval(), found.config_file, found.resolved


def _make_parent(output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"sslcore export -o {output}: cannot make its folder ({exc.strerror or exc}); give a "
                        "writable path") from None


def onnx_modules() -> tuple[ModuleType, ModuleType]:
    """``onnx`` and ``onnxruntime``, and ``onnxscript`` imported (torch's exporter needs it); one line naming the
    extra when one is missing."""
    missing = []
    modules = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"sslcore export --format onnx needs {', '.join(missing)}, not installed: {ONNX_INSTALL}")
    return modules["onnx"], modules["onnxruntime"]


@dataclass
class OnnxCheck:
    """What was written and how closely onnxruntime computes what torch does."""

    opset: int
    input_shape: list[int | str]  # the dynamic axis by its name
    output_shape: list[int | str]
    batches: list[int]  # the batch sizes compared
    max_difference: float
    tolerance: float

    def line(self, path: Path) -> str:
        def shape(dims: list[int | str]) -> str:
            return " x ".join(str(d) for d in dims)

        return (f"wrote {path}: ONNX opset {self.opset}, input {INPUT_NAME} {shape(self.input_shape)} float32 "
                f"(batch dynamic), output {OUTPUT_NAME} {shape(self.output_shape)}; onnxruntime matches torch at "
                f"batch {' and '.join(map(str, self.batches))}: max |difference| {self.max_difference:.2g} <= "
                f"tolerance {self.tolerance:.2g} ({RELATIVE_TOLERANCE:g} x max |feature|)")


def export_onnx(backbone: nn.Module, output: Path, image_size: int, opset: int | None = None) -> OnnxCheck:
    """Write ``backbone`` (eval mode, float32) to ``output`` as ONNX with a dynamic batch axis, then check the file
    (:func:`check_onnx`); a UserError when torch cannot export it or the file does not compute what torch does."""
    import torch
    from torch.onnx.errors import OnnxExporterError

    onnx_modules()
    batches = [_check_images(batch, image_size) for batch in CHECK_BATCHES]
    batch = torch.export.Dim("batch")
    # a version the exporter cannot convert to is logged with its traceback; the opset check below says it in a line
    converter_log = logging.getLogger("onnxscript.version_converter")
    level = converter_log.level
    converter_log.setLevel(logging.CRITICAL)
    try:
        program = torch.onnx.export(backbone, (batches[0],), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), opset_version=opset,
                                    verbose=False)
    except OnnxExporterError as exc:
        raise UserError(f"sslcore export --format onnx: torch.onnx cannot export this {type(backbone).__name__} "
                        f"({_reason(exc)}); --format state_dict writes every encoder") from None
    finally:
        converter_log.setLevel(level)
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        raise UserError(f"sslcore export --opset {opset}: torch's exporter could not convert this "
                        f"{type(backbone).__name__} to opset {opset} (it stays at {written}); give a lower one, or "
                        "leave --opset out for its default")
    program.save(output)  # weights inside the file; beside it (OUTPUT.data) only past protobuf's 2 GB
    return check_onnx(output, backbone, batches)


def _check_images(batch: int, image_size: int) -> torch.Tensor:
    """A seeded batch x 3 x S x S of standard normal values: the scale of normalised images."""
    import torch

    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def check_onnx(path: Path, backbone: nn.Module, batches: list[torch.Tensor]) -> OnnxCheck:
    """``onnx.checker`` on the file, then onnxruntime's features against ``backbone``'s on each batch; the file is
    removed and a UserError raised when it fails, so that a file at ``path`` is one that passed."""
    import numpy as np
    import torch

    onnx, onnxruntime = onnx_modules()
    runtime_errors = onnxruntime.capi.onnxruntime_pybind11_state
    failures = (_Mismatch, onnx.checker.ValidationError, onnx.shape_inference.InferenceError, runtime_errors.Fail,
                runtime_errors.InvalidGraph, runtime_errors.InvalidArgument, runtime_errors.NotImplemented,
                runtime_errors.RuntimeException)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        differences, scale = [], 0.0
        for images in batches:
            with torch.no_grad():
                expected = backbone(images).numpy()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
            if got.shape != expected.shape:
                raise _Mismatch(f"onnxruntime gives features of shape {got.shape} for a batch of {len(images)}, "
                                f"torch {expected.shape}")
            differences.append(float(np.abs(got - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
        worst, tolerance = max(differences), RELATIVE_TOLERANCE * scale
        if not worst <= tolerance:  # also NaN
            raise _Mismatch(f"onnxruntime's features differ from torch's by up to {worst:.2g} at batch "
                            f"{len(batches[differences.index(worst)])}, above the tolerance {tolerance:.2g}")
    except failures as exc:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        raise UserError(f"{path}: the ONNX file fails its check ({_reason(exc)}); removed. --format state_dict "
                        "writes every encoder") from None
    model = onnx.load(str(path), load_external_data=False)
    return OnnxCheck(opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     input_shape=_dims(model.graph.input[0]), output_shape=_dims(model.graph.output[0]),
                     batches=[len(images) for images in batches], max_difference=worst, tolerance=tolerance)


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong: of the exception the exporter wraps, when it does (its own message is
    advice on debugging torch.export), without terminal colours."""
    cause = exc.__cause__ or exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    return next((line.strip() for line in text.splitlines() if line.strip()), type(cause).__name__)[:300]


class _Mismatch(Exception):
    """onnxruntime's output is not torch's."""


def _dims(value: Any) -> list[int | str]:
    """An ONNX graph input's or output's shape: sizes, and the names of dynamic axes."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
