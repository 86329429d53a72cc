"""``sslcore new-plugin``: every kind gives a distribution whose component meets its kind's contract; a generated
method installs into a fresh virtual environment and passes its own tests as written; a NAME that cannot be used
and a folder that is not empty are refused in one line, exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import sslcore
from sslcore.commands.cli import main
from sslcore.commands.new_plugin import KINDS, TEMPLATES
from sslcore.registry import KIND_HOOKS, Registry
from sslcore.testing import check_plugin


def new_plugin(*argv: str) -> int:
    """``sslcore new-plugin ARGV`` in this process; its exit code."""
    return main(["new-plugin", *argv])


def test_every_kind_of_sslcore_has_its_templates() -> None:
    assert tuple(KIND_HOOKS) == KINDS
    for kind in KINDS:
        assert {p.name for p in (TEMPLATES / kind).iterdir()} >= {"about.md.tmpl", "usage.md.tmpl",
                                                                   "plugin.py.tmpl", "test.py.tmpl"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_a_plugin_that_meets_its_contract(kind: str, tmp_path: Path, registry: Registry,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = f"generated_{kind}"
    module = f"sslcore_{name}"

    assert new_plugin(name, "--kind", kind, "-o", str(tmp_path)) == 0

    root = tmp_path / f"sslcore-{name}"
    written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert written >= {"pyproject.toml", "README.md", f"src/{module}/__init__.py", f"src/{module}/plugin.py",
                       f"tests/test_{name}.py"}
    out = capsys.readouterr().out.splitlines()
    assert {line.strip() for line in out} >= written  # every file it wrote, listed
    assert out[-3:] == [f"  pip install -e {root}", f"  pytest {root}/tests", "  sslcore plugins"]
    pyproject = (root / "pyproject.toml").read_text().splitlines()
    assert f'name = "sslcore-{name}"' in pyproject
    assert f'dependencies = ["sslcore>={sslcore.__version__}"]' in pyproject
    entry_points = pyproject.index("[project.entry-points.sslcore]")
    assert pyproject[entry_points + 1:entry_points + 3] == [f'{name} = "{module}.plugin"', ""]
    assert f"check_plugin(registry, \"{module}.plugin\", [(\"{kind}\", \"{name}\")])" in \
        (root / "tests" / f"test_{name}.py").read_text()
    monkeypatch.syspath_prepend(str(root / "src"))
    try:
        check_plugin(registry, f"{module}.plugin", [(kind, name)])
    finally:
        for loaded in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
            del sys.modules[loaded]


@pytest.fixture
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new virtual environment that installs into its own site-packages and sees this
    environment's packages: a .pth file there adds ours as a site directory (so that their own .pth files,
    sslcore's editable install among them, are read). Offline and without copying a package."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                         capture_output=True, text=True, timeout=60).stdout.strip()
    Path(own, "sslcore_test_environment.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    return python


def test_a_generated_method_installs_and_passes_its_own_tests(tmp_path: Path, fresh_python: Path,
                                                              cifar10_dir: Path) -> None:
    """As a user would: generate, ``pip install -e`` (no dependencies to fetch: sslcore and torch are there),
    ``pytest DIR/tests`` with that environment's interpreter, which sees the distribution's entry point."""
    new_plugin("generated_e2e_method", "--kind", "method", "-o", str(tmp_path))
    root = tmp_path / "sslcore-generated_e2e_method"
    install = subprocess.run([fresh_python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "--disable-pip-version-check", "-e", str(root)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # the images: where the cifar10_dir fixture found them (the same cache); the entry points: autoloaded
    env = {key: value for key, value in os.environ.items() if key != "SSLCORE_DISABLE_PLUGIN_AUTOLOAD"}

    result = subprocess.run([fresh_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    tests = re.findall(r"^def test_", (root / "tests" / "test_generated_e2e_method.py").read_text(), re.MULTILINE)
    assert f"{len(tests)} passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(("name", "fix"), [
    ("My-Loss", "use lower-case letters, digits and underscores, starting with a letter such as 'my_loss'"),
    ("2nd", "starting with a letter such as 'my_2nd'"),
    ("info_nce", "sslcore already registers a loss 'info_nce' (NAME); choose another name"),
    ("simclr", "a module sslcore_simclr is already installed (NAME); choose another name"),
    ("paired", "would make src/sslcore_paired/plugin.py define PairedLoss, which it also imports"),
])
def test_a_name_that_cannot_be_used_is_refused_in_one_line(name: str, fix: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert new_plugin(name, "--kind", "loss", "-o", str(tmp_path)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: sslcore new-plugin: ") and fix in line
    assert not any(tmp_path.iterdir())


def test_an_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_code:
        new_plugin("mine", "--kind", "losses")
    assert exit_code.value.code == 2 and "invalid choice: 'losses'" in capsys.readouterr().err


def test_a_folder_that_is_not_empty_is_refused_and_left_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # -o defaults to the current folder
    target = tmp_path / "sslcore-mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert new_plugin("mine", "--kind", "loss") == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: sslcore new-plugin: sslcore-mine already exists and is not empty; choose another NAME or -o DIR, "
        "or remove it"]
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (target / "notes.txt").unlink()
    assert new_plugin("mine", "--kind", "loss") == 0  # an empty folder is used
    assert (target / "src" / "sslcore_mine" / "plugin.py").is_file()
    assert "  pip install -e ./sslcore-mine" in capsys.readouterr().out.splitlines()
