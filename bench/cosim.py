"""``sfx bench cosim``: SmolLM2-135M co-simulated on the accelerator RTL (``results/cosim.md``).

A W8A8 checkpoint (WASQ vanilla: SF8 weights with float per-channel scales folded into the
16-bit multiplier, SF8 per-token activations) with static SF16 output exponents (the
accelerator's default output width, docs/accelerator-exact.md) calibrated on 1024 tokens of the
Shakespeare train split (``calibrate_outputs_``, SPEC sections 7-8), saved under
``build/bench-cosim/``; then, on an 8x8 a8w8o16 array in Verilator, one simulator process
(``--jobs 1``), through :func:`superfloat.sim.cosim.cosim`:

* the whole forward pass on the RTL (every quantized linear, 30 x 7 layer calls) for 8 tokens
  (the speed target: <= 30 s) and for 16 tokens (0 differing codes, logits identical to the
  accelerator backend's);
* the perplexity of the first 128 tokens of the Shakespeare test split (held out from the
  calibration text) with every quantized linear on the RTL, beside the accelerator backend's
  perplexity of the same tokens (equal bit for bit), the fake-quantized model's and the float
  model's.

Each run records its wall time, the RTL pass, the CPU seconds of this process and of the
simulator processes, and the load average. About 10-20 minutes on 2 cores; ``--quick`` runs two
decoder layers' worth of the forward (``model.layers.0``, ``model.layers.29``) and 16 tokens of text.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

CALIB_TOKENS = 1024
#: output width of the array and of the calibrated exponents (accelerator.DEFAULT_OUT_BITS, the recipe)
OUT_BITS = 16
PPL_TOKENS = 128
PROMPT = None  # cosim's built-in paragraph


def _cpu() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _checkpoint(lm, path: Path) -> dict:
    import copy

    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint
    from superfloat.sw.wasq.accelerator import calibrate_outputs_
    from superfloat.sw.wasq.data import calibration_batches, load_text, tokenize
    from superfloat.sw.wasq.models import SMOLLM2_NOTE

    model = copy.deepcopy(lm.model)
    config = WASQConfig(weight_bits=8, act_bits=8, method="vanilla")
    quantize_(model, config)
    ids = tokenize(lm.tokenizer, load_text("shakespeare", "train"), CALIB_TOKENS)
    rep = calibrate_outputs_(model, list(calibration_batches(ids, 256, CALIB_TOKENS)), out_bits=OUT_BITS)
    save_checkpoint(model, path, tokenizer=lm.tokenizer, overwrite=True, source="smollm2-135m", note=SMOLLM2_NOTE)
    return {"config": config.describe(), "calibration_tokens": int(len(ids)), "out_bits": OUT_BITS,
            "raised_channels": sum(r["raised_channels"] for r in rep.values())}


def _run(label: str, ck: Path, layer: str, **kw) -> dict:
    from superfloat.sim.cosim import cosim

    print(f"[bench cosim] {label}", file=sys.stderr, flush=True)
    load0 = os.getloadavg()[0]
    c0 = _cpu()
    t0 = time.perf_counter()
    rep = cosim(ck, layer, simulator="verilator", rows=8, cols=8, jobs=1, progress=True, **kw)
    wall = time.perf_counter() - t0
    c1 = _cpu()
    return {"label": label, "report": rep, "wall_s": wall, "host_cpu_s": c1[0] - c0[0], "sim_cpu_s": c1[1] - c0[1],
            "load_start": load0, "load_end": os.getloadavg()[0]}


def run(out_dir: Path, quick: bool = False) -> dict:
    from superfloat.bench import markdown_table, write_report
    from superfloat.sim.cosim import ArrayConfig, prebuild
    from superfloat.sw.wasq import load_model
    from superfloat.sw.wasq.models import SMOLLM2_NOTE

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    builder = prebuild(ArrayConfig(rows=8, cols=8, a_bits=8, w_bits=8, out_bits=OUT_BITS, simulator="verilator"))
    lm = load_model("smollm2-135m")
    float_model = lm.model
    ck = Path("build") / "bench-cosim" / f"smollm2-135m-w8a8-o{OUT_BITS}"
    print(f"[bench cosim] quantizing, calibrating the output exponents, saving {ck}", file=sys.stderr, flush=True)
    quant = _checkpoint(lm, ck)
    builder.wait()
    layer_all = "model.layers.0,model.layers.29" if quick else "all"
    runs = {
        "forward8": _run("whole forward, 8 tokens", ck, layer_all, tokens=8, float_model=float_model,
                         fmax_sources=[out_dir / "fpga.json"]),
        "forward16": _run("whole forward, 16 tokens", ck, layer_all, tokens=16, float_model=float_model,
                          fmax_sources=[out_dir / "fpga.json"]),
        "ppl": _run(f"perplexity of {16 if quick else PPL_TOKENS} tokens of the Shakespeare test split", ck, layer_all,
                    data="shakespeare", max_tokens=16 if quick else PPL_TOKENS, float_model=float_model,
                    fmax_sources=[out_dir / "fpga.json"]),
    }
    cmd = "sfx bench cosim" + (" --quick" if quick else "")
    ckp = str(ck)
    cmds = {"forward8": f"sfx cosim -c {ckp} --layer {layer_all} --tokens 8 --float-model smollm2-135m",
            "forward16": f"sfx cosim -c {ckp} --layer {layer_all} --tokens 16 --float-model smollm2-135m",
            "ppl": f"sfx cosim -c {ckp} --layer {layer_all} --data shakespeare --max-tokens "
                   f"{16 if quick else PPL_TOKENS} --float-model smollm2-135m"}

    rows = []
    for key, r in runs.items():
        rep = r["report"]
        sp = rep["speed"]
        fw = rep["forward"]
        rows.append([r["label"], rep["layer_calls"], f"{rep['mismatches']} / {rep['codes_compared']:,}",
                     rep["calls_differing_from_accelerator"], "yes" if fw["logits_identical"] else "NO",
                     "yes" if rep.bit_exact else "NO", f"{rep['cycles']:,}", f"{rep['utilization']:.3f}",
                     rep["saturated"], f"{sp['rtl_pass_s']:.1f}",
                     f"{sp['rtl_pass_host_cpu_s']:.1f} + {sp['rtl_pass_sim_cpu_s']:.1f}", f"{sp['sim_loop_s']:.1f}",
                     f"{sp['sim_loop_cpu_s']:.1f}", f"{sp['cycles_per_wall_s'] / 1e3:,.0f} k",
                     f"{sp['cycles_per_cpu_s'] / 1e3:,.0f} k", f"{r['wall_s']:.0f}", f"{r['host_cpu_s']:.0f}",
                     f"{r['sim_cpu_s']:.0f}", f"{r['load_start']:.1f} / {r['load_end']:.1f}"])
    runs_md = markdown_table(
        ["run (every quantized linear on the RTL)", "layer calls", "differing codes / compared",
         "calls differing from the backend", "logits identical to the backend", "bit-exact", "cycles", "utilization",
         "saturated outputs", "RTL pass s", "RTL pass CPU s (host + simulator)", "simulator loop s", "simulator loop CPU s", "cycles / RTL-pass s",
         "cycles / simulator CPU s", "wall s", "host CPU s", "simulator CPU s", "load avg start / end"], rows)
    runs_md += "\n\nCommands (after `sfx bench cosim` saved the checkpoint):\n\n" + "\n".join(
        f"    {cmds[k]}" for k in runs)

    pp = runs["ppl"]["report"]["perplexity"]
    f8 = runs["forward8"]["report"]
    ppl_md = markdown_table(
        ["model", "perplexity", "mean NLL (nats/token)", "scored tokens"],
        [["every quantized linear on the RTL (Verilator)", f"{pp['rtl']['perplexity']:.6f}", f"{pp['rtl']['nll']!r}",
          pp["rtl"]["tokens"]],
         ["accelerator-exact backend (software)", f"{pp['accelerator']['perplexity']:.6f}",
          f"{pp['accelerator']['nll']!r}", pp["accelerator"]["tokens"]],
         ["fake-quantized W8A8 (software)", f"{pp['fake']['perplexity']:.6f}", f"{pp['fake']['nll']!r}",
          pp["fake"]["tokens"]],
         ["float (the GGUF's dequantized weights)", f"{pp['float']['perplexity']:.6f}" if pp.get("float") else "-",
          f"{pp['float']['nll']!r}" if pp.get("float") else "-", pp["float"]["tokens"] if pp.get("float") else "-"]])
    ppl_md += (f"\n\nThe RTL and the accelerator backend give **{'identical' if pp['identical'] else 'DIFFERENT'}** "
               f"perplexities (the mean NLL is printed in full: equal bit for bit), on {pp['data']}, one window of "
               f"{pp['context']} tokens. The difference from the fake-quantized model is the accelerator's "
               f"arithmetic with SF{OUT_BITS} outputs (static output exponents, output rounding and saturation, the "
               f"multiplier's rounding of the scales); round to nearest on a short text: the accurate W8A8 recipe "
               f"(AWQ) and its figures on 8192 tokens are in `results/accelerator.md` (`sfx bench accel`).")
    fwd = f8["forward"]
    sp = f8["speed"]
    summary = (
        f"SmolLM2-135M-Instruct, {quant['config']}, static SF{OUT_BITS} output exponents calibrated on "
        f"{quant['calibration_tokens']} tokens of the Shakespeare train split; an 8x8 a8w8o{OUT_BITS} array (k_max 16384) in "
        f"Verilator, one simulator process; attention, norms, SiLU and the LM head on the host.\n\n"
        f"* Whole forward pass on the RTL, 8 tokens: RTL pass **{sp['rtl_pass_s']:.1f} s** wall "
        f"({'meets' if sp['rtl_pass_s'] <= 30 else 'MISSES'} the 30 s target at a load average of "
        f"{runs['forward8']['load_start']:.1f} on {os.cpu_count()} cores), "
        f"**{sp['rtl_pass_host_cpu_s'] + sp['rtl_pass_sim_cpu_s']:.1f} CPU s** (host "
        f"{sp['rtl_pass_host_cpu_s']:.1f} + simulator {sp['rtl_pass_sim_cpu_s']:.1f}: what the pass needs of an "
        f"idle machine at most, {'within' if sp['rtl_pass_host_cpu_s'] + sp['rtl_pass_sim_cpu_s'] <= 30 else 'above'} "
        f"30 s); the whole command "
        f"{runs['forward8']['wall_s']:.0f} s with loading the checkpoint and the float model and the software "
        f"passes), {f8['cycles']:,} cycles, {f8['mismatches']} differing codes of {f8['codes_compared']:,}, logits "
        f"{'identical' if fwd['logits_identical'] else 'NOT identical'} to the accelerator backend's.\n"
        f"* 16 tokens: {runs['forward16']['report']['mismatches']} differing codes of "
        f"{runs['forward16']['report']['codes_compared']:,}, every layer call and the logits "
        f"{'identical' if runs['forward16']['report'].bit_exact else 'NOT identical'} to the accelerator backend's "
        f"(issue 12 target).\n"
        f"* Perplexity of {pp['rtl']['tokens'] + 1} tokens of the Shakespeare test split with every quantized "
        f"linear on the RTL: **{pp['rtl']['perplexity']:.4f}**, accelerator backend "
        f"{pp['accelerator']['perplexity']:.4f} ({'identical' if pp['identical'] else 'DIFFERENT'}), fake-quantized "
        f"{pp['fake']['perplexity']:.4f}, float {pp['float']['perplexity']:.4f}.\n\n"
        f"**SmolLM2's \"float\" weights are the GGUF's dequantized Q4_1** (4-bit, groups of 32).")
    layer0 = [l for l in f8["layers"] if l["name"].startswith("model.layers.0.")]
    lrows = []
    for l in layer0:
        vf = l.get("vs_float_weights", {})
        lrows.append([l["name"].replace("model.layers.0.", ""), f"{l['T']}x{l['K']} -> {l['N']}",
                      f"{l['mismatches']} / {l['codes_compared']}", "yes" if l["equal_to_accelerator"] else "NO",
                      l["cycles"], f"{l['utilization']:.2f}", l["saturated"], f"{l['max_abs_error']:.3g}",
                      f"{l['cosine']:.5f}", f"{vf.get('cosine', float('nan')):.5f}",
                      f"{l['fpga_us']:.0f}" if l["fpga_us"] is not None else "-"])
    layers_md = markdown_table(["layer (layers.0)", "T x K -> N", "differing codes / compared",
                                "identical to the backend", "cycles", "utilization", "saturated",
                                "max abs err vs fake-quantized", "cosine vs fake-quantized",
                                "cosine vs float weights", "FPGA us"], lrows)
    layers_md += ("\n\nFrom the 8-token whole-forward run. Errors compare the accelerator-exact output (RTL codes "
                  "decoded with the static exponents) with the same layer's fake-quantized output on the same input "
                  "(what the output requantization costs), and with the float model's layer.")
    fmax_lines = []
    for name, f in f8["fpga"]["per_array"].items():
        fmax_lines.append(f"* {name} on {f8['fpga']['target']}: " + (
            f"{f['fmax_mhz']:.1f} MHz, {f['match']} match ({f.get('config') or 'given'}) from `{f['source']}`: "
            f"{f8['fpga']['time_us'] / 1e3:.1f} ms for the 8-token forward's linear layers"
            if f["fmax_mhz"] else f["source"]))
    sections = [
        ("Summary", summary),
        ("Runs", runs_md + "\n\nRTL pass: the forward pass with the RTL (the simulator session's start-up, every "
                           "operation's packing, simulation and `sfx.linear` check); simulator loop: the simulator's "
                           "own time from `go` to `done` summed over the operations (its CPU seconds beside). Host "
                           "and simulator CPU seconds cover the whole command; the machine is shared (load average "
                           "beside)."),
        ("Perplexity on the RTL", ppl_md),
        ("First decoder layer", layers_md),
        ("FPGA time", "\n".join(fmax_lines)),
        ("Reproduce", f"`{cmd}` (whole file), or one run by hand as listed under Runs."),
    ]
    data = {"quick": quick, "checkpoint": ckp, "quantization": quant, "note": SMOLLM2_NOTE,
            "wall_s": time.perf_counter() - t_start,
            "runs": {k: {**{kk: vv for kk, vv in r.items() if kk != "report"},
                         "command": cmds[k],
                         "report": {kk: vv for kk, vv in r["report"].items() if kk not in ("layers", "token_ids")}}
                     for k, r in runs.items()},
            "layers0": layer0}
    write_report(out_dir, "cosim", "Co-simulation of SmolLM2-135M on the SFx accelerator RTL", sections, data, cmd)
    bad = [k for k, r in runs.items() if not r["report"].bit_exact]
    if bad:
        raise RuntimeError(f"not bit-exact: {', '.join(bad)}")
    return data
