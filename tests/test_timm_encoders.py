"""timm encoders (``encoder: {name: timm, model: ...}``): the encoder contract for a ResNet, a ConvNeXt and a
ViT, the ViT's PatchEncoder pieces through a real MAE step, the state_dict loaded strictly into a fresh
``timm.create_model`` by a python that cannot import sslcore, the one-line errors (an unknown model, a model
without the pieces MAE needs, timm not installed), ``sslcore validate`` and a brief ``sslcore run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch

from sslcore import hookimpl
from sslcore.api.errors import ConfigError
from sslcore.api.hookspecs import PatchEncoder
from sslcore.components.timm_encoders import TimmConfig, timm_encoder
from sslcore.config import resolve
from sslcore.registry import Registry
from sslcore.testing import build_for_training, check_component, run_example_briefly

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VIT = {"model": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}  # ViT-Ti/4 at 32 px: 64 patches

#: the small variant of each family, its block, its feature_dim (timm's num_features) and its input_size
FAMILIES = {"resnet18": ({"model": "resnet18"}, 512, None), "convnext_atto": ({"model": "convnext_atto"}, 320, None),
            "vit_tiny": (VIT, 192, 32)}


class TimmFamilies:
    """A test plugin: each family's block as an encoder of its own, built from defaults, for the contract."""

    @hookimpl
    def register_encoders(self, register):
        for name, (block, _, _) in FAMILIES.items():
            fields = {key: (TimmConfig.model_fields[key].annotation, value) for key, value in block.items()}
            config = pydantic.create_model(f"Timm_{name}", __base__=TimmConfig, **fields)
            register(f"timm_{name}", timm_encoder, config=config, provides=PatchEncoder)


def experiment(encoder: dict, data: Path) -> dict:
    """MAE (a small decoder) at 32 px on ``data``, batch 8, with ``encoder``."""
    return {"name": "timm_mae", "method": {"name": "mae", "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4,
                                           "picture_every_epochs": 0},
            "encoder": {"name": "timm", **encoder}, "augmentation": {"name": "mae", "size": 32},
            "data": {"name": "image_folder", "root": str(data)}, "train": {"batch_size": 8}}


@pytest.fixture
def with_mae(registry: Registry):
    registry.add_module("sslcore_mae.plugin")
    try:
        yield registry
    finally:
        registry.remove_plugin("sslcore_mae.plugin")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_meets_the_encoder_contract(registry: Registry, family: str) -> None:
    block, feature_dim, input_size = FAMILIES[family]
    registry.add_plugin(TimmFamilies(), name="timm_families")
    try:
        check_component(registry, "encoder", f"timm_{family}")
    finally:
        registry.remove_plugin("timm_families")
    encoder = registry.build("encoder", {"name": "timm", **block})
    assert (encoder.feature_dim, encoder.input_size) == (feature_dim, input_size)
    assert encoder.feature_dim == encoder.num_features
    assert isinstance(encoder, PatchEncoder) == (family == "vit_tiny")


def test_the_vit_pieces_are_timms_own(registry: Registry) -> None:
    vit = registry.build("encoder", {"name": "timm", **VIT}).eval()
    x = torch.randn(2, 3, 32, 32)
    assert (vit.patch_size, vit.grid_size, vit.num_patches) == (4, 8, 64)
    assert vit.class_token is vit.cls_token and vit.position_embedding is vit.pos_embed
    assert vit.position_embedding.shape == (1, 65, 192) and vit.class_token.shape == (1, 1, 192)
    # the pieces, put together as MAE puts them (all patches kept), are timm's forward
    tokens = torch.cat([(vit.class_token + vit.position_embedding[:, :1]).expand(2, -1, -1),
                        vit.embed_patches(x) + vit.position_embedding[:, 1:]], dim=1)  # N x (1 + L) x D
    torch.testing.assert_close(vit.norm(vit.blocks(tokens))[:, 0], vit(x))


def test_dynamic_img_size_takes_the_sizes_patch_size_divides(registry: Registry) -> None:
    vit = registry.build("encoder", {"name": "timm", **VIT, "dynamic_img_size": True})
    assert vit.input_size is None and isinstance(vit, PatchEncoder)
    assert vit(torch.randn(2, 3, 16, 16)).shape == vit(torch.randn(2, 3, 48, 48)).shape == (2, 192)  # multi-crop
    assert vit.embed_patches(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)


def test_a_mae_step_trains_a_timm_vit_with_fixed_sincos_embeddings(with_mae: Registry, tmp_path: Path) -> None:
    from sslcore.components.encoders import sincos_position_embedding
    from sslcore.engine.build import build, check_input_size

    resolved = resolve(experiment({**VIT, "position_embedding": "sincos"}, tmp_path), with_mae).as_dict()
    method, optimization = build_for_training(resolved, with_mae)
    augmentation = build(with_mae, "augmentation", ("augmentation",), resolved["augmentation"])
    check_input_size(method, augmentation)
    vit = method.backbone
    expected = torch.cat([torch.zeros(1, 192), sincos_position_embedding(192, 8)])[None]
    assert torch.equal(vit.pos_embed, expected) and not vit.pos_embed.requires_grad
    views = [torch.stack([augmentation.views(image)[0] for image in
                          torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).numpy()])]
    before = vit.blocks[0].attn.qkv.weight.detach().clone()
    loss = method(views)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert vit.blocks[-1].mlp.fc2.weight.grad is not None and vit.cls_token.grad is not None
    optimization.optimizer.step()
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, before)
    assert torch.equal(vit.pos_embed, expected)  # fixed, as MAE's official models_mae.py


#: run by a python in which ``import sslcore`` fails: each case's state_dict into a fresh timm model
LOAD_WITHOUT_SSLCORE = """
import json, sys
sys.modules["sslcore"] = None  # any import of sslcore, direct or not, raises ImportError
import timm, torch
torch.set_num_threads(1)  # as the tests: timm's initialisation took seconds with 2 on a busy 2-core machine
torch.manual_seed(1)  # another initialisation than the saved weights'
for case in json.loads(sys.argv[1]):
    model = timm.create_model(case["model"], **case["kwargs"])
    model.load_state_dict(torch.load(case["weights"], weights_only=True), strict=True)
    saved = torch.load(case["io"], weights_only=True)
    torch.testing.assert_close(model.eval()(saved["x"]), saved["y"])
    print("loaded", case["model"])
"""


def test_the_state_dict_loads_strictly_into_plain_timm_without_sslcore(with_mae: Registry, tmp_path: Path) -> None:
    vit_block = {**VIT, "position_embedding": "sincos", "drop_path_rate": 0.1}
    method, _ = build_for_training(resolve(experiment(vit_block, tmp_path), with_mae).as_dict(), with_mae)
    encoders = {"vit": (vit_block, method.backbone)}  # the backbone sslcore export writes
    for family in ("resnet18", "convnext_atto"):
        block = FAMILIES[family][0]
        encoders[family] = (block, with_mae.build("encoder", {"name": "timm", **block}))
    cases = []
    for name, (block, encoder) in encoders.items():
        encoder(torch.randn(4, 3, 32, 32))  # a training step's forward: BatchNorm running statistics move
        x = torch.randn(2, 3, 32, 32)
        torch.save(encoder.state_dict(), tmp_path / f"{name}.pt")
        torch.save({"x": x, "y": encoder.eval()(x).detach()}, tmp_path / f"{name}_io.pt")
        cases.append({"model": block["model"], "kwargs": TimmConfig(**block).create_kwargs(),
                      "weights": str(tmp_path / f"{name}.pt"), "io": str(tmp_path / f"{name}_io.pt")})
    assert cases[0]["kwargs"] == {"pretrained": False, "num_classes": 0, "img_size": 32, "patch_size": 4,
                                  "drop_path_rate": 0.1}
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SSLCORE, json.dumps(cases)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["loaded", "vit_tiny_patch16_224", "loaded", "resnet18", "loaded", "convnext_atto"]


def test_an_unknown_model_is_one_line_naming_the_key_and_close_names(with_mae: Registry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(experiment({"model": "resnet19"}, tmp_path), with_mae, source="exp.yaml")
    [line] = error.value.lines
    assert line.startswith("exp.yaml: encoder.model: ") and "\n" not in line
    assert "unknown timm model 'resnet19' — did you mean 'resnet18'" in line
    with pytest.raises(ConfigError, match=r"exp.yaml: encoder.pretrained: unknown key 'pretrained'"):  # never offered
        resolve(experiment({"model": "resnet18", "pretrained": True}, tmp_path), with_mae, source="exp.yaml")


def test_a_model_without_the_vit_pieces_is_refused_under_mae(with_mae: Registry, tmp_path: Path) -> None:
    from sslcore.engine.launch import dry_build

    resolved = resolve(experiment({"model": "resnet18"}, tmp_path), with_mae, source="exp.yaml")  # fits by name
    with pytest.raises(ConfigError, match=r"exp.yaml: encoder.name: 'timm' built a ResNet that does not meet "
                                          r"PatchEncoder: it lacks blocks, class_token, embed_patches"):
        dry_build(resolved, with_mae, dataset_size=8)
    with pytest.raises(ValueError, match="timm model 'resnet18' takes no img_size; remove it"):
        with_mae.build("encoder", {"name": "timm", "model": "resnet18", "img_size": 32})


def test_sslcore_validate_an_experiment_with_a_timm_vit(cifar10_subset: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from sslcore.commands.cli import main

    monkeypatch.setenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", "1")  # MAE by -p, installed plugins left out
    path = tmp_path / "timm_mae.yaml"
    path.write_text(yaml.safe_dump(experiment({**VIT, "position_embedding": "sincos"}, cifar10_subset["train"])))
    assert main(["validate", str(path), "-p", "sslcore_mae.plugin"]) == 0, capsys.readouterr().err
    assert f"{path}: ok (method=mae, encoder=timm, augmentation=mae" in capsys.readouterr().out


def test_without_timm_the_block_says_what_to_install(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("method: moco\nencoder: {name: timm, model: resnet18}\n"
                    "data: {name: image_folder, root: .}\n")
    child = ("import sys; sys.modules['timm'] = None\n"  # as if timm were not installed: import timm fails
             "from sslcore.commands.cli import main\n"
             f"sys.exit(main(['validate', {str(path)!r}, '-p', 'sslcore_moco.plugin']))")
    env = {**os.environ, "SSLCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert errors == [f"error: {path}:2: encoder: timm is not installed: pip install sslcore[timm]"]


def test_a_brief_moco_run_with_a_timm_resnet(cifar10_dir: Path, tmp_path: Path) -> None:
    import timm

    run = run_example_briefly(EXAMPLES / "moco_cifar10.yaml", cifar10_dir, tmp_path,
                              "encoder={name: timm, model: resnet18}")
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    plain.load_state_dict(torch.load(run / "backbone.pt", weights_only=True), strict=True)
