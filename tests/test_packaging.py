"""The distributions as pip builds them: every module of the source tree is in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("project", "package_root"),
                         [(ROOT, ROOT), (ROOT / "plugins" / "moco", ROOT / "plugins" / "moco" / "src")],
                         ids=["sslcore", "sslcore-moco"])
def test_wheel_holds_every_module(project: Path, package_root: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(project)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith((".py", ".tmpl"))}
    package = "sslcore" if project == ROOT else "sslcore_moco"
    source = {str(p.relative_to(package_root)) for p in (package_root / package).rglob("*")
              if p.suffix in (".py", ".tmpl")}  # sslcore new-plugin's templates too
    assert source <= packaged, f"missing from the wheel: {sorted(source - packaged)}"
    entry_points = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt")]
    assert entry_points
