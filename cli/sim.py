"""``sfx cosim``: stream a WASQ checkpoint's layers through the simulated accelerator (docs/cosim.md);
``sfx verify``: random operations on the RTL until N output codes are checked (docs/simulation.md).

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

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_SIM, EXIT_NAN = 0, 1, 2, 3, 4


def _err(msg: str) -> None:
    print(f"sfx cosim: error: {msg}", file=sys.stderr)


def cmd_cosim(args: argparse.Namespace) -> int:
    """Run the model with its accelerator-exact backend (SPEC section 8) on a prompt or a text, and compute
    each selected layer on the simulated RTL instead, from the same layer program (activation codes and
    row exponents, weight codes, multiplier, shift from the checkpoint's calibrated static output
    exponents, bias in accumulator units); report: RTL codes against sfx.linear (must be 0 differing
    codes), the decoded RTL output against the backend's (must be identical), the error against the
    fake-quantized layer, cycles, utilization and the time on the FPGA at its reported Fmax. With
    --layer all every quantized linear runs on the RTL and the logits must equal the accelerator
    backend's bit for bit; with --data the perplexity of the text is computed with every selected layer
    on the RTL, beside the backend's (must be identical). A NaN or an infinity is reported as such, with
    the module that first produced it, never as a mismatch. Exit status: 0 bit-exact, 1 mismatch, 2 bad
    checkpoint or option, 3 simulator problem, 4 NaN/infinity. See docs/cosim.md."""
    from superfloat.sim.cosim import CosimError, CosimNaN, cosim
    from superfloat.sim.runner import SimulationFailed, SimulatorNotFound

    if args.list_layers:
        return _list_layers(args.checkpoint)
    if not args.layer:
        _err("--layer is required (a layer name, a block such as model.layers.0.mlp, or 'all'; "
             "--list-layers shows the names)")
        return EXIT_USAGE
    try:
        report = cosim(args.checkpoint, args.layer, prompt=args.prompt, tokens=args.tokens, data=args.data,
                       split=args.split, max_tokens=args.max_tokens, context=args.context, simulator=args.simulator,
                       rows=args.rows, cols=args.cols, k_max=args.k_max, a_bits=args.a_bits, w_bits=args.w_bits,
                       out_bits=args.out_bits, calibrate_outputs=args.calibrate_outputs, calib_data=args.calib_data,
                       calib_tokens=args.calib_tokens, headroom=args.headroom, jobs=args.jobs, engine=args.engine,
                       waves=args.waves, target=args.target, fmax_mhz=args.fmax, float_model=args.float_model,
                       progress=not args.no_progress)
    except CosimNaN as e:
        print(f"sfx cosim: NaN: {e}", file=sys.stderr)
        return EXIT_NAN
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
    if report.get("nan"):
        return EXIT_NAN
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
    from superfloat.sim.cosim import DEFAULT_CALIB_DATA, DEFAULT_CALIB_TOKENS

    from .argtypes import float_range, int_range, positive_float, positive_int

    p = sub.add_parser(
        "cosim", help="co-simulate a WASQ checkpoint's layers on the generated accelerator (Verilator / Icarus)",
        description=cmd_cosim.__doc__,  # (one text for --help and the function)
        epilog="examples: sfx cosim --checkpoint CK --layer model.layers.0.self_attn.q_proj --tokens 8; "
               "sfx cosim --checkpoint CK --layer all --tokens 16; sfx cosim --checkpoint CK --layer all --data "
               "shakespeare --max-tokens 128; sfx cosim --checkpoint CK --layer all --calibrate-outputs --out-bits 8 "
               "--rows 4 --cols 4 --json")
    p.add_argument("--checkpoint", "-c", required=True, metavar="DIR", help="WASQ checkpoint directory (sfx quantize)")
    p.add_argument("--layer", "-l", metavar="NAME",
                   help="a quantized layer (e.g. model.layers.0.self_attn.q_proj), a block holding several "
                        "(e.g. model.layers.0.mlp, model.layers.0.self_attn), several of these separated by commas, "
                        "or 'all' (the whole forward pass)")
    p.add_argument("--list-layers", action="store_true", help="list the checkpoint's layers and blocks, and exit")
    p.add_argument("--prompt", "-p", default=None, help="input text (default: a built-in English paragraph)")
    p.add_argument("--tokens", "-t", type=int, default=None, metavar="N",
                   help="use the first N tokens of the prompt (default: all of --prompt, or 8 of the built-in text)")
    p.add_argument("--data", default=None, metavar="D",
                   help="perplexity mode: a text (file, 'shakespeare', 'wikitext-2', hf:NAME; see sfx eval) whose first "
                        "--max-tokens tokens are scored with every selected layer on the RTL")
    p.add_argument("--split", default=None, help="split of --data (default: all for files, test for corpora)")
    p.add_argument("--max-tokens", type=int_range(2, None), default=None, metavar="N",
                   help="tokens of --data to evaluate (every one is simulated)")
    p.add_argument("--context", type=int_range(2, None), default=None, metavar="N",
                   help="window length for --data (default: one window of --max-tokens)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    c = p.add_argument_group("static output exponents (SPEC sections 7-8; the checkpoint's by default)")
    c.add_argument("--calibrate-outputs", action="store_true",
                   help="calibrate every layer's output exponents first (superfloat.sw.wasq.accelerator."
                        "calibrate_outputs_) for --out-bits, replacing the checkpoint's; needed when the checkpoint "
                        "has none")
    c.add_argument("--calib-data", default=DEFAULT_CALIB_DATA, metavar="D",
                   help=f"calibration text, train split (default {DEFAULT_CALIB_DATA})")
    c.add_argument("--calib-tokens", type=positive_int, default=DEFAULT_CALIB_TOKENS, metavar="N",
                   help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    c.add_argument("--headroom", type=float_range(1.0, None), default=None,
                   help="factor above the calibrated maximum (default: the library's)")
    g = p.add_argument_group("the accelerator (as generated by sfx verilog)")
    g.add_argument("--rows", type=int, default=8, help="PE rows: activation rows per tile (default 8)")
    g.add_argument("--cols", type=int, default=8, help="PE columns: output channels per tile (default 8)")
    g.add_argument("--k-max", type=int, default=sfx.DEFAULT_K_MAX,
                   help=f"longest reduction the array accepts (default {sfx.DEFAULT_K_MAX})")
    g.add_argument("--a-bits", type=int, default=None,
                   help="activation width of the array (default: the layer's; weight-only layers stream SF16)")
    g.add_argument("--w-bits", type=int, default=None, help="weight width of the array (default: the layer's)")
    g.add_argument("--out-bits", type=int, default=None,
                   help="output width (default: the width the layers' output exponents are calibrated for; with "
                        "--calibrate-outputs: the width to calibrate)")
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
    p.add_argument("--fmax", type=positive_float, default=None, metavar="MHZ", help="use this Fmax instead of a report")
    p.add_argument("--float-model", default=None, metavar="M",
                   help="also compare against this float model (a load_model spec, e.g. smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print one JSON object (mismatches, codes_compared, cycles, "
                                                       "utilization, max_abs_error, cosine, layers, forward, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_cosim)
    register_verify(sub)


# --------------------------------------------------------------------------- sfx verify


def cmd_verify(args: argparse.Namespace) -> int:
    """Verification at scale of the generated accelerator: random operations (shapes with tiling in T, N
    and K, relu, roundings, mult, per-row exponents, xmult on -x arrays, biases at the accumulator limit, k_max) run in jobs
    of 16 with random stalls on every stream, generated inside the simulation from the seed; every
    output code is compared with sfx.linear and the RTL's saturation count with the reference's; the
    harness regression tests (back-pressure, reset mid-operation, malformed commands, bias out of range)
    run first. Exit status 0 when everything matched, 1 on a difference (the message names the
    operation, element and seed), 2 bad arguments, 3 no simulator. See docs/simulation.md."""
    import random

    from superfloat.sim.runner import SimulationFailed, SimulatorNotFound, check_simulator
    from superfloat.sim.verify import SHIPPED_CONFIGS, parse_config, verify_config

    names = list(SHIPPED_CONFIGS) if args.config == ["all"] else args.config
    configs = []
    for n in names:
        try:
            configs.append((n, parse_config(n)))
        except (TypeError, ValueError) as e:
            msg = str(e) if n in str(e) else f"--config {n}: {e}"
            print(f"sfx verify: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
    sims = ["verilator", "icarus"] if args.simulator == "both" else [args.simulator]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1 << 31)
    try:
        for s in sims:
            check_simulator(s)
    except SimulatorNotFound as e:
        print(f"sfx verify: error: {e}", file=sys.stderr)
        return EXIT_SIM
    out, code = [], EXIT_OK
    for name, p in configs:
        for sim in sims:
            print(f"sfx verify: {name} on {sim}: {args.codes} codes, seed {seed} ...", file=sys.stderr, flush=True)
            try:
                st = verify_config(p, simulator=sim, codes=args.codes, seed=seed, regressions=not args.no_regressions)
            except SimulationFailed as e:
                print(f"sfx verify: {name} on {sim} (seed {seed}) FAILED: {e}", file=sys.stderr)
                out.append({"config": name, "simulator": sim, "seed": seed, "failed": str(e)})
                code = EXIT_MISMATCH
                continue
            out.append(st)
            if not args.json:
                print(f"{name} {sim}: {st['codes']} codes of {st['operations']} operations in {st['jobs']} jobs "
                      f"({st['jobs_with_stalls']} with stalls) equal to sfx.linear, {st['cycles']} cycles, "
                      f"regression tests {st['tests_passed'] - 1}/{st['tests'] - 1} passed, seed {seed}, "
                      f"{st['wall_s']:.1f} s")
    if args.json:
        print(json.dumps(out, indent=2, default=_json_default))
    return code


def register_verify(sub) -> None:
    from .argtypes import nonneg_int, positive_int

    p = sub.add_parser(
        "verify", help="random LINEAR operations on the RTL until N output codes are checked (both simulators)",
        description=cmd_verify.__doc__,
        epilog="examples: sfx verify; sfx verify --config all --simulator both --codes 1000000 --seed 7; "
               "sfx verify --config 4x4-a8w4o8-k64 --simulator icarus --codes 20000")
    p.add_argument("--config", nargs="+", default=["8x8-a8w8o8"], metavar="C",
                   help="RxC-aAwWoO[-kK][-x] configurations (-x: generated with the per-row activation multiplier "
                        "xmult), names of the shipped ones (8x8-a8w8o8, 8x8-a8w4o8, 2x2-a4w4o4, 2x2-a8w8o8, "
                        "8x8-a8w4o8-x, 2x2-a16w16o16-x), or 'all' (the shipped ones); default 8x8-a8w8o8")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus", "both"))
    p.add_argument("--codes", type=positive_int, default=1_000_000, metavar="N",
                   help="output codes to check per configuration and simulator (default 1000000)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="seed of the operations and stalls (default: random, "
                                                                  "printed)")
    p.add_argument("--no-regressions", action="store_true", help="skip the harness regression tests")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=cmd_verify)
