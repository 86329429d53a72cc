"""``sslcore export``: the backbone of a run's latest checkpoint as a plain ``state_dict``.

For the torchvision ResNets the file loads with no sslcore import::

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    # with cifar_stem: true also
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

For a timm encoder (``encoder: {name: timm, model: M, ...}``) it loads, with no sslcore import, into timm's own
model, given those of the block's img_size, patch_size, dynamic_img_size and drop_path_rate that it sets::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

Beside it goes the run's experiment (``backbone.yaml`` for ``backbone.pt``), from which ``sslcore eval``
rebuilds the encoder and its eval transform.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sslcore.api.errors import UserError
from sslcore.config import resolve
from sslcore.engine.launch import dry_build
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry


def export_backbone(run_dir: Path, output: Path, registry: Registry) -> Path:
    run = RunDir(run_dir)
    if not run.has_config():
        raise UserError(f"{run_dir}: no {RunDir.CONFIG}; give the folder of a run (runs/<name>)")
    latest = run.latest_checkpoint()
    if latest is None:
        raise UserError(f"{run_dir}: no checkpoint yet; train at least checkpoint.every_epochs epochs")
    resolved = resolve(run.read_config(), registry, source=str(run.config_file))
    state = RunDir.load_checkpoint(latest)
    method = dry_build(resolved, registry, dataset_size=state.get("dataset_size"))
    method.load_state_dict(state["model"])
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.backbone.state_dict(), output)
    output.with_suffix(".yaml").write_text(run.config_file.read_text())
    return output
