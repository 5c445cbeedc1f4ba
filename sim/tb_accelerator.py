"""cocotb benches of :class:`superfloat.hw.accelerator.SFxAccelerator` (the top ``sfx_accelerator``).

Run through :mod:`superfloat.sim.runner` (``tests/test_sim_accelerator.py`` does it for
several configurations on Verilator and Icarus). The environment carries:

* ``SFX_SIM_PARAMS``: the generation parameters (JSON of ``AccelParams``), needed by the
  regression tests to pack beats;
* ``SFX_SIM_SEED``: base seed of the random operations and stalls (default 1);
* ``SFX_SIM_NOPS``: operations per random test (default 6);
* ``SFX_SIM_INJECT=flip``: expect a wrong ``Y[0, 0]`` in the first operation (a self-test:
  the scoreboard must then fail);
* ``SFX_SIM_JOB`` / ``SFX_SIM_OUT``: the ``.npz`` files of a :func:`run_linear` job
  (test ``run_job``; skipped without them).

Every ``res`` beat is checked by a :class:`~superfloat.sim.scoreboard.LinearScoreboard`
against ``sfx.linear`` as it is taken; the sink also checks the handshake rules of
``res``. Tests never write DUT signals themselves: the :class:`StreamBench` loop does.
"""
from __future__ import annotations

import json
import math
import os
import random

import cocotb
import numpy as np

from superfloat.hw.interface import AccelParams
from superfloat.sw import sfx

from .packing import cmd_word, linear_traffic
from .scoreboard import LinearScoreboard
from .streams import StreamBench, StreamDriver, StreamSink, read_int

DRIVEN = ("cmd", "par", "act", "wgt")

#: The configurations the CI runs these benches on (each on Verilator and Icarus).
CONFIGS = {
    "sf8_4x4": dict(rows=4, cols=4, a_bits=8, w_bits=8, out_bits=8, k_max=64),
    "sf4w_2x3": dict(rows=2, cols=3, a_bits=8, w_bits=4, out_bits=8, k_max=64),
    "sf2w_3x2": dict(rows=3, cols=2, a_bits=8, w_bits=2, out_bits=6, k_max=32),
    "sf16_2x2": dict(rows=2, cols=2, a_bits=16, w_bits=16, out_bits=16, k_max=64),
    # the per-row activation multiplier (SPEC revision 2): |acc| * mult * xmult has A + 32 = 70 bits
    "sf16_2x2_xmult": dict(rows=2, cols=2, a_bits=16, w_bits=16, out_bits=16, k_max=64, xmult=True),
}

#: The regression tests (run_job is the run_linear entry point, not a regression test).
REGRESSION_TESTS = ("random_ops_with_stalls", "back_to_back_full_rate", "edge_values", "long_result_backpressure",
                    "reset_mid_operation", "malformed_commands", "bias_out_of_range")


def _params() -> AccelParams:
    raw = os.environ.get("SFX_SIM_PARAMS")
    if not raw:
        raise RuntimeError("SFX_SIM_PARAMS is not set: run these benches through superfloat.sim.runner "
                           "(see tests/test_sim_accelerator.py)")
    return AccelParams(**json.loads(raw))


def _seed() -> int:
    return int(os.environ.get("SFX_SIM_SEED", "1"))


class AccelBench:
    """The accelerator with a driver per input stream, a checked sink on ``res`` and a scoreboard."""

    def __init__(self, dut, p: AccelParams, *, stalls: float = 0.0, seed: int = 1, name: str = ""):
        self.dut = dut
        self.p = p
        self.rng = random.Random(seed)
        self.bench = StreamBench(dut)
        self.sb = LinearScoreboard(p, context=f"{name} seed={seed}")
        self.drv = {s: self.bench.add(StreamDriver(dut, s, gap_prob=stalls, max_gap=5, seed=self.rng.random()))
                    for s in DRIVEN}
        self.res = self.bench.add(StreamSink(dut, "res", stall_prob=stalls, max_stall=6, on_beat=self.sb.check,
                                             keep=False, seed=self.rng.random()))
        self.sat_expected = 0  # reference saturations since the last reset
        self.queued_beats = 0
        self._logged = 0

    def set_stalls(self, prob: float) -> None:
        for d in self.drv.values():
            d.gap_prob = prob
        self.res.stall_prob = prob

    async def start(self) -> None:
        await self.bench.start()

    async def reset(self) -> None:
        await self.bench.reset(3)
        self.sb.clear()
        self.sat_expected = 0
        self.queued_beats = 0

    def send(self, args: sfx.LinearArgs, *, name: str = "", check: bool = True) -> None:
        """Queue one operation on every stream (back-to-back after what is queued)."""
        tr = linear_traffic(args, self.p)
        if check:
            op = self.sb.expect_linear(args, name=name, info=describe(args))
            self.sat_expected += op.n_saturated
            if os.environ.get("SFX_SIM_INJECT") == "flip" and len(self.sb.done_ops) + len(self.sb.pending) == 1:
                # Self-test of the checking: expect a wrong code for Y[0, 0] of the first operation.
                op.codes = op.codes.copy()
                op.codes[0, 0] ^= 1
                op.words = self.sb.expect(op.codes).words
                self.sb.pending.pop()
        self.drv["cmd"].put([tr.cmd])
        self.drv["par"].put(tr.par)
        self.drv["act"].put(tr.act)
        self.drv["wgt"].put(tr.wgt)
        self.queued_beats += len(tr.act) + tr.res_beats + len(tr.par) + 1

    def status(self) -> dict:
        d = self.dut
        return {"busy": read_int(d.busy), "error": read_int(d.error), "sat_count": read_int(d.sat_count)}

    def quiet(self) -> bool:
        return self.sb.idle and all(d.idle for d in self.drv.values())

    async def drain(self, what: str = "operations") -> int:
        """Wait until every queued beat is taken, every result checked, and busy falls."""
        budget = 40 * self.queued_beats + 4000
        n = await self.bench.until(self.quiet, max_cycles=budget, what=f"{what} ({self.bench.summary()})")
        n += await self.bench.until(lambda: read_int(self.dut.busy) == 0, max_cycles=200 + 4 * self.p.cols,
                                    what="busy to fall")
        self.queued_beats = 0
        for op in self.sb.done_ops[self._logged:]:
            self.dut._log.info("checked %s: %d res beats %s", op.name, len(op.words), op.info)
        self._logged = len(self.sb.done_ops)
        return n

    def check_status(self, *, error: int, where: str) -> None:
        st = self.status()
        exp_sat = min(self.sat_expected, (1 << 32) - 1)
        assert st["error"] == error, f"{where}: error is {st['error']}, expected {error} ({st})"
        assert st["sat_count"] == exp_sat, (f"{where}: sat_count is {st['sat_count']}, the reference model "
                                            f"saturated {exp_sat} outputs since reset")


def describe(args: sfx.LinearArgs) -> dict:
    return {"T": args.T, "N": args.N, "K": args.K, "relu": args.relu, "rounding": args.rounding,
            "mult": args.mult is not None, "xexp": bool(np.any(args.x_exponent)), "xmult": args.xmult is not None}


# --------------------------------------------------------------------------- random operations


def random_args(rng: random.Random, p: AccelParams, *, use_mult: bool, use_xexp: bool, t: int | None = None,
                n: int | None = None, k: int | None = None, relu: bool | None = None,
                rounding: str | None = None, use_xmult: bool | None = None) -> sfx.LinearArgs:
    """A random legal LINEAR operation for the array ``p`` (tiling in T, N and K exercised).
    ``use_xmult``: per-row multipliers (SPEC revision 2); default: at random on an
    accelerator generated with ``xmult`` (drawn from ``rng`` only then), else never."""
    if use_xmult is None:
        use_xmult = p.xmult and bool(rng.getrandbits(1))
    nprng = np.random.default_rng(rng.getrandbits(32))
    t = t or rng.choice([1, p.rows, p.rows + 1, rng.randint(1, 2 * p.rows + 1)])
    n = n or rng.choice([1, p.cols, p.cols + 1, rng.randint(1, 2 * p.cols + 1)])
    k = k or rng.choice([1, 2, p.k_max, rng.randint(1, p.k_max)])
    k = min(k, p.k_max)
    x = nprng.integers(0, 1 << p.a_bits, size=(t, k))
    w = nprng.integers(0, 1 << p.w_bits, size=(n, k))
    f = p.frac_bits
    mo = p.out_bits - 1
    base = f + sfx.MULT_FRAC_BITS * (use_mult + use_xmult) - mo  # r = base - shift - xexp
    # Results near the output range: |acc| ~ 2**(F + log2(K)/2 - 1) (times ~2**15.5 with mult, xmult).
    center = f + 0.5 * math.log2(k) - 1 + 15.5 * (use_mult + use_xmult) - mo
    xe = nprng.integers(-2, 3, size=t) if use_xexp else np.zeros(t, dtype=np.int64)
    lo, hi = int(max(0, xe.max())), int(63 + min(0, xe.min()))  # r_n - xexp[t] in 0..63
    r_n = np.clip(np.round(center) + nprng.integers(-3, 4, size=n), lo, hi)
    shift = base - r_n
    if not np.all((shift >= -128) & (shift <= 127)):
        shift = np.clip(shift, -128, 127)
    acc_lim = (1 << (sfx.accumulator_bits(p.a_bits, p.w_bits, p.k_max) - 2)) - 1
    bscale = 1 << max(1, int(f + 0.5 * math.log2(k)))
    bias = nprng.integers(-bscale, bscale + 1, size=n)
    if rng.random() < 0.25:
        bias[nprng.integers(0, n)] = rng.choice([acc_lim, -acc_lim])
    mult = None
    if use_mult:
        mult = nprng.integers(1 << 15, 1 << 16, size=n)
        if rng.random() < 0.5:
            mult[nprng.integers(0, n)] = rng.choice([1, (1 << 16) - 1, rng.randint(1, (1 << 15) - 1)])
    xmult = None
    if use_xmult:
        xmult = nprng.integers(1 << 15, 1 << 16, size=t)
        if rng.random() < 0.5:
            xmult[nprng.integers(0, t)] = rng.choice([1, (1 << 16) - 1, rng.randint(1, (1 << 15) - 1)])
    return sfx.check_linear_args(
        x, w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, bias=bias, shift=shift,
        relu=rng.random() < 0.5 if relu is None else relu,
        rounding=rng.choice(sfx.ROUNDINGS) if rounding is None else rounding,
        k_max=p.k_max, mult=mult, x_exponent=xe if use_xexp else None, xmult=xmult)


def edge_args(p: AccelParams, which: str) -> sfx.LinearArgs:
    """Deterministic corner cases: saturation, extreme bias, r = 0 and r = 63, negative zero."""
    f, mo = p.frac_bits, p.out_bits - 1
    ma, mw = (1 << (p.a_bits - 1)) - 1, (1 << (p.w_bits - 1)) - 1
    sa, sw = 1 << (p.a_bits - 1), 1 << (p.w_bits - 1)
    t, n, k = p.rows + 1, p.cols + 1, p.k_max
    acc_lim = (1 << (sfx.accumulator_bits(p.a_bits, p.w_bits, p.k_max) - 2)) - 1
    kw = dict(a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max)
    if which == "saturate":
        # +max * +max, +max * -max, -max * -max, negative zero: every sign combination at full scale.
        x = np.array([[ma, sa | ma, sa, 0][i % 4] for i in range(t * k)]).reshape(t, k)
        w = np.array([[mw, sw | mw, sw][j % 3] for j in range(n * k)]).reshape(n, k)
        return sfx.check_linear_args(x, w, shift=f - mo - 1 if f - mo >= 1 else 0, **kw)
    if which == "bias":
        x = np.full((t, k), ma)
        w = np.full((n, k), sw | mw)
        bias = np.array([acc_lim if j % 2 else -acc_lim for j in range(n)])
        return sfx.check_linear_args(x, w, bias=bias, relu=True, rounding="toward_zero", **kw)
    if which == "shifts":
        # r = 0 on even channels, r = 63 on odd ones (with mult: r = F + 16 - Mo - shift).
        rng = np.random.default_rng(7)
        x = rng.integers(0, 1 << p.a_bits, size=(t, k))
        w = rng.integers(0, 1 << p.w_bits, size=(n, k))
        base = f + sfx.MULT_FRAC_BITS - mo
        shift = np.array([base if j % 2 == 0 else base - 63 for j in range(n)])
        mult = rng.integers(1, 1 << 16, size=n)
        return sfx.check_linear_args(x, w, shift=shift, mult=mult, rounding="nearest_even", **kw)
    if which in ("exponents_low", "exponents_high"):
        # Per-row exponents and per-channel shifts near the ends of int8 with opposite signs:
        # their sum (r = base - shift - xexp) is in range only if the RTL adds them without
        # wrapping to 8 bits.
        rng = np.random.default_rng(11)
        x = rng.integers(0, 1 << p.a_bits, size=(t, k))
        w = rng.integers(0, 1 << p.w_bits, size=(n, k))
        base = f - mo
        if which == "exponents_low":
            xe = np.array([-120 if i % 2 else -100 for i in range(t)])
            shift = np.array([base + 100 - (j % 3) for j in range(n)])  # r = 20..29 and 0..9 (-100 rows)
        else:
            xe = np.array([120 if i % 2 else 100 for i in range(t)])
            shift = np.array([base - 120 - (j % 3) for j in range(n)])  # r = 0..2 and 20..22
        shift = np.clip(shift, -128, 127)
        return sfx.check_linear_args(x, w, shift=shift, x_exponent=xe, relu=False, rounding="toward_zero", **kw)
    raise ValueError(which)


# --------------------------------------------------------------------------- tests


@cocotb.test()
async def random_ops_with_stalls(dut):
    """Back-to-back random operations (all shapes of tiling, relu, both roundings, with and
    without per-channel multipliers and per-row exponents) with random stalls on every stream."""
    p = _params()
    nops = int(os.environ.get("SFX_SIM_NOPS", "6"))
    ab = AccelBench(dut, p, stalls=0.3, seed=_seed(), name="random_ops_with_stalls")
    await ab.start()
    rng = random.Random(_seed() * 7919 + 1)
    for i in range(nops):
        ab.send(random_args(rng, p, use_mult=bool(i & 1), use_xexp=bool(i & 2)), name=f"op{i}")
    await ab.drain()
    assert len(ab.sb.done_ops) == nops
    ab.check_status(error=0, where="after random operations")


@cocotb.test()
async def back_to_back_full_rate(dut):
    """Operations queued back to back without stalls, changing relu, rounding, shape, mult and
    per-row exponents from one to the next."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.0, seed=_seed() + 1, name="back_to_back_full_rate")
    await ab.start()
    rng = random.Random(_seed() * 31 + 5)
    combos = [(False, False, False, "nearest_even"), (True, True, True, "toward_zero"),
              (True, False, False, "toward_zero"), (False, True, True, "nearest_even")]
    for i, (mult, xexp, relu, rnd) in enumerate(combos):
        ab.send(random_args(rng, p, use_mult=mult, use_xexp=xexp, relu=relu, rounding=rnd), name=f"op{i}")
    await ab.drain()
    ab.check_status(error=0, where="after back-to-back operations")


@cocotb.test()
async def edge_values(dut):
    """Full-scale codes of every sign (saturation), negative zero, extreme biases with relu and
    truncation, K = k_max, right shifts of 0 and 63 with multipliers, per-row exponents and
    shifts near the ends of int8 with opposite signs; with stalls."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.2, seed=_seed() + 2, name="edge_values")
    await ab.start()
    for which in ("saturate", "bias", "shifts", "exponents_low", "exponents_high"):
        ab.send(edge_args(p, which), name=which)
    await ab.drain()
    ab.check_status(error=0, where="after edge values")


@cocotb.test()
async def long_result_backpressure(dut):
    """Drain-bound operations (K = 1, 2: results faster than inputs) while ``res`` is held
    off for long runs: the result FIFO fills, the array must wait, nothing may be lost."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.0, seed=_seed() + 6, name="long_result_backpressure")
    ab.res.stall_prob, ab.res.max_stall = 0.7, 60
    await ab.start()
    rng = random.Random(_seed() * 19 + 6)
    for i in range(4):
        ab.send(random_args(rng, p, use_mult=bool(i & 1), use_xexp=bool(i & 2), t=2 * p.rows + 1,
                            n=2 * p.cols + 1, k=1 + (i & 1)), name=f"op{i}")
    await ab.drain()
    ab.check_status(error=0, where="after long result back-pressure")


@cocotb.test()
async def reset_mid_operation(dut):
    """Reset while an operation is in flight (during the input stream, during the result
    drain), then check that the status is clear and the next operation is correct."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.25, seed=_seed() + 3, name="reset_mid_operation")
    await ab.start()
    rng = random.Random(_seed() * 17 + 3)
    for phase in ("inputs", "results", "blocked", "inputs"):
        big = phase == "blocked"  # enough tiles to overflow the result FIFO
        args = random_args(rng, p, use_mult=True, use_xexp=True, t=(4 if big else 2) * p.rows,
                           n=(2 if big else 1) * p.cols + 1, k=max(2, p.k_max // 2))
        ab.send(args, name=f"aborted-{phase}")
        if phase == "inputs":
            cut = rng.randint(1, max(1, ab.drv["act"].pending - 1))
            target = ab.drv["act"].transfers + cut
            await ab.bench.until(lambda: ab.drv["act"].transfers >= target, max_cycles=40 * cut + 1000,
                                 what="act beats before the reset")
        elif phase == "results":
            target = ab.res.transfers + 1
            await ab.bench.until(lambda: ab.res.transfers >= target, max_cycles=40 * ab.queued_beats + 1000,
                                 what="a first res beat before the reset")
        else:  # res never ready: the result FIFO fills and the array stalls, then reset
            stall = ab.res.stall_prob
            ab.res.stall_prob, ab.res.max_stall = 1.0, 1
            taken = ab.res.transfers
            await ab.bench.cycles(2 * ab.drv["act"].pending + 50 * p.cols)
            assert ab.res.transfers == taken, "res transferred while ready was low"
            assert ab.drv["act"].pending > 0, "the inputs were all taken although no result could leave"
            ab.res.stall_prob, ab.res.max_stall = stall, 6
        await ab.reset()
        st = ab.status()
        assert st == {"busy": 0, "error": 0, "sat_count": 0}, f"status after reset ({phase}): {st}"
        ab.send(random_args(rng, p, use_mult=bool(rng.getrandbits(1)), use_xexp=True), name=f"after-{phase}")
        await ab.drain(f"the operation after a reset during {phase}")
        ab.check_status(error=0, where=f"after the reset during {phase}")


@cocotb.test()
async def malformed_commands(dut):
    """K = 0, K > k_max (by one, and the largest field value), T = 0, N = 0: the command is
    consumed, error is set and sticky, nothing is output, and the next operation is correct."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.2, seed=_seed() + 4, name="malformed_commands")
    await ab.start()
    rng = random.Random(_seed() * 13 + 4)
    kmax_field = (1 << p.k_bits) - 1
    cases = [("K=0", dict(k=0, t=p.rows, n=p.cols)), ("K=k_max+1", dict(k=p.k_max + 1, t=1, n=1)),
             (f"K={kmax_field}", dict(k=kmax_field, t=p.rows + 1, n=2)), ("T=0", dict(k=2, t=0, n=1)),
             ("N=0", dict(k=2, t=1, n=0))]
    for name, fields in cases:
        await ab.reset()
        ab.drv["cmd"].put([cmd_word(p, relu=bool(rng.getrandbits(1)), **fields)])
        await ab.bench.until(lambda: ab.drv["cmd"].idle, max_cycles=200, what=f"the {name} command to be taken")
        await ab.bench.until(lambda: read_int(dut.error) == 1, max_cycles=50, what=f"error after {name}")
        await ab.bench.until(lambda: read_int(dut.busy) == 0, max_cycles=50, what=f"busy to fall after {name}")
        await ab.bench.cycles(20)  # nothing may come out on res (the scoreboard has nothing pending)
        ab.send(random_args(rng, p, use_mult=bool(rng.getrandbits(1)), use_xexp=bool(rng.getrandbits(1))),
                name=f"after {name}")
        await ab.drain(f"the operation after {name}")
        ab.check_status(error=1, where=f"after {name} and a correct operation (error is sticky)")
    await ab.reset()
    assert ab.status()["error"] == 0, "reset must clear error"


@cocotb.test()
async def bias_out_of_range(dut):
    """A bias with |bias| >= 2**(A-2) on a valid channel sets error; the operation still ends
    (its results are not checked) and, after a reset, the next operation is correct."""
    p = _params()
    ab = AccelBench(dut, p, stalls=0.2, seed=_seed() + 5, name="bias_out_of_range")
    await ab.start()
    rng = random.Random(_seed() * 11 + 5)
    args = random_args(rng, p, use_mult=False, use_xexp=False, t=1, n=1, k=2)
    tr = linear_traffic(args, p)
    lim = 1 << (p.acc_bits - 2)
    ab.drv["cmd"].put([tr.cmd])
    ab.drv["par"].put([(tr.par[0] & ~((1 << p.acc_bits) - 1)) | lim, *tr.par[1:]])  # lane 0 bias = +2**(A-2)
    ab.drv["act"].put(tr.act)
    ab.drv["wgt"].put(tr.wgt)
    ab.res.on_beat = None  # results of an erroneous operation are undefined
    await ab.bench.until(lambda: ab.res.transfers >= tr.res_beats and all(d.idle for d in ab.drv.values()),
                         max_cycles=2000, what="the erroneous operation to finish")
    await ab.bench.until(lambda: read_int(dut.busy) == 0, max_cycles=200, what="busy to fall")
    assert read_int(dut.error) == 1, "error must be set by a bias out of range"
    ab.res.on_beat = ab.sb.check
    await ab.reset()
    ab.send(random_args(rng, p, use_mult=True, use_xexp=True), name="after bias error")
    await ab.drain()
    ab.check_status(error=0, where="after the bias error and a reset")


# --------------------------------------------------------------------------- run_linear job


@cocotb.test(skip=not os.environ.get("SFX_SIM_JOB"))
async def run_job(dut):
    """One operation from ``SFX_SIM_JOB`` (packed by run_linear), no stalls; results, cycle
    counts (``sim_cycles`` with the reset) and status to ``SFX_SIM_OUT``."""
    from .tb_cosim import run_one

    bench = StreamBench(dut, poll=128)  # no Python scheduler per cycle; cycle counts stay exact
    drv = {s: bench.add(StreamDriver(dut, s)) for s in DRIVEN}
    res = bench.add(StreamSink(dut, "res"))
    await bench.start()
    await run_one(bench, drv, res, dut, os.environ["SFX_SIM_JOB"], os.environ["SFX_SIM_OUT"], start_cycle=0)
