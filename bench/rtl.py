"""``sfx bench rtl``: utilisation of the accelerator and speed of the co-simulation.

Everything goes through :func:`superfloat.sim.run_linear` on an 8x8 SF8 x SF8 -> SF8
accelerator (default ``k_max``), so the numbers are those a user of the co-simulation
API gets:

* utilisation ``T*N*K / (rows*cols*cycles)`` of LINEAR with T = N = 64 for several K
  (K = 1024 is the reference point; target >= 85 %);
* simulated cycles per second and MACs per second on Verilator (the T = N = 64, K = 1024
  operation; target >= 50k cycles/s) and Icarus (T = N = 32, K = 256), measured over
  the cocotb loop that drives the streams, both per wall-clock second and per CPU second
  of the simulator process (the latter does not depend on the machine's load, which is
  recorded too).

Every result is also compared with ``sfx.linear``; a mismatch fails the benchmark.
Writes ``<out_dir>/rtl_sim.md`` and ``rtl_sim.json``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from superfloat.bench import markdown_table, write_report

from superfloat.sim.linear import run_linear

ROWS = COLS = 8
BITS = 8
T = N = 64


def _operands(t: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1 << BITS, (t, k)).astype(np.uint8)
    w = rng.integers(0, 1 << BITS, (n, k)).astype(np.uint8)
    bias = rng.integers(-20000, 20001, n)
    # r = F - Mo - shift; K products of two SF8 magnitudes ~ 2**(14 + log2(K)/2 - 1)
    shift = -int(np.ceil(0.5 * np.log2(k)))
    return x, w, dict(bias=bias, shift=shift, x_exponent=rng.integers(-1, 2, t), relu=False,
                      rounding="nearest_even")


def _one(simulator: str, t: int, n: int, k: int, seed: int = 0) -> dict:
    x, w, kw = _operands(t, n, k, seed)
    codes, st = run_linear(x, w, a_bits=BITS, w_bits=BITS, out_bits=BITS, rows=ROWS, cols=COLS,
                           simulator=simulator, **kw)
    d = st.as_dict()
    d.update(T=t, N=n, K=k)
    return d


def run(out_dir: Path, quick: bool = False) -> None:
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    ks = (64, 256) if quick else (64, 256, 1024)
    t_n = 16 if quick else T
    util_rows, util = [], []
    for k in ks:
        d = _one("verilator", t_n, t_n, k)
        util.append(d)
        util_rows.append([f"{t_n}x{t_n}x{k}", d["cycles"], d["macs"], f"{100 * d['utilization']:.2f} %",
                          d["mismatches"]])
    speed = {"verilator": util[-1]}
    # Icarus is event-driven: about 1k cycles per CPU second on the busy 8x8 array, so a
    # smaller operation (same rate per cycle) keeps the benchmark to seconds, not minutes.
    speed["icarus"] = _one("icarus", 16 if quick else 32, 16 if quick else 32, 256)
    speed_rows = []
    for sim, d in speed.items():
        speed_rows.append([sim, f"{d['T']}x{d['N']}x{d['K']}", d["sim_cycles"], f"{d['loop_s']:.2f}", f"{d['cycles_per_s']:.0f}",
                           f"{d['cycles_per_cpu_s']:.0f}", f"{d['macs_per_s']:.3g}",
                           f"{100 * d['utilization']:.2f} %", d["mismatches"], f"{d['wall_s']:.1f}",
                           "yes" if d["build_cached"] else f"no ({d['build_s']:.0f} s)"])
    load1 = os.getloadavg()
    ref = util[-1]
    ver = speed["verilator"]
    verdict_u = "meets" if ref["utilization"] >= 0.85 else "MISSES"
    verdict_s = "meets" if ver["cycles_per_s"] >= 50_000 else "misses"
    verdict_c = "meets" if ver["cycles_per_cpu_s"] >= 50_000 else "MISSES"
    summary = (
        f"8x8 SF8 x SF8 -> SF8 accelerator (k_max 16384), LINEAR with T = N = {t_n}, per-row exponents, "
        f"bias, nearest-even; every operation streamed without stalls by `superfloat.sim.run_linear` and "
        f"compared with `sfx.linear` (mismatches must be 0).\n\n"
        f"* Utilisation at K = {ref['K']}: **{100 * ref['utilization']:.2f} %** ({verdict_u} the 85 % target).\n"
        f"* Verilator: **{ver['cycles_per_s']:.0f} simulated cycles/s** wall-clock ({verdict_s} the 50k target), "
        f"**{ver['cycles_per_cpu_s']:.0f} per CPU second** of the simulator process ({verdict_c} it); "
        f"{ver['macs_per_s']:.3g} MACs/s.\n"
        f"* Icarus: {speed['icarus']['cycles_per_s']:.0f} cycles/s wall-clock, "
        f"{speed['icarus']['cycles_per_cpu_s']:.0f} per CPU second.\n"
        f"* Machine load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores: wall-clock rates are lower on a loaded machine; the per-CPU-second "
        f"rates are what an idle core gives.\n")
    method = (
        "`cycles` counts clock cycles from the one in which the `cmd` beat is accepted to the one in "
        "which the last `res` beat is accepted (both included); utilisation = T*N*K / (rows*cols*cycles). "
        "Speed divides every simulated cycle of the run (reset included) by the wall-clock (or CPU) time "
        "of the cocotb loop that drove them; simulator start-up and the build are excluded (`wall_s` "
        "is the whole `run_linear` call, start-up and host-side packing included). The bench engine "
        "(`superfloat.sim.streams`) runs as two raw GPI callbacks per cycle; Verilator exposes only the "
        "top-level ports to VPI.")
    sections = [
        ("Summary", summary),
        ("Utilisation (Verilator)", markdown_table(["T x N x K", "cycles", "MACs", "utilisation", "mismatches"],
                                                   util_rows)),
        ("Co-simulation speed",
         markdown_table(["simulator", "T x N x K", "simulated cycles", "loop s", "cycles/s (wall)", "cycles/s (CPU)",
                         "MACs/s (wall)", "utilisation", "mismatches", "run_linear wall s", "build cached"],
                        speed_rows)),
        ("Method", method),
    ]
    data = {"rows": ROWS, "cols": COLS, "bits": BITS, "quick": quick, "utilization": util, "speed": speed,
            "loadavg_start": load0, "loadavg_end": load1, "bench_s": time.perf_counter() - t_start}
    write_report(out_dir, "rtl_sim", "RTL co-simulation: utilisation and speed", sections, data,
                 command="sfx bench rtl" + (" --quick" if quick else ""))
    bad = [d for d in util + [speed["icarus"]] if d["mismatches"] or d["padding_nonzero"] or d["error"]]
    if bad:
        raise RuntimeError(f"{len(bad)} run(s) differ from sfx.linear or raised error: "
                           + "; ".join(f"{d['simulator']} {d['T']}x{d['N']}x{d['K']}: {d['mismatches']} mismatches, "
                                       f"first {d['first_mismatch']}" for d in bad))
