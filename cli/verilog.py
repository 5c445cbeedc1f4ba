"""``sfx verilog``: write the accelerator's Verilog (registered in ``cli/__init__.py``)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from superfloat.sw import sfx

from .argtypes import int_range, nonneg_int

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verilog",
        help="generate the Verilog of the SFx accelerator",
        description="Generate the Verilog of the SFx LINEAR accelerator (superfloat.hw.accelerator). "
                    "The output is deterministic; its header lists the parameters, the ports and the payload "
                    "bit fields. Port map and timing: docs/accelerator-ports.md.",
        epilog="examples: sfx verilog --rows 8 --cols 8 --a-bits 8 --w-bits 8 --out-bits 8 --k-max 16384 "
               "--dsp-pes 8 -o build/sfx_accelerator.v; "
               "sfx verilog --rows 2 --cols 2 --a-bits 8 --w-bits 8 --out-bits 8 --ip build/sfx_ip --axi "
               "(then: fusesoc --cores-root build/sfx_ip run --target sim superfloat:sfx:sfx_accelerator)",
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
    p.add_argument("--xmult", action="store_true",
                   help="generate the per-row activation multiplier (SPEC revision 2: a 16-bit xmult per "
                        "activation row beside its exponent, for act_scale='float' checkpoints)")
    p.add_argument("--name", default="sfx_accelerator", help="top module name (default sfx_accelerator)")
    p.add_argument("-o", "--output", help="output file ('-' for standard output)")
    ip = p.add_argument_group("IP directory (docs/ip.md)")
    ip.add_argument("--ip", metavar="DIR",
                    help="write an IP directory: the Verilog, a FuseSoC CAPI2 core (targets sim, lint), a "
                         "self-checking Verilog testbench and test vectors from superfloat.sw.sfx.linear")
    ip.add_argument("--axi", action="store_true",
                    help="with --ip: add the AXI4-Stream-named wrapper NAME_axis and a sim_axi target")
    ip.add_argument("--seed", type=nonneg_int, default=0, help="with --ip: seed of the random test vectors (default 0)")
    ip.add_argument("--ops", type=int_range(1, 64), default=4,
                    help="with --ip: number of LINEAR operations in the test vectors (1..64, default 4)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from superfloat.hw.verilog import generate_verilog

    if args.output is None and args.ip is None:
        print("sfx verilog: error: give -o FILE (the Verilog), --ip DIR (an IP directory, docs/ip.md) or both",
              file=sys.stderr)
        return 2
    if args.ip is None and (args.axi or args.seed != 0 or args.ops != 4):
        print("sfx verilog: error: --axi, --seed and --ops apply to the IP directory: add --ip DIR", file=sys.stderr)
        return 2
    if args.ip is not None and args.xmult:
        print("sfx verilog: error: --ip does not support --xmult yet (its test vectors and testbench carry no "
              "per-row multipliers): write the Verilog with -o FILE", file=sys.stderr)
        return 2
    if args.ip is not None and args.output == "-":
        print("sfx verilog: error: -o - (standard output) cannot be combined with --ip: the IP holds the Verilog "
              "in DIR/rtl/", file=sys.stderr)
        return 2
    try:
        text = generate_verilog(rows=args.rows, cols=args.cols, a_bits=args.a_bits, w_bits=args.w_bits,
                                out_bits=args.out_bits, k_max=args.k_max, dsp_pes=args.dsp_pes,
                                clamp_impl=args.clamp_impl, overlap_drain=args.overlap_drain, name=args.name,
                                xmult=args.xmult)
    except (TypeError, ValueError) as e:
        print(f"sfx verilog: error: {e}", file=sys.stderr)
        return 2
    if args.ip is not None:
        rc = _write_ip(args, text)
        if rc or args.output is None:
            return rc
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


def _write_ip(args: argparse.Namespace, text: str) -> int:
    from superfloat.hw.ip import write_ip

    try:
        pkg = write_ip(args.ip, rows=args.rows, cols=args.cols, a_bits=args.a_bits, w_bits=args.w_bits,
                       out_bits=args.out_bits, k_max=args.k_max, dsp_pes=args.dsp_pes, clamp_impl=args.clamp_impl,
                       overlap_drain=args.overlap_drain, name=args.name, axi=args.axi, seed=args.seed,
                       n_ops=args.ops, verilog=text)
    except (TypeError, ValueError) as e:
        print(f"sfx verilog: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sfx verilog: error: cannot write the IP to {args.ip}: {e}", file=sys.stderr)
        return 1
    targets = "sim, sim_axi, lint" if args.axi else "sim, lint"
    print(f"wrote {pkg.root}/ ({len(pkg.files)} files: core {pkg.vlnv}, targets {targets}; "
          f"{pkg.n_ops} operations, {len(pkg.res_beats)} res beats in vectors/)\n"
          f"run the testbench: fusesoc --cores-root {pkg.root} run --target sim {pkg.vlnv}", file=sys.stderr)
    return 0
