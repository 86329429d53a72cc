"""Plugin discovery: real entry points of real (tmp) distributions, broken plugins, clashes, autoload off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sslcore.registry import Registry

LOSS_PLUGIN = """
import torch
from pydantic import BaseModel
from sslcore import hookimpl
from sslcore.api.hookspecs import ContrastiveLoss


class ScaledConfig(BaseModel):
    scale: float = 1.0


class Scaled(torch.nn.Module, ContrastiveLoss):
    def __init__(self, config):
        super().__init__()
        self.scale = config.scale

    def forward(self, q, k, negatives, exclude=None):
        return -self.scale * (q * k).sum(1).mean()


@hookimpl
def register_losses(register):
    register("{name}", Scaled, config=ScaledConfig)
"""


def make_distribution(root: Path, dist: str, module: str, source: str, entry_name: str | None = None) -> None:
    """A real installed-looking distribution: a module plus a .dist-info with an ``sslcore`` entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[sslcore]\n{entry_name or module} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[name]


def test_builtins_register_through_the_hooks() -> None:
    registry = Registry(autoload=False)
    assert "info_nce" in registry.names("loss")
    assert registry.get("loss", "info_nce").distribution == "sslcore"
    builtin = {p.module for p in registry.plugins if p.source == "builtin"}
    assert "sslcore.components.losses" in builtin


def test_entry_point_plugin_is_found_with_its_distribution(site: Path) -> None:
    make_distribution(site, "tp-scaled", "tp_scaled", LOSS_PLUGIN.replace("{name}", "scaled"))
    registry = Registry()
    component = registry.get("loss", "scaled")
    assert component.distribution == "tp-scaled"
    info = next(p for p in registry.plugins if p.name == "tp_scaled")
    assert info.version == "1.2.3" and info.source == "entry_point" and info.components == {"loss": ["scaled"]}


def test_broken_plugin_is_reported_and_skipped(site: Path) -> None:
    make_distribution(site, "tp-broken", "tp_broken", "import module_that_does_not_exist\n")
    make_distribution(site, "tp-fine", "tp_fine", LOSS_PLUGIN.replace("{name}", "fine"))
    registry = Registry()
    assert "fine" in registry.names("loss")
    assert "info_nce" in registry.names("loss")
    (error,) = [e for e in registry.errors if "tp_broken" in e]
    assert "tp-broken" in error and "module_that_does_not_exist" in error


def test_broken_plugin_does_not_break_the_cli(site: Path) -> None:
    make_distribution(site, "tp-broken2", "tp_broken2", "raise RuntimeError('boom at import')\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run([sys.executable, "-m", "sslcore", "plugins", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert "boom at import" in plugins["tp_broken2"]["error"]
    assert plugins["tp_broken2"]["distribution"] == "tp-broken2"
    assert plugins["sslcore.components.losses"]["components"] == {"loss": ["info_nce", "contrastive_margin", "triplet"]}


def test_name_clash_names_both_distributions(site: Path) -> None:
    make_distribution(site, "tp-one", "tp_one", LOSS_PLUGIN.replace("{name}", "twin"))
    make_distribution(site, "tp-two", "tp_two", LOSS_PLUGIN.replace("{name}", "twin"))
    registry = Registry()
    (clash,) = registry.clashes
    assert "tp-one" in clash and "tp-two" in clash and "'twin'" in clash


def test_clash_with_a_builtin_is_refused(site: Path) -> None:
    make_distribution(site, "tp-shadow", "tp_shadow", LOSS_PLUGIN.replace("{name}", "info_nce"))
    registry = Registry()
    assert registry.get("loss", "info_nce").distribution == "sslcore"
    assert any("tp-shadow" in c and "sslcore" in c for c in registry.clashes)


def test_clash_fails_validation(site: Path, tmp_path: Path) -> None:
    from sslcore.api.errors import ConfigError
    from sslcore.config import resolve

    make_distribution(site, "tp-a", "tp_a", LOSS_PLUGIN.replace("{name}", "dup"))
    make_distribution(site, "tp-b", "tp_b", LOSS_PLUGIN.replace("{name}", "dup"))
    registry = Registry(modules=["sslcore_moco.plugin"])
    with pytest.raises(ConfigError, match=r"tp-a.*tp-b"):
        resolve({"method": "moco", "data": {"name": "image_folder", "root": str(tmp_path)}}, registry)


def test_disable_autoload_env_var(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(site, "tp-off", "tp_off", LOSS_PLUGIN.replace("{name}", "off"))
    monkeypatch.setenv("SSLCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = Registry()
    assert "off" not in registry.names("loss")
    assert "info_nce" in registry.names("loss")
    registry.add_module("tp_off")  # -p still works with autoload off
    assert "off" in registry.names("loss")


def test_extra_module_from_experiment_file(site: Path, tmp_path: Path) -> None:
    from sslcore.config import resolve

    (site / "tp_lab_losses.py").write_text(textwrap.dedent(LOSS_PLUGIN.replace("{name}", "lab_loss")))
    registry = Registry(autoload=False, modules=["sslcore_moco.plugin"])
    resolved = resolve({"method": "moco", "loss": {"name": "lab_loss", "scale": 2.0},
                        "data": {"name": "image_folder", "root": str(tmp_path)}, "plugins": ["tp_lab_losses"]},
                       registry)
    assert resolved.blocks["loss"] == {"name": "lab_loss", "scale": 2.0}


def test_remove_plugin_unregisters_its_components(site: Path) -> None:
    (site / "tp_temp.py").write_text(textwrap.dedent(LOSS_PLUGIN.replace("{name}", "temp_loss")))
    registry = Registry(autoload=False)
    registry.add_module("tp_temp")
    try:
        assert "temp_loss" in registry.names("loss")
    finally:
        registry.remove_plugin("tp_temp")
    assert "temp_loss" not in registry.names("loss")
