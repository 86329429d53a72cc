"""The engine around a method's step: on_step_start tells forward the step, before_optimizer_step sees the
gradients and can freeze a part (SwAV's prototypes, DINO's last layer), gradient clipping bounds the step, a
plugin adds an optimizer. Real runs of
``sslcore run`` on real images, with a method written here as a plugin module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sslcore.testing import run_cli

TOY_PLUGIN = '''
import torch
from pydantic import BaseModel
from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, Method, Slot


class ToyConfig(BaseModel):
    frozen_steps: int = 0


class Toy(torch.nn.Module, Method):
    """backbone + head, loss |head(backbone(x))|^2; the head gets no gradient for the first frozen_steps."""

    def __init__(self, config, *, context, slots):
        super().__init__()
        self.backbone = slots.build("encoder")
        self.head = torch.nn.Linear(self.backbone.feature_dim, 4)
        self.frozen_steps = config.frozen_steps
        self.register_buffer("start", torch.cat([p.detach().flatten().clone() for p in self.parameters()]))
        self.register_buffer("head_start", self.head.weight.detach().clone())

    def forward(self, views, index=None):
        now = torch.cat([p.detach().flatten() for p in self.parameters()])
        return {"loss": self.head(self.backbone(views[0])).float().square().mean(),
                "head_change": (self.head.weight - self.head_start).abs().sum().detach(),
                "change": (now - self.start).norm(), "step_seen": torch.tensor(float(self.step_seen))}

    def on_step_start(self, step):
        self.step_seen = step.index

    def before_optimizer_step(self, step):
        if step.index < self.frozen_steps:
            self.head.weight.grad = None


@hookimpl
def register_methods(register):
    register("toy", Toy, config=ToyConfig, recipe={"optimizer": {"name": "sgd", "lr": 0.1}},
             slots={"encoder": Slot(Encoder, {"name": "resnet18"}),
                    "augmentation": Slot(Augmentation, {"name": "moco_v2", "size": 32})})


class RMSpropConfig(BaseModel):
    lr: float = 0.01
    weight_decay: float = 0.0
    alpha: float = 0.99


@hookimpl
def register_optimizers(register):
    register("rmsprop", lambda config, param_groups: torch.optim.RMSprop(
        param_groups, lr=config.lr, alpha=config.alpha, weight_decay=config.weight_decay), config=RMSpropConfig)
'''


def run_toy(tmp_path: Path, subset: Path, name: str, method: str, train: str) -> list[dict]:
    (tmp_path / "tp_toy.py").write_text(TOY_PLUGIN)
    (tmp_path / f"{name}.yaml").write_text(f"""
name: {name}
method: {method}
data: {{name: image_folder, root: {subset}}}
train: {{epochs: 1, batch_size: 8, max_steps_per_epoch: 4, log_every_steps: 1, {train}}}
scaling: {{backend: local}}
tracking: {{aim: null, progress_bar: false}}
""")
    out = run_cli("run", f"{name}.yaml", "-p", "tp_toy", cwd=tmp_path, autoload=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["subset"] == "train"]


def test_before_optimizer_step_freezes_a_part_for_the_first_steps(tmp_path: Path, cifar10_subset: dict) -> None:
    records = run_toy(tmp_path, cifar10_subset["train"], "frozen", "{name: toy, frozen_steps: 2}",
                      "lr_scaling: none")
    # forward k sees the weights after k steps: steps 0 and 1 left the head alone, step 2 moved it
    assert [r["head_change"] == 0 for r in records] == [True, True, True, False]
    assert records[1]["change"] > 0  # the backbone trained meanwhile


def test_on_step_start_tells_forward_the_step_it_is_part_of(tmp_path: Path, cifar10_subset: dict) -> None:
    records = run_toy(tmp_path, cifar10_subset["train"], "steps", "toy", "lr_scaling: none")
    assert [r["step_seen"] for r in records] == [0.0, 1.0, 2.0, 3.0]


def test_grad_clip_bounds_every_step(tmp_path: Path, cifar10_subset: dict) -> None:
    lr, clip = 0.1, 1e-3
    records = run_toy(tmp_path, cifar10_subset["train"], "clipped", "toy",
                      f"lr_scaling: none, grad_clip: {clip}, "
                      f"optimizer: {{name: sgd, lr: {lr}, momentum: 0.0, weight_decay: 0.0}}")
    # plain SGD with the gradient's norm clipped to c moves the parameters by at most lr x c per step
    for k, record in enumerate(records):
        assert record["change"] <= k * lr * clip * (1 + 1e-3)
    assert records[1]["change"] > 0.5 * lr * clip  # the gradients were far larger: the clipping bound is reached


def test_a_plugin_adds_an_optimizer(tmp_path: Path, cifar10_subset: dict) -> None:
    records = run_toy(tmp_path, cifar10_subset["train"], "rmsprop", "toy",
                      "lr_scaling: none, optimizer: {name: rmsprop, lr: 0.001}")
    # the lr logged after step k is the next step's: the cosine at (k + 1) / 4
    expected = [0.001 * 0.5 * (1 + math.cos(math.pi * (k + 1) / 4)) for k in range(4)]
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-12)
    assert records[-1]["change"] > 0
