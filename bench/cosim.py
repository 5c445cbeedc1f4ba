"""``sfx bench cosim``: layers of SmolLM2-135M co-simulated on the accelerator RTL (``results/cosim.md``).

For SF8 and SF4 weights (WASQ vanilla, float per-channel scales, weight-only checkpoints, so
the activations are SF8 per-token dynamic, chosen by cosim): quantize SmolLM2-135M, save the
checkpoint under ``build/bench-cosim/``, and co-simulate ``q_proj``, ``k_proj``, ``o_proj``
and the MLP block (gate, up, SiLU in software, down) of the first decoder layer for 8 tokens
on Verilator (8x8 arrays, ``a8w8o8`` and ``a8w4o8``), through :func:`superfloat.sim.cosim.cosim`;
then, at SF8, every linear layer of the forward pass on the RTL (``--layer all``).
Reported per layer: RTL codes against ``sfx.linear``, errors against the float layer output,
cycles, utilization, time on the FPGA at the reported Fmax; and the harness speed.
About 5-15 minutes on 2 cores (two Verilator builds, about 0.9 M cycles for the layers, 13 M for
the whole forward pass); ``--quick`` co-simulates ``k_proj`` only.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
          "model.layers.0.mlp")
QUICK_LAYERS = ("model.layers.0.self_attn.k_proj",)
PROMPT = "The quick brown fox jumps over the lazy dog, and the"


def run(out_dir: Path, quick: bool = False) -> dict:
    from superfloat.bench import markdown_table, write_report
    from superfloat.sw.wasq import WASQConfig, load_model, quantize_, save_checkpoint
    from superfloat.sw.wasq.models import SMOLLM2_NOTE

    from superfloat.sim.cosim import ArrayConfig, cosim, prebuild

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tokens = 4 if quick else 8
    rows = cols = 8
    widths = (8, 4)
    layers = QUICK_LAYERS if quick else LAYERS
    simulator = "verilator"
    builders = [prebuild(ArrayConfig(rows=rows, cols=cols, a_bits=8, w_bits=w, out_bits=8, simulator=simulator))
                for w in widths]
    lm = load_model("smollm2-135m")
    float_model = lm.model
    ckroot = Path("build") / "bench-cosim"
    reports = {}
    full = None
    try:
        for w in widths:
            model = copy.deepcopy(float_model)
            config = WASQConfig(weight_bits=w, method="vanilla")
            quantize_(model, config)
            ck = ckroot / f"smollm2-135m-sf{w}"
            save_checkpoint(model, ck, tokenizer=lm.tokenizer, overwrite=True, source="smollm2-135m",
                            note=SMOLLM2_NOTE)
            del model
            print(f"[bench cosim] SF{w}: {ck} saved; co-simulating {', '.join(layers)}", file=sys.stderr, flush=True)
            reports[w] = cosim(ck, ",".join(layers), prompt=PROMPT, tokens=tokens, simulator=simulator, rows=rows,
                               cols=cols, jobs=2, float_model=float_model, progress=True,
                               fmax_sources=[out_dir / "fpga.json"])
            reports[w]["quant_config_label"] = config.describe()
        if not quick:
            ck = ckroot / "smollm2-135m-sf8"
            print("[bench cosim] SF8: the whole forward pass (every linear layer) on the RTL", file=sys.stderr,
                  flush=True)
            full = cosim(ck, "all", prompt=PROMPT, tokens=tokens, simulator=simulator, rows=rows, cols=cols, jobs=2,
                         float_model=float_model, progress=True, fmax_sources=[out_dir / "fpga.json"])
    finally:
        for b in builders:
            if b.poll() is None:
                b.wait()

    rows_md = []
    for w, rep in reports.items():
        for l in rep["layers"]:
            vf = l.get("vs_float_weights", {})
            rows_md.append([
                f"SF{w}", l["name"].replace("model.layers.0.", ""), f"{l['T']}x{l['K']} -> {l['N']}",
                f"{l['mismatches']} / {l['codes_compared']}", l["cycles"], f"{l['utilization']:.2f}",
                f"{l['reference_max_abs']:.3g}", f"{l['max_abs_error']:.3g}", f"{l['mean_abs_error']:.3g}",
                f"{l['cosine']:.5f}",
                f"{vf.get('cosine', float('nan')):.5f}",
                f"{l['fpga_us']:.0f}" if l["fpga_us"] is not None else "-"])
    table = markdown_table(["weights", "layer (layers.0)", "T x K -> N", "differing codes / compared", "cycles",
                            "utilization", "max abs y", "max abs err", "mean abs err", "cosine",
                            "cosine vs float weights",
                            "FPGA us"], rows_md)
    summ = []
    for w, rep in reports.items():
        fw = rep["forward"]
        sp = rep["speed"]
        f = next(iter(rep["fpga"]["per_array"].values()))
        summ.append([
            f"SF{w} ({rep['arrays'][0]})", "yes" if rep["bit_exact"] else "NO",
            f"{rep['mismatches']} / {rep['codes_compared']}", rep["saturated"], rep["cycles"],
            f"{rep['utilization']:.2f}", f"{rep['fpga']['time_us']:.0f}" if rep["fpga"]["time_us"] is not None else "-",
            f"{fw['rtl_vs_float']['cosine']:.5f}" if "rtl_vs_float" in fw else "-",
            f"{sp['macs_per_wall_s'] / 1e3:.0f} k", f"{sp['macs_per_cpu_s'] / 1e6:.2f} M",
            f"{sp['cycles_per_cpu_s'] / 1e3:.0f} k"])
    summary = markdown_table(["weights (array)", "bit-exact", "differing codes / compared", "saturated outputs",
                              "cycles", "utilization",
                              "FPGA us (all)", "next-token logits cosine vs float",
                              "simulated MACs / wall s", "MACs / CPU s (bench loop)", "cycles / CPU s"], summ)
    fmax_lines = []
    for w, rep in reports.items():
        for name, f in rep["fpga"]["per_array"].items():
            if f["fmax_mhz"]:
                fmax_lines.append(f"* {name} on {rep['fpga']['target']}: {f['fmax_mhz']:.1f} MHz, {f['match']} match "
                                  f"({f.get('config') or 'given'}) from `{f['source']}`"
                                  + (f"; {f['hint']}" if f.get("hint") else ""))
            else:
                fmax_lines.append(f"* {name}: {f['source']}")
    full_md = None
    if full is not None:
        fw = full["forward"]
        sp = full["speed"]
        full_md = markdown_table(
            ["layers on the RTL", "operations' codes differing / compared", "logits identical to the sfx.linear "
             "forward", "argmax (8 positions) identical", "next token: RTL / software / float",
             "logits cosine vs software", "logits cosine vs float", "cycles", "FPGA ms", "RTL pass s",
             "simulated MACs / wall s"],
            [[full["layers_simulated"], f"{full['mismatches']} / {full['codes_compared']}",
              "yes" if fw["logits_identical"] else "NO", "yes" if fw["argmax_identical"] else "NO",
              f"{fw['next_token']['rtl']} / {fw['next_token']['software']} / {fw['next_token'].get('float')}",
              f"{fw['rtl_vs_software']['cosine']:.6f}",
              f"{fw['rtl_vs_float']['cosine']:.6f}" if "rtl_vs_float" in fw else "-", full["cycles"],
              f"{full['fpga']['time_us'] / 1e3:.1f}" if full["fpga"]["time_us"] is not None else "-",
              f"{sp['rtl_pass_s']:.0f}", f"{sp['macs_per_wall_s'] / 1e3:.0f} k"]])
        full_md += ("\n\nEvery quantized linear layer of SmolLM2-135M (30 decoder layers x 7 projections; the LM head "
                    "stays float) computed by the RTL in one forward pass over the same 8 tokens, SF8 weights, SF8 "
                    "per-token activations, SF8 outputs with per-channel exponents; attention, norms, SiLU and the "
                    "LM head in PyTorch. `sfx cosim --checkpoint build/bench-cosim/smollm2-135m-sf8 --layer all "
                    f"--prompt '{PROMPT}' --tokens {tokens} --jobs 2 --float-model smollm2-135m`.")
    cmd = "sfx bench cosim" + (" --quick" if quick else "")
    per_layer_cmd = (f"sfx cosim --checkpoint build/bench-cosim/smollm2-135m-sf8 --layer {','.join(layers)} "
                     f"--prompt '{PROMPT}' --tokens {tokens} --jobs 2 --float-model smollm2-135m")
    body = (
        f"SmolLM2-135M-Instruct, {tokens} tokens of \"{PROMPT}\", first decoder layer, on an {rows}x{cols} array "
        f"simulated by {simulator} (one operation per layer, no stalls: the host feeds a beat every cycle). "
        f"Weights: WASQ vanilla (round to nearest) with float per-channel scales folded into the per-lane "
        f"16-bit multiplier; the checkpoints are weight-only, so cosim quantizes the activations to SF8 with one "
        f"exponent per token. Outputs are SF8 with per-channel output exponents.\n\n"
        f"**SmolLM2's \"float\" weights are the GGUF's dequantized Q4_1** (4-bit, groups of 32): \"float\" below "
        f"means that already 4-bit model.\n\n"
        f"* differing codes: RTL output codes against `sfx.linear` on the same inputs (must be 0);\n"
        f"* max abs y: the largest float layer output; max / mean abs err and cosine: the dequantized RTL output "
        f"against the float layer output (the checkpoint's layer in PyTorch on the same input: quantized weights, "
        f"float activations); cosine vs float "
        f"weights: against the same layer with the float model's weights;\n"
        f"* utilization: MACs / (rows x cols x cycles); FPGA us: cycles / Fmax.\n\n{table}")
    sections = [
        ("Layers", body),
        ("Summary", summary + "\n\nSaturated outputs: results beyond the output exponent chosen from the float "
                              "layer output (the RTL's `sat_count`, equal to `sfx.linear`'s count). "
                              "The next-token cosine compares the whole model's logits (the co-simulated "
                              "layers on the RTL, every other layer with the checkpoint's quantized weights in "
                              "software) with the float model's: it shows the cost of SF4 weights across the whole "
                              "model, not of the RTL. "
                              "The selected layers run on the RTL inside one forward pass (forward hooks); "
                              "`bit-exact` also requires the logits of that forward to equal, bit for bit, those of "
                              "the same forward with each layer computed by `sfx.linear`. Simulated MACs per wall "
                              "second include the simulators' start-up; the bench loop figures divide by the "
                              "simulator process's CPU time (load-independent). Two simulator processes ran at once "
                              "(`--jobs 2`: q/k projections and gate/up in parallel)."),
        *([("Whole forward pass on the RTL (SF8)", full_md)] if full_md else []),
        ("FPGA timing source", "\n".join(fmax_lines)
         + "\n\nOnly small arrays have synthesis reports so far; where the match is `nearest`, the time assumes the "
           "8x8 array reaches the Fmax of the nearest synthesized configuration."),
        ("Reproduce", f"`{cmd}` (whole file), or one configuration by hand after it has saved the checkpoint:\n\n"
                      f"    {per_layer_cmd}"),
    ]
    data = {"tokens": tokens, "prompt": PROMPT, "array": {"rows": rows, "cols": cols}, "simulator": simulator,
            "layers": list(layers), "quick": quick, "wall_s": time.perf_counter() - t0,
            "note": SMOLLM2_NOTE, "reports": {f"SF{w}": dict(r) for w, r in reports.items()},
            "whole_forward_sf8": None if full is None else {k: v for k, v in full.items() if k != "layers"}}
    write_report(out_dir, "cosim", "Co-simulation of SmolLM2-135M layers on the SFx accelerator RTL", sections, data,
                 cmd)
    return data
