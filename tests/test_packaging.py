"""Packaging: one distribution, import packages mapped from sw/, hw/, sim/, cli/, bench/."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"sw": "superfloat.sw", "hw": "superfloat.hw", "sim": "superfloat.sim", "cli": "superfloat.cli",
           "bench": "superfloat.bench"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, pkg in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    missing = found - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_console_script_declared():
    assert _pyproject()["project"]["scripts"]["sfx"] == "superfloat.cli:main"


def test_wheel_contains_the_packages(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (whl,) = tmp_path.glob("superfloat-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for path in ("superfloat/sw/sfx.py", "superfloat/hw/interface.py", "superfloat/sim/__init__.py",
                 "superfloat/cli/__init__.py", "superfloat/bench/__init__.py"):
        assert path in names
