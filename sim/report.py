"""The report of :func:`superfloat.sim.cosim.cosim` (:class:`CosimReport`) and its error statistics."""
from __future__ import annotations

import numpy as np


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the positions where both are finite (NaN/inf are reported apart)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[ok] - b[ok]).max()) if ok.any() else 0.0


def _err_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    g = np.asarray(got, dtype=np.float64).reshape(-1)
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    d = np.abs(g - r)
    ng, nr = float(np.linalg.norm(g)), float(np.linalg.norm(r))
    cos = 1.0 if ng == 0 and nr == 0 else (float(g @ r) / (ng * nr) if ng and nr else 0.0)
    return {"max_abs_error": float(d.max()) if d.size else 0.0, "mean_abs_error": float(d.mean()) if d.size else 0.0,
            "cosine": cos, "reference_max_abs": float(np.abs(r).max()) if r.size else 0.0}


def _logit_compare(a, b) -> dict:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    e = _err_stats(a, b)
    am, bm = a.argmax(-1).reshape(-1), b.argmax(-1).reshape(-1)
    return {"max_abs_diff": e["max_abs_error"], "mean_abs_diff": e["mean_abs_error"], "cosine": e["cosine"],
            "argmax_agreement": float((am == bm).mean()), "next_token_equal": bool(am[-1] == bm[-1])}


def _build_report(*, checkpoint, info, layer, kind, names, ids, text, simulator, engine, jobs, arrays, programs,
                  rtl_calls, logits, blocks, fmax, target, notes, timing, perplexity, calibration,
                  accelerator_stats, nonfinite=None) -> "CosimReport":
    logits_sw, logits_acc, logits_rtl, logits_fp = logits
    block_sw, block_acc, block_rtl, block_fp = blocks
    layers = []
    tot = {"mismatches": 0, "codes": 0, "cycles": 0, "sim_cycles": 0, "macs": 0, "pe_cycles": 0, "saturated": 0,
           "loop_s": 0.0, "loop_cpu_s": 0.0, "sim_s": 0.0, "fpga_us": 0.0, "abs_sum": 0.0, "n_out": 0,
           "differ_from_backend": 0}
    fpga_known = True
    errors = []
    for c in rtl_calls:
        arr = c.call.array
        prog = c.call.program
        stats = [r.stats for r in c.results]
        cycles = sum(s.cycles for s in stats)
        sim_cycles = sum(s.sim_cycles for s in stats)
        macs = sum(op.macs for op in c.call.ops)
        mism = sum(r.mismatches for r in c.results)
        first = next((r.first_mismatch for r in c.results if r.first_mismatch), None)
        e = _err_stats(c.y_out, c.y_fake) if c.y_fake is not None else _err_stats(c.y_out, c.y_out)
        f = fmax[arr.name]
        fpga_us = cycles / f["fmax_mhz"] if f["fmax_mhz"] else None
        if fpga_us is None:
            fpga_known = False
        eo = c.call.out_exponent
        entry = {
            "name": c.name, "array": arr.name, "T": c.call.shape[0], "N": c.call.shape[1], "K": c.call.shape[2],
            "w_bits": int(prog.w_bits), "a_bits": int(prog.a_bits), "out_bits": int(prog.out_bits),
            "scale": "float" if prog.mult is not None else "pow2", "bias": prog.bias is not None,
            "activations": f"SF{prog.a_bits} {prog.act_mode}" + (f" (E={prog.act_exponent})"
                                                                 if prog.act_mode == "static" else " per token"),
            "activation_source": prog.act_source, "ops": len(c.call.ops),
            "x_exponents": [int(v) for v in np.unique(c.call.x_exponent)], "clamped_rows": c.call.clamped_rows,
            "out_exponent": [int(eo.min()), int(eo.max())],
            "mismatches": mism, "codes_compared": int(c.codes.size), "first_mismatch": first,
            "equal_to_accelerator": c.equal_to_backend,
            "cycles": cycles, "sim_cycles": sim_cycles, "macs": macs,
            "utilization": macs / (arr.rows * arr.cols * cycles) if cycles else 0.0,
            "saturated": sum(int(s.saturated) for s in stats),
            "saturated_reference": sum(int(s.reference_saturated) for s in stats),
            "rtl_error_flag": any(s.error for s in stats),
            **e,
            "fpga_us": fpga_us,
            "sim_wall_s": sum(r.wall_s for r in c.results), "loop_s": sum(s.loop_s for s in stats),
            "loop_cpu_s": sum(s.loop_cpu_s for s in stats),
            "waves": sorted({s.waves for s in stats if getattr(s, "waves", None)}) or None,
        }
        if c.y_float_weights is not None:
            ef = _err_stats(c.y_out, c.y_float_weights)
            entry["vs_float_weights"] = {k: ef[k] for k in ("max_abs_error", "mean_abs_error", "cosine")}
        layers.append(entry)
        if entry["rtl_error_flag"]:
            errors.append(c.name)
        tot["mismatches"] += mism
        tot["differ_from_backend"] += 0 if c.equal_to_backend else 1
        tot["codes"] += int(c.codes.size)
        tot["cycles"] += cycles
        tot["sim_cycles"] += sim_cycles
        tot["macs"] += macs
        tot["pe_cycles"] += arr.rows * arr.cols * cycles
        tot["saturated"] += entry["saturated"]
        tot["loop_s"] += entry["loop_s"]
        tot["loop_cpu_s"] += entry["loop_cpu_s"]
        tot["fpga_us"] += fpga_us or 0.0
        tot["abs_sum"] += e["mean_abs_error"] * c.y_out.size
        tot["n_out"] += c.y_out.size

    last = (0, -1)
    fwd = {
        # bit for bit, NaN at the same positions counting as equal (a NaN is reported apart, never as a difference)
        "logits_identical": bool(np.array_equal(logits_rtl, logits_acc, equal_nan=True)),
        "max_logit_diff": _max_abs_diff(logits_rtl, logits_acc),
        "argmax_identical": bool(np.array_equal(logits_rtl.argmax(-1), logits_acc.argmax(-1))),
        "next_token": {"rtl": int(logits_rtl[last].argmax()), "accelerator": int(logits_acc[last].argmax()),
                       "software": int(logits_sw[last].argmax())},
        "rtl_vs_software": _logit_compare(logits_rtl, logits_sw),
        "accelerator_vs_software": _logit_compare(logits_acc, logits_sw),
    }
    if logits_fp is not None:
        fwd["next_token"]["float"] = int(logits_fp[last].argmax())
        fwd["rtl_vs_float"] = _logit_compare(logits_rtl, logits_fp)
        fwd["software_vs_float"] = _logit_compare(logits_sw, logits_fp)
    if block_rtl is not None:
        blk = {"identical_to_accelerator": bool(np.array_equal(block_rtl, block_acc)),
               "vs_software": _err_stats(block_rtl, block_sw)}
        if block_fp is not None:
            blk["vs_float"] = _err_stats(block_rtl, block_fp)
        fwd["block_output"] = blk
    arrays_used = sorted({a.name for a in arrays.values()})
    starts = list(getattr(engine, "session_start_s", []))
    rtl_s = timing["rtl_pass_s"]
    bit_exact = (tot["mismatches"] == 0 and tot["differ_from_backend"] == 0 and fwd["logits_identical"]
                 and not errors and (perplexity is None or perplexity["identical"]))
    if nonfinite is not None:  # a NaN makes the comparison say nothing about the RTL: neither YES nor NO
        bit_exact = None
    data = {
        "checkpoint": checkpoint, "model": (info.get("base_model") or {}).get("architecture"),
        "quant_config": info.get("quant_config"), "selection": layer, "kind": kind, "layers_simulated": len(names),
        "layer_calls": len(rtl_calls), "tokens": len(ids), "token_ids": ids, "prompt": text,
        "simulator": simulator, "engine": engine.name, "jobs": jobs, "arrays": arrays_used,
        "output_exponents": "static, calibrated" + (" here" if calibration else " (checkpoint)"),
        "calibration": calibration,
        "mismatches": tot["mismatches"], "codes_compared": tot["codes"],
        "calls_differing_from_accelerator": tot["differ_from_backend"],
        "logits_equal_accelerator": fwd["logits_identical"],
        "bit_exact": bit_exact,
        "nan": nonfinite,
        "rtl_error_flags": errors,
        "cycles": tot["cycles"], "macs": tot["macs"],
        "utilization": tot["macs"] / tot["pe_cycles"] if tot["pe_cycles"] else 0.0,
        "saturated": tot["saturated"],
        "accelerator_backend": {k: v for k, v in accelerator_stats.items() if k != "layers"},
        "max_abs_error": max((l["max_abs_error"] for l in layers), default=0.0),
        "mean_abs_error": tot["abs_sum"] / tot["n_out"] if tot["n_out"] else 0.0,
        "cosine": min((l["cosine"] for l in layers), default=1.0),
        "fpga": {"target": target, "per_array": fmax, "time_us": tot["fpga_us"] if fpga_known else None},
        "forward": fwd,
        "perplexity": perplexity,
        "speed": {"rtl_pass_s": rtl_s, "accelerator_pass_s": timing["accelerator_pass_s"],
                  "rtl_pass_host_cpu_s": timing.get("rtl_pass_host_cpu_s"),
                  "rtl_pass_sim_cpu_s": timing.get("rtl_pass_sim_cpu_s"),
                  "session_start_s": starts, "sim_loop_s": tot["loop_s"], "sim_cycles": tot["sim_cycles"],
                  "macs_per_wall_s": tot["macs"] / rtl_s if rtl_s else 0.0,
                  "cycles_per_wall_s": tot["sim_cycles"] / rtl_s if rtl_s else 0.0,
                  "macs_per_loop_s": tot["macs"] / tot["loop_s"] if tot["loop_s"] else 0.0,
                  "cycles_per_loop_s": tot["sim_cycles"] / tot["loop_s"] if tot["loop_s"] else 0.0,
                  "sim_loop_cpu_s": tot["loop_cpu_s"],
                  "macs_per_cpu_s": tot["macs"] / tot["loop_cpu_s"] if tot["loop_cpu_s"] else 0.0,
                  "cycles_per_cpu_s": tot["sim_cycles"] / tot["loop_cpu_s"] if tot["loop_cpu_s"] else 0.0},
        "wall_s": timing["wall_s"], "notes": notes, "layers": layers,
    }
    return CosimReport(data)


class CosimReport(dict):
    """The result of :func:`cosim`: a dict (what ``sfx cosim --json`` prints) with a text view.

    Top-level keys: ``mismatches`` and ``codes_compared`` (RTL against ``sfx.linear``, all
    operations), ``calls_differing_from_accelerator`` (layer calls whose decoded RTL output
    is not identical to the accelerator backend's), ``logits_equal_accelerator`` (the RTL
    forward's logits equal, bit for bit, those of ``--backend accelerator`` on the same
    tokens), ``bit_exact`` (no mismatch, every call identical, RTL forward logits, and
    perplexity in data mode, identical to the accelerator backend's, no RTL error flag;
    ``None`` when ``nan`` is set), ``nan`` (``None``, or where a NaN/infinity appeared and
    the module that first produced it: then nothing is called a mismatch), ``cycles``, ``macs``, ``utilization``, ``saturated``,
    ``max_abs_error`` (worst layer), ``mean_abs_error``, ``cosine`` (worst layer; errors of
    the decoded RTL output against the layer's fake-quantized output), ``fpga`` (Fmax source
    and time), ``forward`` (logits), ``perplexity`` (data mode: ``rtl``, ``accelerator``,
    ``fake``, ``float``, ``identical``), ``speed``, ``notes`` and ``layers`` (one entry per
    layer call).
    """

    def format(self) -> str:
        d = self
        lines = [f"cosim {d['kind']} {d['selection']!r} of {d['checkpoint']} ({d['model']}), {d['tokens']} token(s), "
                 f"{d['simulator']} via {d['engine']}, array {', '.join(d['arrays'])}; output exponents "
                 f"{d['output_exponents']}"]
        rows = d["layers"]
        hdr = f"  {'layer':<44} {'T x K -> N':>16} {'ops':>3} {'mism':>5} {'=acc':>4} {'cycles':>9} {'util':>5} " \
              f"{'max|err|':>9} {'cosine':>8} {'FPGA us':>8}"
        lines.append(hdr)
        shown = rows if len(rows) <= 16 else rows[:8] + [None] + rows[-4:]
        for r in shown:
            if r is None:
                lines.append(f"  ... {len(rows) - 12} more layer call(s) (--json lists all)")
                continue
            us = f"{r['fpga_us']:.1f}" if r["fpga_us"] is not None else "-"
            lines.append(f"  {r['name'][-44:]:<44} {str(r['T']) + ' x ' + str(r['K']) + ' -> ' + str(r['N']):>16} "
                         f"{r['ops']:>3} {r['mismatches']:>5} {'yes' if r['equal_to_accelerator'] else 'NO':>4} "
                         f"{r['cycles']:>9} {r['utilization']:>5.2f} {r['max_abs_error']:>9.4g} {r['cosine']:>8.5f} "
                         f"{us:>8}")
        fw = d["forward"]
        nan = d.get("nan")
        if nan:
            lines.append(f"NaN: NaN/infinity in {', '.join(nan['in'])}, {nan['description']}; not an RTL mismatch "
                         f"(the same in every pass): the comparison below cannot say YES or NO")
        verdict = "NaN" if nan else ("YES" if d["bit_exact"] else "NO")
        lines.append(f"bit-exact: {verdict}: {d['mismatches']} differing code(s) of "
                     f"{d['codes_compared']} (RTL vs sfx.linear on the same operations); "
                     f"{d['calls_differing_from_accelerator']} layer call(s) differ from the accelerator backend; "
                     f"logits of the RTL forward {'identical to' if fw['logits_identical'] else 'DIFFER from'} the "
                     f"accelerator backend's (max diff {fw['max_logit_diff']:.3g})"
                     + (f"; RTL error flag in {', '.join(d['rtl_error_flags'])}" if d["rtl_error_flags"] else ""))
        lines.append(f"logits vs --backend accelerator on the same {d['tokens']} token(s): "
                     + ("bit for bit EQUAL" if fw["logits_identical"] else "DIFFERENT")
                     + (" (NaN at the same positions)" if nan and fw["logits_identical"] else "")
                     + f" (max |diff| {fw['max_logit_diff']:.3g})")
        pp = d.get("perplexity")
        if pp:
            ln = (f"perplexity of {pp['data']} ({pp['rtl']['tokens']} scored): RTL {pp['rtl']['perplexity']:.6f}, "
                  f"accelerator backend {pp['accelerator']['perplexity']:.6f} "
                  f"({'identical' if pp['identical'] else 'DIFFERENT'}), fake-quantized "
                  f"{pp['fake']['perplexity']:.6f}")
            if pp.get("float"):
                ln += f", float {pp['float']['perplexity']:.6f}"
            lines.append(ln)
        rs = fw["rtl_vs_software"]
        nt = fw["next_token"]
        lines.append(f"vs the fake-quantized model: logits max |diff| {rs['max_abs_diff']:.4g}, cosine "
                     f"{rs['cosine']:.6f}, argmax agreement {rs['argmax_agreement']:.0%}, next token "
                     f"{nt['rtl']} vs {nt['software']}")
        if "rtl_vs_float" in fw:
            rf = fw["rtl_vs_float"]
            lines.append(f"vs the float model: logits max |diff| {rf['max_abs_diff']:.4g}, cosine {rf['cosine']:.6f}, "
                         f"argmax agreement {rf['argmax_agreement']:.0%}, next token {nt['rtl']} vs {nt['float']}")
        if "block_output" in fw:
            b = fw["block_output"]
            lines.append(f"block output: {'identical to' if b['identical_to_accelerator'] else 'DIFFERS from'} the "
                         f"accelerator backend's; vs fake-quantized max |err| {b['vs_software']['max_abs_error']:.4g}, "
                         f"cosine {b['vs_software']['cosine']:.6f}")
        lines.append(f"accelerator: {d['cycles']} cycles, utilization {d['utilization']:.2f}, {d['macs']} MACs, "
                     f"{d['saturated']} saturated output(s); worst layer vs fake-quantized max |err| "
                     f"{d['max_abs_error']:.4g}, cosine {d['cosine']:.6f}")
        fp = d["fpga"]
        for name, f in fp["per_array"].items():
            if f["fmax_mhz"]:
                lines.append(f"FPGA {fp['target']}: array {name} at {f['fmax_mhz']:.1f} MHz ({f['match']}: "
                             f"{f.get('config') or ''} from {f['source']})"
                             + (f" -> {fp['time_us']:.1f} us for these operations" if fp["time_us"] is not None
                                else ""))
            else:
                lines.append(f"FPGA {fp['target']}: array {name}: {f['source']}")
        sp = d["speed"]
        lines.append(f"simulation: RTL pass {sp['rtl_pass_s']:.1f} s ({sp['cycles_per_wall_s'] / 1e3:.0f} k simulated "
                     f"cycles per wall s, simulator start-up and host work included; CPU s: host "
                     f"{sp['rtl_pass_host_cpu_s']:.1f}, simulator {sp['rtl_pass_sim_cpu_s']:.1f}); simulator loop "
                     f"{sp['cycles_per_loop_s'] / 1e3:.0f} k cycles per wall s, {sp['cycles_per_cpu_s'] / 1e3:.0f} k "
                     f"per CPU s; total {d['wall_s']:.1f} s")
        for n in d["notes"]:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    @property
    def bit_exact(self) -> bool:
        """No mismatch and every comparison identical (``False`` as well when a NaN made the
        comparison meaningless: see ``self["nan"]``)."""
        return bool(self["bit_exact"])
