"""``sfx bench rtl``: utilisation, co-simulation speed and verification at scale of the RTL.

Everything goes through the in-simulation harness (:mod:`superfloat.sim.harness`: beat
memories loaded in bulk, stream drivers, stall generators and monitors in Verilog; Python
touches the simulator once per job), so the numbers are those a user of
:func:`superfloat.sim.run_linear`, ``sfx cosim`` and ``sfx verify`` gets:

* utilisation ``T*N*K / (rows*cols*cycles)`` of LINEAR with T = N = 64 for several K on the
  8x8 SF8 array (K = 1024 is the reference point; target >= 85 %);
* speed of one simulator process on the 8x8 SF8 array (targets: Verilator >= 1 M simulated
  cycles per wall second, Icarus >= 20 k): one large operation through ``run_linear``, and a
  session of operations shaped like SmolLM2-135M's layers at 8 tokens (what ``sfx cosim`` runs),
  each per wall second and per CPU second of the simulator process, with the machine's load;
* verification at scale (:func:`superfloat.sim.verify.verify_config`): on every shipped
  configuration (:data:`superfloat.sim.verify.SHIPPED_CONFIGS`) and both simulators, at least
  10^6 random output codes (``--quick``: 2*10^4) of random operations with random stalls on every
  stream, every code against ``sfx.linear``, plus the harness regression tests (back-pressure,
  reset mid-operation, malformed commands, bias out of range); counts, features and seeds.

Every result is compared with ``sfx.linear``; a difference fails the benchmark. Writes
``<out_dir>/rtl_sim.md`` and ``rtl_sim.json``. The full run takes about an hour on 2 cores
(Icarus simulates the busy 8x8 array at about a thousand cycles per second).
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from superfloat.bench import markdown_table, write_report

ROWS = COLS = 8
BITS = 8
T = N = 64
VERIFY_CODES = 1_000_000
QUICK_VERIFY_CODES = 20_000
VERIFY_SEED = 20261203
#: reduced mode: ``SFX_BENCH_RTL_VERIFY_CODES="verilator=1000000,icarus=20000"`` sets the codes
#: checked per configuration on each simulator (Icarus checks about a hundred codes per second
#: on a loaded machine: 10^6 codes on each of the six configurations take hours); the report
#: says which counts ran and that they are below the 10^6 bar
VERIFY_CODES_ENV = "SFX_BENCH_RTL_VERIFY_CODES"


def verify_codes(quick: bool) -> dict[str, int]:
    """Codes per configuration for each simulator: 10^6 (``quick``: 2*10^4), or the counts of
    :data:`VERIFY_CODES_ENV` (``simulator=N`` pairs, comma-separated)."""
    base = QUICK_VERIFY_CODES if quick else VERIFY_CODES
    out = {"verilator": base, "icarus": base}
    spec = os.environ.get(VERIFY_CODES_ENV, "").strip()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        sim, _, n = part.partition("=")
        if sim not in out or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{VERIFY_CODES_ENV}={spec!r}: expected simulator=N pairs such as "
                             f"'verilator=1000000,icarus=20000'")
        out[sim] = int(n)
    return out
#: SmolLM2-135M's projections at 8 tokens: (T, K, N) of q, k, v, o, gate, up, down
SMOLLM2_OPS = [(8, 576, 576), (8, 576, 192), (8, 576, 192), (8, 576, 576), (8, 576, 1536), (8, 576, 1536),
               (8, 1536, 576)]


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
    from superfloat.sim.linear import run_linear

    x, w, kw = _operands(t, n, k, seed)
    _, st = run_linear(x, w, a_bits=BITS, w_bits=BITS, out_bits=BITS, rows=ROWS, cols=COLS, simulator=simulator,
                       **kw)
    d = st.as_dict()
    d.update(T=t, N=n, K=k, workload=f"run_linear {t}x{n}x{k}")
    return d


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _session(simulator: str, shapes: list[tuple[int, int, int]], label: str) -> dict:
    """Operations of ``shapes`` (T, K, N) through one :class:`RTLSession`: simulated cycles per
    wall second of the operations (host packing, file transfer and the ``sfx.linear`` check
    included, start-up excluded), of the simulator loop, and per CPU second."""
    from superfloat.sim.engines import ArrayConfig, RTLSession
    from superfloat.sw import sfx

    args = []
    for i, (t, k, n) in enumerate(shapes):
        x, w, kw = _operands(t, n, k, 100 + i)
        args.append(sfx.check_linear_args(x, w, a_bits=BITS, w_bits=BITS, out_bits=BITS, **kw))
    t0 = time.perf_counter()
    s = RTLSession(ArrayConfig(rows=ROWS, cols=COLS, a_bits=BITS, w_bits=BITS, out_bits=BITS, simulator=simulator))
    start = time.perf_counter() - t0
    try:
        t1, c1 = time.perf_counter(), _self_cpu()
        stats = [s.run(a)[1] for a in args]
        ops_s, host_cpu = time.perf_counter() - t1, _self_cpu() - c1
    finally:
        s.close()
    sim_cycles = sum(st.sim_cycles for st in stats)
    loop_s = sum(st.loop_s for st in stats)
    loop_cpu = sum(st.loop_cpu_s for st in stats)
    return {"simulator": simulator, "workload": label, "ops": len(stats), "sim_cycles": sim_cycles,
            "cycles": sum(st.cycles for st in stats), "macs": sum(st.macs for st in stats),
            "mismatches": sum(st.mismatches for st in stats), "padding_nonzero": sum(st.padding_nonzero for st in stats),
            "error": any(st.error for st in stats), "loop_s": loop_s, "loop_cpu_s": loop_cpu,
            "cycles_per_s": sim_cycles / loop_s, "cycles_per_cpu_s": sim_cycles / loop_cpu,
            "ops_wall_s": ops_s, "cycles_per_ops_wall_s": sim_cycles / ops_s, "host_cpu_s": host_cpu,
            "start_s": start, "wall_s": start + ops_s, "build_cached": s.build.cached, "build_s": s.build.build_s,
            "utilization": sum(st.macs for st in stats) / (ROWS * COLS * sum(st.cycles for st in stats))}


def _hw_state() -> dict:
    """The RTL that was measured: the commit, whether ``hw/`` had uncommitted changes, and the
    digest of the ``hw/`` sources that keys the simulator builds."""
    from superfloat.sim.linear import _hw_sources_digest

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "hw"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {"commit": commit, "hw_uncommitted_changes": dirty, "hw_digest": _hw_sources_digest()[:16]}


def _verify_all(codes: dict[str, int], progress) -> list[dict]:
    from superfloat.hw.interface import AccelParams
    from superfloat.sim.verify import SHIPPED_CONFIGS, verify_config

    jobs = []
    for i, (name, cfg) in enumerate(SHIPPED_CONFIGS.items()):
        for sim in ("icarus", "verilator"):
            jobs.append((name, cfg, sim, VERIFY_SEED + i))  # the same seed on both: the same cycles
    # the slowest first (Icarus on the 8x8 arrays), two simulator processes at a time
    jobs.sort(key=lambda j: -(j[1]["rows"] * j[1]["cols"] * (50 if j[2] == "icarus" else 1)))

    def one(job):
        name, cfg, sim, seed = job
        progress(f"verify {name} on {sim}: {codes[sim]} codes, seed {seed}")
        st = verify_config(AccelParams(**cfg), simulator=sim, codes=codes[sim], seed=seed)
        progress(f"verify {name} on {sim}: {st['codes']} codes of {st['operations']} operations checked, "
                 f"{st['cycles']} cycles, {st['wall_s']:.0f} s")
        return st

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, jobs))


def run(out_dir: Path, quick: bool = False) -> None:
    def progress(msg: str) -> None:
        print(f"[bench rtl {time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    hw = _hw_state()
    ks = (64, 256) if quick else (64, 256, 1024)
    t_n = 16 if quick else T
    util_rows, util = [], []
    for k in ks:
        d = _one("verilator", t_n, t_n, k)
        util.append(d)
        util_rows.append([f"{t_n}x{t_n}x{k}", d["cycles"], d["macs"], f"{100 * d['utilization']:.2f} %",
                          d["mismatches"]])
    progress("utilisation done")
    # speed: one simulator process, 8x8 SF8
    speed = [_one("verilator", 32 if quick else 128, 32 if quick else 128, 1024 if quick else 4096),
             _session("verilator", SMOLLM2_OPS * (1 if quick else 4),
                      f"session: SmolLM2 layer projections at 8 tokens x{1 if quick else 4}"),
             _one("icarus", 16 if quick else 32, 16 if quick else 32, 256),
             _session("icarus", [(8, 64, 64)] * (2 if quick else 6), f"session: 8x64->64 x{2 if quick else 6}")]
    progress("speed done")
    for d in speed:
        d.setdefault("cycles_per_ops_wall_s", None)
    codes = verify_codes(quick)
    reduced = {sim: n for sim, n in codes.items() if n < VERIFY_CODES}
    verify = _verify_all(codes, progress)
    load1 = os.getloadavg()

    speed_rows = []
    for d in speed:
        whole = d["sim_cycles"] / d["wall_s"] if d.get("wall_s") else 0.0
        speed_rows.append([d["simulator"], d["workload"], d["sim_cycles"], f"{d['loop_s']:.2f}",
                           f"{d['loop_cpu_s']:.2f}", f"{d['cycles_per_s']:,.0f}", f"{d['cycles_per_cpu_s']:,.0f}",
                           f"{d['cycles_per_ops_wall_s']:,.0f}" if d.get("cycles_per_ops_wall_s") else "-",
                           f"{d['wall_s']:.1f}", f"{whole:,.0f}", f"{100 * d['utilization']:.1f} %",
                           d["mismatches"]])
    ver_rows = []
    for v in verify:
        f = v["features"]
        ver_rows.append([v["config"], v["simulator"], v["seed"], f"{v['codes']:,}", f"{v['operations']:,}",
                         f"{v['jobs']} ({v['jobs_with_stalls']})", f"{v['cycles']:,}",
                         "/".join(str(f.get(k, 0)) for k in ("relu", "toward_zero", "mult", "xexp", "xmult",
                                                             "bias_at_limit", "k_max")),
                         f"{f['saturated_codes']:,}", f"{v['tests_passed']}/{v['tests']}", f"{v['wall_s']:.0f}",
                         f"{v['cpu_s']:.0f}", f"{v['codes'] / v['wall_s']:,.0f}"])
    ref = util[-1]
    ver_big = speed[0]
    ver_sess = speed[1]
    ica = speed[2]
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    all_ok = all(v["codes"] >= codes[v["simulator"]] and v["tests_passed"] == v["tests"] for v in verify)
    by = {}
    for v in verify:
        by.setdefault(v["config"], {})[v["simulator"]] = v
    same_codes = codes["icarus"] == codes["verilator"]
    same_cycles = same_codes and all(len(d) == 2 and d["icarus"]["cycles"] == d["verilator"]["cycles"]
                                     and d["icarus"]["codes"] == d["verilator"]["codes"] for d in by.values())
    summary = (
        f"8x8 SF8 x SF8 -> SF8 accelerator (k_max 16384), every operation streamed by the in-simulation harness "
        f"and compared with `sfx.linear` (mismatches must be 0). RTL measured: commit {hw['commit']}"
        + (", **with uncommitted changes in hw/**" if hw["hw_uncommitted_changes"] else "")
        + f" (hw digest {hw['hw_digest']}).\n\n"
        f"* Utilisation at K = {ref['K']}: **{100 * ref['utilization']:.2f} %** ({verdict(ref['utilization'] >= 0.85)} "
        f"the 85 % target).\n"
        f"* Verilator, one process: **{ver_big['cycles_per_s']:,.0f} simulated cycles per wall second** on one "
        f"{ver_big['T']}x{ver_big['N']}x{ver_big['K']} operation ({ver_big['cycles_per_cpu_s']:,.0f} per CPU second; "
        f"{verdict(ver_big['cycles_per_s'] >= 1e6)} the 1 M target), "
        f"{ver_sess['cycles_per_ops_wall_s']:,.0f} per wall second over a session of SmolLM2-shaped operations with "
        f"the host's packing and checking included ({ver_sess['cycles_per_cpu_s']:,.0f} per simulator CPU second; "
        f"{verdict(ver_sess['cycles_per_ops_wall_s'] >= 1e6)} it); {ver_big['macs_per_s']:.3g} MACs per wall second.\n"
        f"* Icarus, one process: **{ica['cycles_per_s']:,.0f} cycles per wall second** "
        f"({ica['cycles_per_cpu_s']:,.0f} per CPU second; {verdict(ica['cycles_per_s'] >= 2e4)} the 20 k target).\n"
        f"* Verification at scale: {'every' if all_ok else 'NOT every'} shipped configuration on both simulators "
        f"checked " + " and ".join(f"{codes[sim]:,} or more ({sim.capitalize()})" for sim in ("verilator", "icarus"))
        + f" random output codes per configuration against `sfx.linear` with random stalls on every stream "
        f"(seeds in the table), and passed the harness regression tests. "
        + (f"**Reduced mode** (`{VERIFY_CODES_ENV}={os.environ.get(VERIFY_CODES_ENV, '')}`): "
           + ", ".join(f"{sim.capitalize()} {n:,} codes" for sim, n in reduced.items())
           + f" per configuration, below the issue's bar of {VERIFY_CODES:,} on both simulators. " if reduced else "")
        + ("With the same seed, Verilator and Icarus ran the same operations in identical cycle counts on every "
           "configuration (the stall generators are part of the harness's RTL, not of the simulator).\n"
           if same_cycles else
           ("With the same seed, Verilator and Icarus did NOT run in identical cycle counts on every "
            "configuration.\n" if same_codes else
            "The two simulators checked different numbers of codes, so their cycle counts are not compared.\n"))
        + f"* Machine load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores (shared): wall-clock rates are lower on a loaded machine; CPU-second rates are "
        f"closer to what an idle core gives.\n")
    method = (
        "`cycles` counts clock cycles from the one in which the `cmd` beat is accepted to the one in which the "
        "last `res` beat is accepted (both included); utilisation = T*N*K / (rows*cols*cycles). The loop figures "
        "divide every simulated cycle (reset included) by the wall-clock (or CPU) time between cocotb's `go` and "
        "the harness's `done`, which includes loading the job's beat files (`$fread`) and writing the results; "
        "`whole` divides by the whole call: `run_linear` (simulator and Python start-up, packing, "
        "reading back) or the session (start-up, then every operation with host packing and the `sfx.linear` "
        "check). CPU seconds are those of the simulator process (`time.process_time` inside it). The session rows "
        "are what `sfx cosim` runs; `sfx bench cosim` measures the whole SmolLM2 forward.\n\n"
        "Verification: `sfx verify --config C --simulator S --codes N --seed SEED` runs one row "
        "(`superfloat.sim.verify.verify_config`: the cocotb test `verify` of `superfloat.sim.tb_harness` plus "
        "its regression tests). Operations (`verify_ops`): T and N in {1, rows + 1, 2, 3 or 4 tiles, random up to max(4 rows + 1, 33)}; K "
        "mostly 1..2*rows, 10 % x rows*cols/64 up to 64, 0.5 % x rows*cols/64 up to 1024, one K = k_max operation (one tile) per 100k codes; relu, rounding, mult (with "
        "extreme multipliers), per-row exponents at random, and on the `-x` arrays per-row multipliers `xmult` "
        "(SPEC revision 2) at random; a quarter of the biases at the accumulator limit; "
        "shifts spread over the legal range. Jobs of 16 operations back to back; each job draws a stall pattern "
        "per stream (`STALL_PATTERNS`; a quarter of the jobs at full rate). Features: operations with relu / "
        "toward_zero / mult / per-row exponents / xmult / a bias at the limit / K = k_max.")
    sections = [
        ("Summary", summary),
        ("Utilisation (Verilator)", markdown_table(["T x N x K", "cycles", "MACs", "utilisation", "mismatches"],
                                                   util_rows)),
        ("Co-simulation speed (8x8 SF8, one simulator process)",
         markdown_table(["simulator", "workload", "simulated cycles", "loop s", "loop CPU s", "cycles/s (loop wall)",
                         "cycles/s (loop CPU)", "cycles/s (ops wall)", "whole s", "cycles/s (whole)", "utilisation",
                         "mismatches"], speed_rows)),
        ("Verification at scale",
         markdown_table(["configuration", "simulator", "seed", "codes checked", "operations", "jobs (with stalls)",
                         "cycles", "relu/tz/mult/xexp/xmult/bias-limit/k_max ops", "saturated codes", "tests passed",
                         "wall s", "CPU s", "codes/s"], ver_rows)),
        ("Method", method),
    ]
    data = {"rows": ROWS, "cols": COLS, "bits": BITS, "quick": quick, "hw": hw, "utilization": util, "speed": speed,
            "verify": verify, "verify_codes": codes, "verify_reduced": reduced,
            "verify_same_cycles_on_both": same_cycles, "loadavg_start": load0, "loadavg_end": load1,
            "bench_s": time.perf_counter() - t_start}
    write_report(out_dir, "rtl_sim", "RTL co-simulation: utilisation, speed and verification at scale", sections,
                 data, command="sfx bench rtl" + (" --quick" if quick else ""))
    bad = [d for d in util + speed if d["mismatches"] or d["padding_nonzero"] or d["error"]]
    if bad:
        raise RuntimeError(f"{len(bad)} run(s) differ from sfx.linear or raised error: "
                           + "; ".join(f"{d['simulator']} {d['workload']}: {d['mismatches']} mismatches" for d in bad))
    if not all_ok:
        raise RuntimeError("verification at scale did not complete on every configuration")
