"""``sfx demo`` (``make demo``): the main job on the embedded defaults, end to end.

1. load SmolLM2-135M from the offline GGUF (``smollm2-135m``; its "float" weights are the
   GGUF's dequantized Q4_1);
2. quantize it with WASQ, SF8 weights and SF8 per-token activations, vanilla (round to
   nearest, float per-channel scales), calibrate the static output exponents (SF16 outputs,
   the accelerator's default width; SPEC sections 7-8) on :data:`CALIB_TOKENS` tokens of the
   Shakespeare training plays, and save the WASQ checkpoint under ``build/demo/``;
3. the accelerator-exact perplexity (SPEC section 8: every quantized linear as the FPGA
   computes it, with the checkpoint's exponents) of a short held-out text
   (:data:`PPL_TOKENS` tokens of the Shakespeare test plays) beside the fake-quantized and
   float perplexities of the same tokens and the top-1 agreement with float
   (:func:`checkpoint_perplexity`);
4. generate the Verilog of an 8x8 SF8 accelerator with SF16 outputs (``superfloat.hw.verilog``);
5. co-simulate one attention projection (``model.layers.0.self_attn.q_proj``) for a few
   tokens on Verilator, streaming the checkpoint's codes, scales, output exponents and the
   quantized activations through the RTL (:func:`superfloat.sim.cosim.cosim`);
6. print a short summary: bit-exact yes/no, the perplexities, error against float,
   throughput, paths.

Under 2 minutes on 2 cores from a set-up machine (the first Verilator build of the 8x8
array runs in the background while the model is quantized and evaluated; later runs reuse
it). ``sfx demo --quick`` is the old software-only check of the SFx model (a second).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from superfloat.cli.argtypes import int_range

import numpy as np

DEMO_DIR = Path("build") / "demo"
DEMO_LAYER = "model.layers.0.self_attn.q_proj"
DEMO_TOKENS = 8
DEMO_PROMPT = "The quick brown fox jumps over the lazy dog, and the"
#: output width of the demo's accelerator and of its calibrated exponents (the default recipe)
OUT_BITS = 16
#: calibration text of the static output exponents: the Shakespeare plays' train split
CALIB_DATA = "shakespeare"
CALIB_TOKENS = 1024
CALIB_CONTEXT = 256
#: the short held-out text of the perplexity step: the first tokens of the test plays, one window
PPL_DATA = "shakespeare"
PPL_TOKENS = 256


def _quick() -> int:
    from superfloat.sw import sfx

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    print("Superfloat demo (--quick): SFx reference model")
    w = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    x = rng.standard_normal((16, 256)).astype(np.float32) * 3.0
    ew = sfx.choose_exponent(w, 8, axis=0, keepdims=True)
    ex = sfx.choose_exponent(x, 8, axis=0, keepdims=True)
    wc = sfx.encode(w, 8, ew)
    xc = sfx.encode(x, 8, ex)
    y_float = x.astype(np.float64) @ w.astype(np.float64).T
    eo = sfx.choose_exponent(y_float, 8)
    codes, stats = sfx.linear_with_stats(xc, wc, a_bits=8, w_bits=8, out_bits=8,
                                         shift=ew[:, 0].astype(np.int64) - eo, x_exponent=ex[:, 0])
    y = sfx.decode(codes, 8, eo)
    err = np.abs(y - y_float)
    print(f"  SF8 x SF8 -> SF8 linear [16x256] @ [256x64]: max |err| {err.max():.4f}, "
          f"mean |err| {err.mean():.5f} (output step {2.0 ** (eo - 7):.4f}), saturated {stats.n_saturated}")
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


class _Steps:
    def __init__(self, total: int):
        self.total = total
        self.i = 0
        self.t0 = time.perf_counter()
        self.t = self.t0

    def start(self, what: str) -> None:
        self.i += 1
        self.t = time.perf_counter()
        print(f"[{self.i}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def done(self, what: str) -> None:
        print(f"      {what} ({time.perf_counter() - self.t:.1f} s)", file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def checkpoint_perplexity(checkpoint, float_model, ids, *, context: int | None = None) -> dict:
    """Perplexity of the token ids ``ids`` (1-D) under the WASQ checkpoint, accelerator-exact
    (``set_backend(model, "accelerator")``, the checkpoint's static output exponents) and
    fake-quantized, with ``float_model`` as the reference of both (its perplexity and the
    top-1 agreement: :func:`superfloat.sw.wasq.evaluate.perplexity`); one window of
    ``context`` tokens (default: all of them). The float model runs once."""
    import torch

    from superfloat.sw.wasq import load_checkpoint
    from superfloat.sw.wasq.accelerator import accelerator_stats, reset_accelerator_stats, set_backend
    from superfloat.sw.wasq.evaluate import ReferencePass, perplexity

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    ctx = int(context or ids.numel())
    model = load_checkpoint(checkpoint)
    ref = ReferencePass(float_model)
    set_backend(model, "accelerator")
    reset_accelerator_stats(model)
    acc = perplexity(model, ids, context=ctx, progress=False, reference=ref)
    st = accelerator_stats(model)
    set_backend(model, "fake")
    fake = perplexity(model, ids, context=ctx, progress=False, reference=ref)
    return {"tokens": acc.tokens, "context": ctx, "float": acc.reference_perplexity,
            "accelerator": acc.perplexity, "accelerator_top1": acc.top1_agreement,
            "fake": fake.perplexity, "fake_top1": fake.top1_agreement,
            "saturated": int(st["saturated"]), "outputs": int(st.get("outputs", 0)),
            "seconds": {"accelerator": acc.seconds, "fake": fake.seconds}}


def run_demo(*, out_dir: Path = DEMO_DIR, layer: str = DEMO_LAYER, tokens: int = DEMO_TOKENS,
             prompt: str = DEMO_PROMPT, simulator: str = "verilator", rows: int = 8, cols: int = 8,
             target: str = "ecp5-25k", ppl_tokens: int = PPL_TOKENS, calib_tokens: int = CALIB_TOKENS) -> dict:
    """The demo's steps; returns what the summary prints (also for tests and scripts)."""
    import copy

    from superfloat.hw.verilog import generate_verilog
    from superfloat.sim.cosim import ArrayConfig, cosim, prebuild
    from superfloat.sw.wasq import WASQConfig, load_model, quantize_, save_checkpoint
    from superfloat.sw.wasq.accelerator import calibrate_outputs_
    from superfloat.sw.wasq.data import calibration_batches, load_text, tokenize
    from superfloat.sw.wasq.models import SMOLLM2_NOTE

    import torch

    steps = _Steps(6)
    out_dir = Path(out_dir)
    ckpt = out_dir / "smollm2-135m-sf8"
    vpath = out_dir / f"sfx_accelerator_{rows}x{cols}_sf8_o{OUT_BITS}.v"

    # The simulator build of the array is the longest step: start it now, in the background.
    builder = prebuild(ArrayConfig(rows=rows, cols=cols, a_bits=8, w_bits=8, out_bits=OUT_BITS, simulator=simulator))
    # One torch thread: the build (or, later, the simulator) has the other core, and a second
    # spinning thread on a shared core costs more CPU time than it saves (measured: calibration
    # 78 CPU s with 2 threads on a loaded machine, about 9 with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps.start("loading SmolLM2-135M (offline GGUF, cached fp32 copy)")
        lm = load_model("smollm2-135m", progress=True)
        float_model = copy.deepcopy(lm.model)  # the float reference of the perplexities and of the co-simulation
        n_params = sum(p.numel() for p in lm.model.parameters())
        steps.done(f"{n_params / 1e6:.1f} M parameters; building the {rows}x{cols} array for {simulator} "
                   f"in the background")

        steps.start(f"quantizing with WASQ: SF8 weights and activations, vanilla (round to nearest, float per-channel "
                    f"scales); static SF{OUT_BITS} output exponents calibrated on {calib_tokens} tokens of "
                    f"{CALIB_DATA} (train split); saving the checkpoint")
        config = WASQConfig(weight_bits=8, act_bits=8, method="vanilla")
        quantize_(lm.model, config)
        calib_ids = tokenize(lm.tokenizer, load_text(CALIB_DATA, "train"), calib_tokens)
        calibrate_outputs_(lm.model, list(calibration_batches(calib_ids, CALIB_CONTEXT, calib_tokens)),
                           out_bits=OUT_BITS)
        mem = save_checkpoint(lm.model, ckpt, tokenizer=lm.tokenizer, overwrite=True, source="smollm2-135m",
                              note=SMOLLM2_NOTE)
        tok = lm.tokenizer
        del lm
        steps.done(f"{ckpt} ({_mb(mem['model_safetensors_bytes'])}; SF8 codes {_mb(mem['codes_bytes'])} instead of "
                   f"{_mb(mem['quantized_float32_bytes'])} of float32)")

        steps.start(f"perplexity of {ppl_tokens} tokens of {PPL_DATA} (test split): accelerator-exact (the "
                    f"checkpoint's static exponents), fake-quantized and float")
        ids = tokenize(tok, load_text(PPL_DATA, "test"), ppl_tokens)
        ppl = checkpoint_perplexity(ckpt, float_model, ids)
        ppl["data"] = f"{PPL_DATA} (test split), first {int(ids.numel())} tokens"
        steps.done(f"accelerator-exact {ppl['accelerator']:.3f}, float {ppl['float']:.3f}")

        steps.start(f"generating the Verilog of a {rows}x{cols} SF8 accelerator with SF{OUT_BITS} outputs")
        text = generate_verilog(rows=rows, cols=cols, a_bits=8, w_bits=8, out_bits=OUT_BITS)
        vpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = vpath.with_name(f".{vpath.name}.tmp")
        tmp.write_text(text)
        tmp.replace(vpath)
        steps.done(f"{vpath} ({len(text.splitlines())} lines)")

        steps.start(f"co-simulating {layer} on {simulator} for {tokens} tokens with the checkpoint's output "
                    f"exponents (waiting for the array's build if it is still running)")
        report = cosim(ckpt, layer, prompt=prompt, tokens=tokens, simulator=simulator, rows=rows, cols=cols,
                       target=target, float_model=float_model, progress=True)
        steps.done(f"{report['cycles']} cycles simulated")
    finally:
        torch.set_num_threads(threads)
        if builder.poll() is None:
            builder.wait()

    steps.start("summary")
    return {"report": report, "checkpoint": str(ckpt), "verilog": str(vpath), "memory": mem,
            "config": config.describe() + f", SF{OUT_BITS} outputs", "perplexity": ppl,
            "wall_s": time.perf_counter() - steps.t0}


def summary_lines(d: dict) -> list[str]:
    r = d["report"]
    lay = r["layers"][0]
    f = next(iter(r["fpga"]["per_array"].values()))
    lines = [
        "Superfloat demo: SmolLM2-135M -> WASQ SF8 -> SFx accelerator RTL, co-simulated; accelerator-exact perplexity",
        f"  model        SmolLM2-135M-Instruct ({d['config']}); its 'float' weights are the GGUF's dequantized Q4_1",
        f"  checkpoint   {d['checkpoint']} ({_mb(d['memory']['model_safetensors_bytes'])})",
        f"  Verilog      {d['verilog']} ({r['arrays'][0]})",
        f"  co-sim       {lay['name']}: {lay['T']} tokens x K={lay['K']} -> N={lay['N']}, {r['simulator']}, "
        f"activations {lay['activations']}",
        f"  bit-exact    {'NaN' if r.get('nan') else 'YES' if r['bit_exact'] else 'NO'}: {r['mismatches']} of "
        f"{r['codes_compared']} output codes "
        f"differ from sfx.linear; model logits with the RTL layer identical to the accelerator backend's: "
        f"{'yes' if r['forward']['logits_identical'] else 'NO'}",
    ]
    pp = d.get("perplexity")
    if pp:
        def rel(v: float) -> str:
            return f"{(v / pp['float'] - 1) * 100:+.2f} %"

        lines.append(f"  perplexity   {pp['data']} ({pp['tokens']} scored): accelerator-exact {pp['accelerator']:.4f} "
                     f"({rel(pp['accelerator'])} vs float, top-1 agreement {pp['accelerator_top1']:.1%}, "
                     f"{pp['saturated']} of {pp['outputs']} output codes saturated); fake-quantized {pp['fake']:.4f} "
                     f"({rel(pp['fake'])}, top-1 {pp['fake_top1']:.1%}); float {pp['float']:.4f}")
        lines.append("               (round to nearest on a short text; the accurate W8A8 recipe is --method awq: "
                     "docs/accelerator-exact.md, results/accelerator.md)")
    err = f"  error        vs the float layer output (SF8 weights, float activations): max |err| " \
          f"{lay['max_abs_error']:.4g} (outputs up to {lay['reference_max_abs']:.3g}), cosine {lay['cosine']:.6f}"
    lines.append(err)
    if "vs_float_weights" in lay:
        v = lay["vs_float_weights"]
        lines.append(f"               vs the float model's layer (float weights): max |err| {v['max_abs_error']:.4g}, "
                     f"cosine {v['cosine']:.6f}")
    if "rtl_vs_float" in r["forward"]:
        v = r["forward"]["rtl_vs_float"]
        lines.append(f"               next-token logits vs the float model: cosine {v['cosine']:.6f}, "
                     f"same next token: {'yes' if v['next_token_equal'] else 'no'}")
    thr = f"  throughput   {lay['cycles']} cycles, utilization {lay['utilization']:.2f}"
    if f["fmax_mhz"]:
        us = lay["cycles"] / f["fmax_mhz"]
        src = f["source"] if not f.get("config") else f"{f['source']}, synthesized as {f['config']}"
        thr += f"; {us:.0f} us at {f['fmax_mhz']:.0f} MHz on {r['fpga']['target']} ({f['match']} Fmax from {src})"
        if us:
            thr += f" = {lay['macs'] / us / 1e3:.2f} GMAC/s"
    else:
        thr += f"; no Fmax: {f['source']}"
    lines.append(thr)
    sp = r["speed"]
    lines.append(f"  simulation   {sp['macs_per_loop_s'] / 1e6:.2f} M simulated MACs per second of bench loop, "
                 f"{sp['cycles_per_loop_s'] / 1e3:.0f} k cycles/s")
    lines.append(f"  total        {d['wall_s']:.0f} s")
    return lines


def cmd_demo(args) -> int:
    if args.quick:
        return _quick()
    from superfloat.sim.cosim import CosimError
    from superfloat.sim.runner import SimulationFailed, SimulatorNotFound

    try:
        d = run_demo(out_dir=Path(args.out), layer=args.layer, tokens=args.tokens, simulator=args.simulator,
                     ppl_tokens=args.ppl_tokens)
    except (CosimError, SimulatorNotFound, SimulationFailed, ValueError) as e:
        print(f"sfx demo: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(d)))
    return 0 if d["report"].bit_exact else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded defaults (make demo)",
                       description="Quantize SmolLM2-135M to SF8 (WASQ vanilla) with calibrated static output "
                                   "exponents, save the checkpoint, measure the accelerator-exact perplexity of a "
                                   "short text against float, generate the accelerator's Verilog, co-simulate one "
                                   "attention projection on Verilator and print a summary. --quick: the software-only SFx check.")
    p.add_argument("--quick", action="store_true", help="software-only check of the SFx model (about a second)")
    p.add_argument("--out", default=str(DEMO_DIR), help=f"output folder (default {DEMO_DIR})")
    p.add_argument("--layer", default=DEMO_LAYER, help=f"layer to co-simulate (default {DEMO_LAYER})")
    p.add_argument("--tokens", type=int_range(1, 512), default=DEMO_TOKENS, help=f"tokens of the prompt (default {DEMO_TOKENS})")
    p.add_argument("--ppl-tokens", type=int_range(2, 8192), default=PPL_TOKENS,
                   help=f"tokens of the held-out text whose perplexity is measured (default {PPL_TOKENS})")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    p.set_defaults(func=cmd_demo)
