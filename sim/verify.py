"""Verification at scale: random LINEAR operations on the RTL until N output codes are checked.

:func:`verify_config` runs the cocotb test ``verify`` of :mod:`superfloat.sim.tb_harness` on
one accelerator configuration and one simulator: random operations
(:func:`superfloat.sim.tb_harness.verify_ops`: random shapes with tiling in T, N and K,
relu, both roundings, mult with extreme multipliers, per-row exponents, biases at the
accumulator limit, shifts over the legal range, ``k_max``), sent in jobs of 16 back to back
with a new random stall pattern on every stream per job, every code compared with
``sfx.linear`` and the RTL's ``sat_count`` with the reference's. It also runs the harness
regression tests (long result back-pressure, reset in the middle of an operation, malformed
commands, bias out of range) with the same seed. ``sfx verify`` and ``sfx bench rtl`` use it.

:data:`SHIPPED_CONFIGS`: the configurations the project ships: the 8x8 SF8 array of
``sfx verilog`` / ``sfx cosim`` / ``sfx bench rtl``, its SF4-weight variant (SF4 checkpoints),
and the two FPGA baseline arrays (``hw/fpga/regress.py``: iCE40 UP5K 2x2 SF4, ECP5-25k 2x2 SF8,
also the board builds' default), and two arrays generated with the per-row activation multiplier
(``xmult``, SPEC revision 2; name suffix ``-x``): the 8x8 SF4-weight array of ``act_scale="float"``
checkpoints and a 2x2 SF16 array whose clamp products ``|acc| * mult * xmult`` exceed 64 bits.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from superfloat.hw.interface import AccelParams

__all__ = ["SHIPPED_CONFIGS", "parse_config", "config_name", "verify_config"]

SHIPPED_CONFIGS = {
    "8x8-a8w8o8": dict(rows=8, cols=8, a_bits=8, w_bits=8, out_bits=8, k_max=16384),
    "8x8-a8w4o8": dict(rows=8, cols=8, a_bits=8, w_bits=4, out_bits=8, k_max=16384),
    "2x2-a4w4o4": dict(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=16384),
    "2x2-a8w8o8": dict(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=16384),
    "8x8-a8w4o8-x": dict(rows=8, cols=8, a_bits=8, w_bits=4, out_bits=8, k_max=16384, xmult=True),
    "2x2-a16w16o16-x": dict(rows=2, cols=2, a_bits=16, w_bits=16, out_bits=16, k_max=16384, xmult=True),
}


def config_name(p: AccelParams | dict) -> str:
    d = p if isinstance(p, dict) else dict(rows=p.rows, cols=p.cols, a_bits=p.a_bits, w_bits=p.w_bits,
                                           out_bits=p.out_bits, k_max=p.k_max, xmult=p.xmult)
    return f"{d['rows']}x{d['cols']}-a{d['a_bits']}w{d['w_bits']}o{d['out_bits']}" + (
        "" if d["k_max"] == 16384 else f"-k{d['k_max']}") + ("-x" if d.get("xmult") else "")


def parse_config(text: str) -> AccelParams:
    """``RxC-aAwWoO[-kK][-x]`` (e.g. ``8x8-a8w8o8``, ``4x4-a8w4o8-k64``; ``-x``: generated with the
    per-row activation multiplier) or a name of :data:`SHIPPED_CONFIGS`."""
    import re

    from superfloat.sw import sfx

    if text in SHIPPED_CONFIGS:
        return AccelParams(**SHIPPED_CONFIGS[text])
    m = re.fullmatch(r"(\d+)x(\d+)-a(\d+)w(\d+)o(\d+)(?:-k(\d+))?(-x)?", text)
    if not m:
        raise ValueError(f"configuration {text!r} is not RxC-aAwWoO[-kK][-x] (e.g. 8x8-a8w8o8, 4x4-a8w4o8-k64, "
                         f"8x8-a8w4o8-x) or one of {', '.join(SHIPPED_CONFIGS)}")
    r, c, a, w, o, k, x = m.groups()
    return AccelParams(rows=int(r), cols=int(c), a_bits=int(a), w_bits=int(w), out_bits=int(o),
                       k_max=int(k) if k else sfx.DEFAULT_K_MAX, xmult=bool(x))


def verify_config(p: AccelParams, *, simulator: str, codes: int, seed: int, regressions: bool = True,
                  run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``verify`` (and, with ``regressions``, the harness regression tests) on ``p`` and
    ``simulator`` with ``seed``; return the statistics (``codes``, ``operations``, ``jobs``,
    ``jobs_with_stalls``, ``cycles``, ``features``, ``seed``, times). Raises
    :class:`superfloat.sim.runner.SimulationFailed` (naming the failing test, the seed and the
    first wrong element) when anything differs."""
    from . import runner
    from .linear import build_harness, params_env
    from .tb_harness import HARNESS_TESTS

    if isinstance(codes, bool) or not isinstance(codes, int) or codes < 1:
        raise ValueError(f"codes must be a positive int, got {codes!r}")
    t0 = time.perf_counter()
    b = build_harness(p, simulator=simulator)
    build_s = time.perf_counter() - t0
    if run_dir is None:
        run_dir = b.dir / "runs" / f"verify-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{seed}"
    run_dir = Path(run_dir)
    tests = (list(HARNESS_TESTS) if regressions else []) + ["verify"]
    t1 = time.perf_counter()
    r = runner.run(b, "superfloat.sim.tb_harness", testcase=tests,
                   env={"SFX_SIM_PARAMS": params_env(p), "SFX_SIM_SEED": str(seed), "SFX_SIM_VERIFY_CODES": str(codes),
                        "SFX_SIM_NOPS": "6"}, run_dir=run_dir)
    wall = time.perf_counter() - t1
    stats = json.loads((run_dir / "sfx_verify.json").read_text())
    stats.update(config=config_name(p), simulator=simulator, tests_passed=r.tests - r.failed, tests=r.tests,
                 regression_tests=tests[:-1], run_wall_s=wall,
                 build_cached=b.cached, build_s=build_s, run_dir=str(run_dir))
    return stats
