"""``sslcore validate`` refuses what cannot work, before anything trains: a component that does not fit its
slot's protocol (with the components that would), a source that needs indices under a method that gives
none, split-BN groups larger than the per-worker batch allows, an encoder and augmentation of different image
sizes. Each is one line with file:line and the key, and exit code 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sslcore.testing import run_cli

MOCO_SIMCLR = ["-p", "sslcore_moco.plugin", "-p", "sslcore_simclr.plugin"]


def validate(tmp_path: Path, text: str, *args: str) -> tuple[int, list[str], Path]:
    path = tmp_path / "experiment.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    out = run_cli("validate", str(path), *args, cwd=tmp_path, autoload=False)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stderr.strip().splitlines(), path


@pytest.fixture
def data(cifar10_subset: dict) -> str:
    return f"data: {{name: image_folder, root: {cifar10_subset['train']}}}"


def test_a_paired_loss_in_a_contrastive_slot(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: moco
        loss: {{name: nt_xent}}
        {data}
        """, *MOCO_SIMCLR)
    assert code == 2
    assert lines == [f"error: {path}:2: loss.name: method 'moco' needs ContrastiveLoss (a contrastive loss: "
                     "loss(q, k, negatives, exclude), each query against its key and K negatives) in its loss slot "
                     "and 'nt_xent' is a PairedLoss; losses that fit: contrastive_margin, info_nce, triplet"]


def test_a_contrastive_loss_in_a_paired_slot(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: simclr
        loss: {{name: info_nce, temperature: 0.5}}
        {data}
        """, *MOCO_SIMCLR)
    assert code == 2
    (line,) = lines
    assert line.startswith(f"error: {path}:2: loss.name: method 'simclr' needs PairedLoss (a paired loss: "
                           "loss(z1, z2), the embeddings of two views of the same N images)")
    assert line.endswith("and 'info_nce' is a ContrastiveLoss; losses that fit: nt_xent")


INDEXLESS_METHOD = '''
import torch
from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, ContrastiveLoss, Encoder, Method, NegativeSource, Slot


class Contrast(torch.nn.Module, Method):
    """A contrastive method that does not declare uses_index: its negatives get no dataset ids."""

    def __init__(self, config, *, context, slots):
        super().__init__()
        self.backbone = slots.build("encoder")
        self.negative_source = slots.build("negatives", dim=self.backbone.feature_dim)
        self.loss = slots.build("loss")

    def forward(self, views):
        q = torch.nn.functional.normalize(self.backbone(views[0]), dim=1)
        k = torch.nn.functional.normalize(self.backbone(views[1]), dim=1).detach()
        negatives, exclude = self.negative_source.negatives(q, k)
        return {"loss": self.loss(q, k, negatives, exclude)}


@hookimpl
def register_methods(register):
    register("contrast", Contrast, slots={
        "encoder": Slot(Encoder, {"name": "resnet18"}), "augmentation": Slot(Augmentation, {"name": "moco_v2"}),
        "negatives": Slot(NegativeSource, {"name": "in_batch"}), "loss": Slot(ContrastiveLoss, {"name": "info_nce"})},
        recipe={})
'''


def test_a_source_that_needs_indices_under_a_method_that_gives_none(tmp_path: Path, data: str) -> None:
    (tmp_path / "tp_contrast.py").write_text(INDEXLESS_METHOD)
    code, lines, path = validate(tmp_path, f"""
        method: contrast
        negatives: {{name: memory_bank}}
        {data}
        """, "-p", "tp_contrast")
    assert code == 2
    assert lines == [f"error: {path}:2: negatives.name: 'memory_bank' needs each image's dataset index and "
                     "method 'contrast' gives none (it does not declare uses_index); negative sources that fit: "
                     "in_batch, queue"]
    code, _, _ = validate(tmp_path, f"method: contrast\nnegatives: {{name: queue, size: 4096}}\n{data}\n",
                          "-p", "tp_contrast")
    assert code == 0


def test_split_bn_groups_larger_than_the_per_worker_batch_allows(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: {{name: moco, bn_splits: 8}}
        encoder: {{name: resnet18}}
        augmentation: {{name: moco_v2, size: 32}}
        {data}
        train: {{batch_size: 8}}
        """, *MOCO_SIMCLR)
    assert code == 2
    assert lines == [f"error: {path}:1: method: shuffle_bn 'split' with bn_splits 8 normalises groups of 1 "
                     "image(s) of the per-worker batch of 8: BN statistics need at least 2 per group; raise "
                     "train.batch_size to 16 or lower method.bn_splits to 4"]


def test_an_encoder_for_one_image_size_and_views_of_another(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: moco
        encoder: {{name: vit_tiny, image_size: 32, patch_size: 4, depth: 1}}
        augmentation: {{name: moco_v2, size: 64}}
        {data}
        """, *MOCO_SIMCLR)
    assert code == 2
    assert lines == [f"error: {path}:2: encoder: the encoder takes 32 px images and the augmentation makes 64 px "
                     "ones; make them agree (the encoder's image_size, the augmentation's size, or "
                     "dynamic_img_size: true for multi-crop)"]


def test_a_vit_of_any_size_needs_views_its_patch_size_divides(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: moco
        encoder: {{name: vit_tiny, image_size: 32, patch_size: 8, depth: 1, dynamic_img_size: true}}
        augmentation: {{name: swav, size: 32, local_size: 12}}
        {data}
        """, *MOCO_SIMCLR)
    assert code == 2
    assert lines == [f"error: {path}:2: encoder: the encoder's patch size 8 does not divide the augmentation's "
                     "12 px views; use sizes that it divides"]
    code, lines, path = validate(tmp_path, f"""
        method: moco
        encoder: {{name: vit_tiny, image_size: 32, patch_size: 8, depth: 1, dynamic_img_size: true}}
        augmentation: {{name: swav, size: 32, local_size: 16}}
        {data}
        """, *MOCO_SIMCLR)
    assert (code, lines) == (0, []), lines


def test_an_unknown_parameter_group(tmp_path: Path, data: str) -> None:
    code, lines, path = validate(tmp_path, f"""
        method: moco
        {data}
        train:
          param_groups: {{predictor: {{fixed_lr: true}}}}
        """, *MOCO_SIMCLR)
    assert code == 2
    assert lines == [f"error: {path}:4: train.param_groups.predictor: method 'moco' has no parameter group "
                     "'predictor' (choose from: bias_and_norm)"]


BROKEN_ENCODER = '''
import torch
from sslcore import hookimpl


@hookimpl
def register_encoders(register):
    def sizeless(config):
        encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        encoder.feature_dim = 4  # and no input_size: not an Encoder
        return encoder

    register("sizeless", sizeless)
'''


def test_a_built_component_that_misses_its_protocol(tmp_path: Path, data: str) -> None:
    (tmp_path / "tp_sizeless.py").write_text(BROKEN_ENCODER)
    code, lines, path = validate(tmp_path, f"method: moco\nencoder: {{name: sizeless}}\n{data}\n",
                                 *MOCO_SIMCLR, "-p", "tp_sizeless")
    assert code == 2
    assert lines == [f"error: {path}:2: encoder.name: 'sizeless' built a Sequential that does not meet Encoder: "
                     "it lacks input_size"]


UNDECLARED_LOSS = '''
import torch
from sslcore import hookimpl


class Plain(torch.nn.Module):
    def forward(self, q, k, negatives, exclude=None):
        return (q * k).sum()


@hookimpl
def register_losses(register):
    register("plain", Plain)
'''


def test_a_loss_must_declare_its_call(tmp_path: Path) -> None:
    (tmp_path / "tp_plain.py").write_text(UNDECLARED_LOSS)
    out = run_cli("plugins", "-p", "tp_plain", cwd=tmp_path, autoload=False)
    assert out.returncode == 2  # a module named with -p that cannot be loaded is an error, as under plugins:
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: -p tp_plain: cannot load it")
    assert "loss 'plain': declare its call by subclassing" in line


def test_validate_resolved_prints_what_will_run(tmp_path: Path, data: str) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(f"method: moco\n{data}\ntrain: {{batch_size: 512}}\n")
    out = run_cli("validate", str(path), "--resolved", *MOCO_SIMCLR, cwd=tmp_path, autoload=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == ("# peak lr = base lr x 512/256 (train.lr_scaling: linear), then warmup 0 epochs and "
                        "cosine schedule to 0 x peak")
    assert lines[2].startswith("# param group rest (") and lines[2].endswith("peak lr 0.06, weight decay 0.0001")
    import yaml

    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["epochs"] == 200 and resolved["train"]["batch_size"] == 512
    assert resolved["negatives"] == {"name": "queue", "size": 65536}
