"""``sslcore export``: the backbone of a run's latest checkpoint as a plain ``state_dict``.

For the torchvision ResNets the file loads with no sslcore import::

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    # with cifar_stem: true also
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

Beside it goes the run's experiment (``backbone.yaml`` for ``backbone.pt``), from which ``sslcore eval``
rebuilds the encoder and its eval transform.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sslcore.api.errors import UserError
from sslcore.config import resolve
from sslcore.engine.launch import CONFIG_FILE, checkpoints, dry_build
from sslcore.registry import Registry


def export_backbone(run_dir: Path, output: Path, registry: Registry) -> Path:
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{run_dir}: no {CONFIG_FILE}; give the folder of a run (runs/<name>)")
    found = checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoint yet; train at least checkpoint.every_epochs epochs")
    resolved = resolve(yaml.safe_load(config_file.read_text()), registry, source=str(config_file))
    method = dry_build(resolved, registry)
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    method.load_state_dict(state["model"])
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.backbone.state_dict(), output)
    output.with_suffix(".yaml").write_text(config_file.read_text())
    return output
