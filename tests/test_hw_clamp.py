"""SFxClampUnit against superfloat.sw.sfx.requantize (SPEC section 4), zero tolerance."""
from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import Fragment

from superfloat.hw.clamp import CLAMP_LATENCY, SFxClampUnit, clamp_in_layout, sat_count_split
from superfloat.hw.interface import ROUNDING_CODES
from superfloat.sw import sfx

from hw_stream_helpers import Sink, Source, check_rejects, make_sim, pack, run_streams, run_through

ROUNDINGS = ("nearest_even", "toward_zero")


def _run(dut: SFxClampUnit, items, *, stall=0.0, out_stall=0.0, seed=0):
    """items: dicts of clamp_in_layout fields. Returns (codes, sat flags, sat_count, error, cycles)."""
    lay = clamp_in_layout(dut.acc_bits, dut.xmult)
    beats = [pack(lay, it) for it in items]
    got, info = run_through(dut, beats, stall=stall, out_stall=out_stall, seed=seed, max_cycles=30 * len(beats) + 50,
                            final={"sat": dut.sat_count, "err": dut.error, "busy": dut.busy})
    out = np.array(got, dtype=np.int64)
    return out & ((1 << dut.out_bits) - 1), out >> dut.out_bits, info


def _check(dut, acc, shift, mult, use, relu, rnd, *, stall=0.0, out_stall=0.0, seed=0, xmult=None, xuse=None):
    """Run the inputs through the unit; compare every code and the saturation counts with
    sfx.requantize, one call per (use_mult, use_xmult, relu, rounding) group (``xmult`` /
    ``xuse``: the per-row multiplier and its enable, for a unit generated with ``xmult``)."""
    if xuse is None:
        xmult, xuse = np.ones_like(acc), np.zeros_like(acc)
    items = [dict(acc=int(a), shift=int(s), mult=int(m), use_mult=int(u), relu=int(r), rounding=int(d))
             for a, s, m, u, r, d in zip(acc, shift, mult, use, relu, rnd)]
    if dut.xmult:
        for it, xm, xu in zip(items, xmult, xuse):
            it.update(xmult=int(xm), use_xmult=int(xu))
    codes, sat, info = _run(dut, items, stall=stall, out_stall=out_stall, seed=seed)
    total_sat = 0
    for u, xu, r, d in np.ndindex(2, 2, 2, 2):
        sel = (use == u) & (xuse == xu) & (relu == r) & (rnd == d)
        if not sel.any():
            continue
        exp, nsat = sfx.requantize(acc[sel], frac_bits=dut.frac_bits, shift=shift[sel], out_bits=dut.out_bits,
                                   relu=bool(r), rounding=ROUNDINGS[d], mult=mult[sel] if u else None,
                                   xmult=xmult[sel] if xu else None)
        diff = np.flatnonzero(codes[sel] != exp)
        assert diff.size == 0, (
            f"{diff.size} codes differ (use_mult={u}, use_xmult={xu}, relu={r}, rounding={ROUNDINGS[d]}); first: "
            f"acc={acc[sel][diff[0]]} shift={shift[sel][diff[0]]} mult={mult[sel][diff[0]]} "
            f"xmult={xmult[sel][diff[0]]} got {codes[sel][diff[0]]} expected {exp[diff[0]]}")
        assert int(sat[sel].sum()) == nsat
        total_sat += nsat
    assert info["sat"] == total_sat
    assert info["err"] == 0
    assert info["busy"] == 0
    return info


def _shift_for(dut, r, use):
    """The shift input that gives right shift r (SPEC 4: r = F (+16) - Mo - shift)."""
    return dut.frac_bits + sfx.MULT_FRAC_BITS * use - (dut.out_bits - 1) - r


@pytest.mark.parametrize("out_bits", [2, 3])
def test_clamp_exhaustive_small(out_bits):
    """Every 6-bit accumulator, every distinct right shift, both roundings, relu on/off,
    with and without a (random) multiplier."""
    dut = SFxClampUnit(acc_bits=6, frac_bits=2, out_bits=out_bits, mult_impl="lut")
    rng = np.random.default_rng(out_bits)
    grid = np.array(np.meshgrid(np.arange(-32, 32), list(range(0, 24)) + [63], [0, 1], [0, 1], [0, 1],
                                indexing="ij")).reshape(5, -1)
    acc, r, use, relu, rnd = grid
    mult = rng.integers(1, 1 << 16, acc.size)
    mult[::7] = (1 << 16) - 1
    mult[1::7] = 1
    _check(dut, acc, _shift_for(dut, r, use), mult, use, relu, rnd)


@pytest.mark.parametrize("acc_bits,frac_bits,out_bits,mult_impl,mult_stages", [
    (22, 6, 4, "dsp", 0),     # SF4 x SF4, k_max 16384 (iCE40 target)
    (30, 14, 8, "lut", 1),    # SF8 x SF8, k_max 16384 (ECP5 target: pipelined logic multiplier)
    (12, 4, 16, "dsp", 2),    # output wider than the accumulator's fraction
    (46, 30, 16, "lut", 0),   # SF16 x SF16, k_max 16384
    (52, 30, 5, "dsp", 1),    # SF16 x SF16, k_max 2**20 (widest accumulator)
])
def test_clamp_random_widths(acc_bits, frac_bits, out_bits, mult_impl, mult_stages):
    dut = SFxClampUnit(acc_bits=acc_bits, frac_bits=frac_bits, out_bits=out_bits, mult_impl=mult_impl,
                       mult_stages=mult_stages)
    assert dut.latency == CLAMP_LATENCY + mult_stages
    rng = np.random.default_rng(acc_bits)
    n = 1200
    lim = 1 << (acc_bits - 1)
    # Accumulators of every magnitude (log-uniform), and the extremes.
    mag = np.floor(2.0 ** rng.uniform(0, acc_bits - 1, n)).astype(np.int64)
    mag[:4] = [lim - 1, lim - 1, 0, 1]
    use = rng.integers(0, 2, n)
    use[:2] = 0
    mag = np.where(use == 1, np.minimum(mag, (1 << 47) - 1), mag)   # requantize with mult: |acc| < 2**47
    acc = np.where(rng.random(n) < 0.5, -mag, mag)
    acc[0] = -(lim - 1)
    mult = rng.integers(1, 1 << 16, n)
    mult[4:8] = [1, (1 << 16) - 1, 1 << 15, 3]
    f = frac_bits + sfx.MULT_FRAC_BITS * use
    # Right shifts spread so that the results cover zero, rounding and saturation.
    r = np.clip(np.round(np.log2(np.maximum(mag, 1) * np.where(use, mult, 1))) - (out_bits - 1)
                + rng.integers(-3, 4, n), 0, 63).astype(np.int64)
    r[8:12] = [0, 63, 1, 62]
    shift = f - (out_bits - 1) - r
    keep = (shift >= -256) & (shift <= 255)
    relu, rnd = rng.integers(0, 2, n), rng.integers(0, 2, n)
    _check(dut, acc[keep], shift[keep], mult[keep], use[keep], relu[keep], rnd[keep], stall=0.3, out_stall=0.3,
           seed=acc_bits)


@pytest.mark.parametrize("acc_bits,frac_bits,out_bits,mult_impl,mult_stages", [
    (30, 14, 8, "dsp", 0),    # SF8 x SF8, k_max 16384: the product mag * mult * xmult has 62 bits
    (22, 6, 4, "lut", 1),     # SF4 x SF4 (iCE40), logic multipliers
    (46, 30, 16, "lut", 0),   # SF16 x SF16: the product has 78 bits (more than int64)
    (52, 30, 16, "dsp", 2),   # SF16 x SF16, k_max 2**20: 84 bits
])
def test_clamp_xmult_random_widths(acc_bits, frac_bits, out_bits, mult_impl, mult_stages):
    """The per-row multiplier (SPEC revision 2, section 4 step 0b), alone and with mult, random
    and extreme multipliers, accumulators of every magnitude, right shifts over 0..63."""
    dut = SFxClampUnit(acc_bits=acc_bits, frac_bits=frac_bits, out_bits=out_bits, mult_impl=mult_impl,
                       mult_stages=mult_stages, xmult=True)
    assert dut.xmult and dut.latency == CLAMP_LATENCY + mult_stages + (3 if mult_impl == "lut" else 1)
    rng = np.random.default_rng(1000 + acc_bits)
    n = 1200
    lim = 1 << (acc_bits - 1)
    mag = np.floor(2.0 ** rng.uniform(0, acc_bits - 1, n)).astype(np.int64)
    mag[:4] = [lim - 1, lim - 1, 0, 1]
    acc = np.where(rng.random(n) < 0.5, -mag, mag)
    use, xuse = rng.integers(0, 2, n), rng.integers(0, 2, n)
    use[:2], xuse[:2] = 1, 1      # the widest product: |acc| = 2**(A-1) - 1 times two 16-bit factors
    mult, xmult = rng.integers(1, 1 << 16, n), rng.integers(1, 1 << 16, n)
    mult[:2], xmult[:2] = (1 << 16) - 1, (1 << 16) - 1
    xmult[4:8] = [1, (1 << 16) - 1, 1 << 15, 3]
    f = frac_bits + sfx.MULT_FRAC_BITS * (use + xuse)
    r = np.clip(np.round(np.log2(np.maximum(mag, 1.0) * np.where(use, mult, 1.0) * np.where(xuse, xmult, 1.0)))
                - (out_bits - 1) + rng.integers(-3, 4, n), 0, 63).astype(np.int64)
    r[8:12] = [0, 63, 1, 62]
    shift = f - (out_bits - 1) - r
    keep = (shift >= -256) & (shift <= 255)
    relu, rnd = rng.integers(0, 2, n), rng.integers(0, 2, n)
    assert {(0, 0), (0, 1), (1, 0), (1, 1)} <= set(zip(use[keep].tolist(), xuse[keep].tolist()))
    _check(dut, acc[keep], shift[keep], mult[keep], use[keep], relu[keep], rnd[keep], stall=0.3, out_stall=0.3,
           seed=acc_bits, xmult=xmult[keep], xuse=xuse[keep])


def test_clamp_rounding_ties_and_saturation_edges():
    """Exact ties (odd and even quotients, both signs) and values at the saturation limit."""
    dut = SFxClampUnit(acc_bits=16, frac_bits=6, out_bits=4, mult_impl="dsp")   # Mo = 3, lim = 7
    acc, r = [], []
    for q in range(-9, 10):
        for rr in (1, 2, 5):
            for off in (-1, 0, 1):
                acc.append((q << rr) + (1 << (rr - 1)) + off)   # q + 0.5 (tie) and neighbours
                r.append(rr)
    acc, r = np.array(acc), np.array(r)
    n = acc.size
    for d in (0, 1):
        _check(dut, acc, _shift_for(dut, r, 0), np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
               np.zeros(n, dtype=np.int64), np.full(n, d))


def test_clamp_full_throughput_and_latency():
    dut = SFxClampUnit(acc_bits=10, frac_bits=4, out_bits=4)
    items = [dict(acc=v, shift=0, mult=0, use_mult=0, relu=0, rounding=0) for v in range(-20, 20)]
    _, _, info = _run(dut, items)
    # item i is taken in cycle i + 1; its result is valid (and taken) CLAMP_LATENCY cycles later
    assert info["cycles"] == len(items) + CLAMP_LATENCY


def test_clamp_saturation_counter_saturates():
    dut = SFxClampUnit(acc_bits=10, frac_bits=4, out_bits=3, count_bits=3)
    items = [dict(acc=500, shift=0, mult=0, use_mult=0, relu=0, rounding=0)] * 10   # all saturate
    codes, sat, info = _run(dut, items)
    assert list(codes) == [3] * 10 and list(sat) == [1] * 10
    assert info["sat"] == 7


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_clamp_split_saturation_counter_counts_every_cycle(bits):
    """Two counters from 4 bits on: after every clock edge the count equals the saturated
    beats taken so far (saturating at 2**bits - 1), except in the cycle after the lower
    half wraps, where it reads 2**low less and busy is high; it stops at all ones."""
    low = sat_count_split(bits)
    assert 2 <= low < bits
    dut = SFxClampUnit(acc_bits=10, frac_bits=4, out_bits=3, count_bits=bits)
    rng = np.random.default_rng(bits)
    n = 3 * (1 << bits)
    items = [dict(acc=int(500 if rng.random() < 0.8 else 1), shift=0, mult=0, use_mult=0, relu=0, rounding=0)
             for _ in range(n)]
    src = Source(dut.i, [pack(clamp_in_layout(10), it) for it in items], stall=0.2, seed=bits, name="i")
    snk = Sink(dut.o, stall=0.2, seed=bits + 1, name="o")
    sim, _ = make_sim(dut)
    seen = {"lag": 0, "cycles": 0}

    async def tb(ctx):
        def check(cycle):
            ref = min(sum(b >> dut.out_bits for b in snk.beats), (1 << bits) - 1)
            got, busy = ctx.get(dut.sat_count), ctx.get(dut.busy)
            seen["cycles"] += 1
            if got != ref:
                assert busy and ref - got == 1 << low and got % (1 << low) == 0, (cycle, got, ref)
                seen["lag"] += 1

        await run_streams(ctx, [src], [snk], until=lambda: len(snk.beats) == n, max_cycles=40 * n,
                          on_cycle=check)
        await ctx.tick()
        seen["final"] = ctx.get(dut.sat_count)

    sim.add_testbench(tb)
    sim.run()
    saturated = sum(b >> dut.out_bits for b in snk.beats)
    assert saturated > (1 << bits) and seen["final"] == (1 << bits) - 1
    assert 0 < seen["lag"] < seen["cycles"] // 4


@pytest.mark.parametrize("r", [-1, 64, 200])
def test_clamp_shift_out_of_range_sets_sticky_error(r):
    dut = SFxClampUnit(acc_bits=10, frac_bits=4, out_bits=3)
    good = dict(acc=5, shift=0, mult=0, use_mult=0, relu=0, rounding=0)
    bad = dict(good, shift=int(_shift_for(dut, r, 0)))
    _, _, info = _run(dut, [good, bad, good])
    assert info["err"] == 1


def test_clamp_properties():
    dut = SFxClampUnit(acc_bits=30, frac_bits=14, out_bits=8, mult_impl="lut")
    assert (dut.acc_bits, dut.frac_bits, dut.out_bits, dut.mult_impl, dut.count_bits) == (30, 14, 8, "lut", 32)
    with pytest.raises(AttributeError):
        dut.out_bits = 4
    Fragment.get(dut, None)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(acc_bits=1), ValueError, r"acc_bits must be in 2\.\.64, got 1"),
    (dict(acc_bits=65), ValueError, r"acc_bits must be in 2\.\.64, got 65"),
    (dict(frac_bits=-1), ValueError, r"frac_bits must be in 0\.\.64, got -1"),
    (dict(out_bits=17), ValueError, r"out_bits must be in 2\.\.16 \(SFx widths\), got 17"),
    (dict(out_bits=8.0), TypeError, r"out_bits must be an int"),
    (dict(mult_impl="fast"), ValueError, r"mult_impl must be one of 'lut', 'dsp', got 'fast'"),
    (dict(count_bits=0), ValueError, r"count_bits must be in 1\.\.64, got 0"),
    (dict(xmult=1), TypeError, r"xmult must be a bool, got int 1"),
])
def test_clamp_rejects_bad_parameters(kwargs, exc, match):
    check_rejects(SFxClampUnit, dict(acc_bits=30, frac_bits=14, out_bits=8), kwargs, exc, match)


def test_rounding_codes_match_interface():
    assert ROUNDING_CODES == {"nearest_even": 0, "toward_zero": 1}
