"""``sfx cosim``: stream a WASQ checkpoint's layers through the simulated accelerator (docs/cosim.md).

Exit status: 0 bit-exact; 1 the RTL differs from ``sfx.linear`` (or its logits from the
reference forward's); 2 bad arguments, or a damaged / mismatched checkpoint (reported
before any simulator build); 3 the simulator is missing or the simulation failed.
"""
from __future__ import annotations

import argparse
import json
import sys

from superfloat.sw import sfx

__all__ = ["register"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_SIM = 0, 1, 2, 3


def _err(msg: str) -> None:
    print(f"sfx cosim: error: {msg}", file=sys.stderr)


def cmd_cosim(args: argparse.Namespace) -> int:
    from superfloat.sim.cosim import CosimError, cosim
    from superfloat.sim.runner import SimulationFailed, SimulatorNotFound

    if args.list_layers:
        return _list_layers(args.checkpoint)
    if not args.layer:
        _err("--layer is required (a layer name, a block such as model.layers.0.mlp, or 'all'; "
             "--list-layers shows the names)")
        return EXIT_USAGE
    try:
        report = cosim(args.checkpoint, args.layer, prompt=args.prompt, tokens=args.tokens, simulator=args.simulator,
                       rows=args.rows, cols=args.cols, k_max=args.k_max, a_bits=args.a_bits, w_bits=args.w_bits,
                       out_bits=args.out_bits, out_exponent=args.out_exponent, jobs=args.jobs, engine=args.engine,
                       waves=args.waves, target=args.target, fmax_mhz=args.fmax, float_model=args.float_model,
                       progress=not args.no_progress)
    except CosimError as e:
        _err(str(e))
        return EXIT_USAGE
    except SimulatorNotFound as e:
        _err(str(e))
        return EXIT_SIM
    except SimulationFailed as e:
        _err(f"simulation failed: {e}")
        return EXIT_SIM
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(report.format())
    return EXIT_OK if report.bit_exact else EXIT_MISMATCH


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _list_layers(checkpoint: str) -> int:
    from superfloat.sw.wasq.checkpoint import CheckpointError, read_checkpoint_info

    try:
        info = read_checkpoint_info(checkpoint)
    except CheckpointError as e:
        _err(str(e))
        return EXIT_USAGE
    layers = info["layers"]
    blocks: dict[str, int] = {}
    for name in layers:
        blocks[name.rsplit(".", 1)[0]] = blocks.get(name.rsplit(".", 1)[0], 0) + 1
    print(f"{len(layers)} quantized layer(s) in {checkpoint}:")
    for name, spec in layers.items():
        act = f"A{spec['act_bits']} {spec.get('act_exponent')}" if spec.get("act_bits") else "weight-only"
        print(f"  {name:<48} [{spec['out_features']} x {spec['in_features']}] SF{spec['bits']} "
              f"{spec.get('scale_kind', '?')}, {act}{', bias' if spec.get('bias') else ''}")
    print("blocks (--layer BLOCK runs all of a block's layers): " + ", ".join(list(blocks)[:6])
          + (f", ... ({len(blocks)} in total)" if len(blocks) > 6 else ""))
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser(
        "cosim", help="co-simulate a WASQ checkpoint's layers on the generated accelerator (Verilator / Icarus)",
        description="Run the model in software on a prompt, quantize each selected layer's input activations as "
                    "the checkpoint says, stream weights, bias, scales and activations through the simulated RTL, "
                    "and report: RTL codes against sfx.linear (must be 0 differing codes), the dequantized RTL "
                    "output against the float layer output, cycles, utilization and the time on the FPGA at its "
                    "reported Fmax. With --layer all every linear layer of the forward pass runs on the RTL and the "
                    "logits are compared with the bit-exact software path. See docs/cosim.md.",
        epilog="examples: sfx cosim --checkpoint build/demo/smollm2-135m-sf8 --layer "
               "model.layers.0.self_attn.q_proj --tokens 8; sfx cosim --checkpoint DIR --layer model.layers.0.mlp "
               "--jobs 2; sfx cosim --checkpoint DIR --layer all --prompt 'Hello' --rows 4 --cols 4 --json")
    p.add_argument("--checkpoint", "-c", required=True, metavar="DIR", help="WASQ checkpoint directory (sfx quantize)")
    p.add_argument("--layer", "-l", metavar="NAME",
                   help="a quantized layer (e.g. model.layers.0.self_attn.q_proj), a block holding several "
                        "(e.g. model.layers.0.mlp, model.layers.0.self_attn), several of these separated by commas, "
                        "or 'all' (the whole forward pass)")
    p.add_argument("--list-layers", action="store_true", help="list the checkpoint's layers and blocks, and exit")
    p.add_argument("--prompt", "-p", default=None, help="input text (default: a built-in English paragraph)")
    p.add_argument("--tokens", "-t", type=int, default=None, metavar="N",
                   help="use the first N tokens of the prompt (default: all of --prompt, or 8 of the built-in text)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    g = p.add_argument_group("the accelerator (as generated by sfx verilog)")
    g.add_argument("--rows", type=int, default=8, help="PE rows: activation rows per tile (default 8)")
    g.add_argument("--cols", type=int, default=8, help="PE columns: output channels per tile (default 8)")
    g.add_argument("--k-max", type=int, default=sfx.DEFAULT_K_MAX,
                   help=f"longest reduction the array accepts (default {sfx.DEFAULT_K_MAX})")
    g.add_argument("--a-bits", type=int, default=None,
                   help="activation width of the array (default: the checkpoint's; 8 for weight-only checkpoints)")
    g.add_argument("--w-bits", type=int, default=None, help="weight width of the array (default: the layer's)")
    g.add_argument("--out-bits", type=int, default=None, help="output width (default: the activation width)")
    g.add_argument("--out-exponent", default="channel", choices=("channel", "tensor"),
                   help="output exponents per channel (default) or per tensor")
    p.add_argument("--jobs", "-j", type=int, default=1,
                   help="operations simulated at once, one simulator process each (independent layers such as "
                        "q/k/v or gate/up run in parallel; default 1)")
    p.add_argument("--engine", default="session", choices=("session", "session-percycle", "run_linear", "reference"),
                   help="session: one simulator process serves many operations, streamed by drivers inside the "
                        "simulation (default); session-percycle: the same with Python driving every cycle (debug); "
                        "run_linear: one "
                        "superfloat.sim.run_linear call (one simulator start) per operation; reference: sfx.linear "
                        "only (dry run, no simulator)")
    p.add_argument("--waves", action="store_true", help="record waveforms (their paths are in the --json report)")
    p.add_argument("--target", default="ecp5-25k", help="FPGA target whose Fmax converts cycles to time "
                                                        "(default ecp5-25k; from hw/fpga/baselines or sfx synth)")
    p.add_argument("--fmax", type=float, default=None, metavar="MHZ", help="use this Fmax instead of a report")
    p.add_argument("--float-model", default=None, metavar="M",
                   help="also compare against this float model (a load_model spec, e.g. smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print one JSON object (mismatches, codes_compared, cycles, "
                                                       "utilization, max_abs_error, cosine, layers, forward, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_cosim)
