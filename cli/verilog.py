"""``sfx verilog``: write the accelerator's Verilog (registered in ``cli/__init__.py``)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from superfloat.sw import sfx

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verilog",
        help="generate the Verilog of the SFx accelerator",
        description="Generate the Verilog of the SFx LINEAR accelerator (superfloat.hw.accelerator). "
                    "The output is deterministic; its header lists the parameters, the ports and the payload "
                    "bit fields. Port map and timing: docs/accelerator-ports.md.",
        epilog="example: sfx verilog --rows 8 --cols 8 --a-bits 8 --w-bits 8 --out-bits 8 --k-max 16384 "
               "--dsp-pes 8 -o build/sfx_accelerator.v",
    )
    p.add_argument("--rows", type=int, required=True, help="PE rows: activation rows per tile (1..64)")
    p.add_argument("--cols", type=int, required=True, help="PE columns: output channels per tile (1..64)")
    p.add_argument("--a-bits", type=int, required=True, help="SFx width of activations (2..16)")
    p.add_argument("--w-bits", type=int, required=True, help="SFx width of weights (2..16)")
    p.add_argument("--out-bits", type=int, required=True, help="SFx width of results (2..16)")
    p.add_argument("--k-max", type=int, default=sfx.DEFAULT_K_MAX,
                   help=f"longest reduction K accepted; sets the accumulator width (default {sfx.DEFAULT_K_MAX})")
    p.add_argument("--dsp-pes", type=int, default=0,
                   help="number of PEs (row-major first) whose multiplier uses DSP blocks (default 0: all LUT)")
    p.add_argument("--clamp-impl", choices=("dsp", "lut"), default="dsp",
                   help="multiplier of the clamp unit (default dsp)")
    p.add_argument("--no-overlap-drain", dest="overlap_drain", action="store_false",
                   help="no shadow registers in the PEs (smaller; the array stalls while a tile drains)")
    p.add_argument("--name", default="sfx_accelerator", help="top module name (default sfx_accelerator)")
    p.add_argument("-o", "--output", required=True, help="output file ('-' for standard output)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from superfloat.hw.verilog import generate_verilog

    try:
        text = generate_verilog(rows=args.rows, cols=args.cols, a_bits=args.a_bits, w_bits=args.w_bits,
                                out_bits=args.out_bits, k_max=args.k_max, dsp_pes=args.dsp_pes,
                                clamp_impl=args.clamp_impl, overlap_drain=args.overlap_drain, name=args.name)
    except (TypeError, ValueError) as e:
        print(f"sfx verilog: error: {e}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)   # atomic: never a half-written file
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        print(f"sfx verilog: error: cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(text.splitlines())} lines, module {args.name})", file=sys.stderr)
    return 0
