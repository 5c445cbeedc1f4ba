"""SFxMagnitudeMultiplier (both implementations, exhaustive) and SFxPE against superfloat.sw.sfx."""
from __future__ import annotations

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment, Module
from amaranth.sim import Simulator

from superfloat.hw.pe import SFxMagnitudeMultiplier, SFxPE
from superfloat.sw import sfx

from hw_stream_helpers import check_multiplier_both_impls, make_sim


def _run_comb(dut, tb):
    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("a_width,b_width", [(aw, bw) for aw in range(1, 5) for bw in range(1, 5)] + [(7, 7), (3, 7)])
def test_multiplier_exhaustive_both_impls(a_width, b_width):
    check_multiplier_both_impls(SFxMagnitudeMultiplier, range(1 << a_width), range(1 << b_width), a_width=a_width,
                                b_width=b_width)


def test_multiplier_wide_random():
    """The widths of the clamp unit's multiplier (up to 64 x 16), random operands and extremes."""
    rng = np.random.default_rng(5)
    for aw, bw in ((52, 16), (30, 16), (64, 16), (15, 15)):
        top = Module()
        top.submodules.lut = lut = SFxMagnitudeMultiplier(a_width=aw, b_width=bw, impl="lut")
        top.submodules.dsp = dsp = SFxMagnitudeMultiplier(a_width=aw, b_width=bw, impl="dsp")
        cases = [(0, 0), ((1 << aw) - 1, (1 << bw) - 1), ((1 << aw) - 1, 1), (1, (1 << bw) - 1)]
        cases += [(int(rng.integers(0, 1 << 62)) % (1 << aw), int(rng.integers(0, 1 << bw))) for _ in range(200)]

        async def tb(ctx):
            for a, b in cases:
                for mul in (lut, dsp):
                    ctx.set(mul.a, a)
                    ctx.set(mul.b, b)
                assert ctx.get(lut.p) == a * b and ctx.get(dsp.p) == a * b, (aw, bw, a, b)

        _run_comb(top, tb)


def test_lut_multiplier_has_no_multiply_operator():
    """impl='lut' must not contain a '*' (Yosys would infer a DSP); impl='dsp' must."""
    lut = verilog.convert(SFxMagnitudeMultiplier(a_width=7, b_width=7, impl="lut"), emit_src=False)
    dsp = verilog.convert(SFxMagnitudeMultiplier(a_width=7, b_width=7, impl="dsp"), emit_src=False)
    body = lambda text: "\n".join(l for l in text.splitlines() if not l.lstrip().startswith(("/*", "//", "(*")))
    assert "*" not in body(lut)
    assert " * " in body(dsp)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(a_width=0, b_width=3), ValueError, r"a_width must be in 1\.\.64, got 0"),
    (dict(a_width=3, b_width=65), ValueError, r"b_width must be in 1\.\.64, got 65"),
    (dict(a_width=3.0, b_width=3), TypeError, r"a_width must be an int, got float"),
    (dict(a_width=True, b_width=3), TypeError, r"a_width must be an int, got bool"),
    (dict(a_width=3, b_width=3, impl="fpga"), ValueError, r"impl must be one of 'lut', 'dsp', got 'fpga'"),
    (dict(a_width=3, b_width=3, impl=1), TypeError, r"impl must be a str"),
])
def test_multiplier_rejects_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SFxMagnitudeMultiplier(**kwargs)


def test_multiplier_properties_read_only():
    mul = SFxMagnitudeMultiplier(a_width=3, b_width=4, impl="dsp")
    assert (mul.a_width, mul.b_width, mul.impl) == (3, 4, "dsp")
    with pytest.raises(AttributeError):
        mul.impl = "lut"
    Fragment.get(mul, None)


def _pe_run(pe, tiles):
    """Feed ``tiles`` (lists of (a_code, w_code)), one product per cycle, code 0 in idle
    cycles (one after each tile); return each tile's sum as read from ``out``.

    With a shadow: ``zero`` in the cycle the tile's last product is complete moves the sum
    to the shadow (``out`` the cycle after). Without: ``out`` is read in that cycle, then
    ``dclr`` clears it. ``dclr`` also clears the shadow after its read."""
    sim, _ = make_sim(pe)
    got = []
    sched = []   # per cycle: (a, w, last) or None (idle: code 0)
    for t in tiles:
        sched += [(a, w, k == len(t) - 1) for k, (a, w) in enumerate(t)] + [None]
    sched += [None] * (pe.latency + 3)
    lat = pe.latency

    async def tb(ctx):
        ctx.set(pe.zero, 1)          # start from 0
        await ctx.tick()
        read_at = set()
        moved = False                # the shadow took a sum in the previous cycle
        for c, step in enumerate(sched):
            ctx.set(pe.a, step[0] if step else 0)
            ctx.set(pe.w, step[1] if step else 0)
            if step and step[2]:
                read_at.add(c + lat)       # the sum is complete in cycle c + latency
            done = c in read_at
            if moved or (done and not pe.shadow):
                got.append(ctx.get(pe.out))
            ctx.set(pe.zero, int(done and pe.shadow))
            ctx.set(pe.dclr, int(moved or (done and not pe.shadow)))
            await ctx.tick()
            if moved:
                assert ctx.get(pe.out) == 0      # the destructive read cleared the shadow
            moved = done and pe.shadow

    sim.add_testbench(tb)
    sim.run()
    return got


@pytest.mark.parametrize("impl", ["lut", "dsp"])
def test_pe_every_product_sf3_sf4(impl):
    """Every (activation, weight) code pair of SF3 x SF4 as a one-step tile (negative zeros included)."""
    a_bits, w_bits = 3, 4
    A = sfx.accumulator_bits(a_bits, w_bits, 4)
    pe = SFxPE(a_bits=a_bits, w_bits=w_bits, acc_bits=A, impl=impl, shadow=False)
    pairs = [(a, w) for a in range(1 << a_bits) for w in range(1 << w_bits)]
    got = _pe_run(pe, [[pair] for pair in pairs])
    x = np.array([[a] for a, _ in pairs])
    w = np.array([[w] for _, w in pairs])
    exp = [int(sfx.matmul_acc(x[i:i + 1], w[i:i + 1], a_bits=a_bits, w_bits=w_bits, k_max=4)[0, 0])
           for i in range(len(pairs))]
    assert got == exp


@pytest.mark.parametrize("impl,shadow,stages", [("lut", True, 0), ("dsp", True, 1), ("lut", False, 0),
                                                 ("lut", False, 2)])
def test_pe_dot_products_against_matmul_acc(impl, shadow, stages):
    """Random SF8 dot products, plus the largest sums of both signs (K = k_max)."""
    a_bits, w_bits, k_max = 8, 8, 32
    A = sfx.accumulator_bits(a_bits, w_bits, k_max)
    rng = np.random.default_rng(1)
    tiles = []
    for k in (1, 2, 7, 32):
        tiles.append(list(zip(rng.integers(0, 256, k), rng.integers(0, 256, k))))
    tiles.append([(127, 127)] * k_max)     # +K * 127**2
    tiles.append([(255, 127)] * k_max)     # -K * 127**2
    tiles.append([(128, 255)] * 3)         # negative zero times negative: 0
    pe = SFxPE(a_bits=a_bits, w_bits=w_bits, acc_bits=A, impl=impl, shadow=shadow, mul_stages=stages)
    got = _pe_run(pe, [[(int(a), int(w)) for a, w in t] for t in tiles])
    exp = [int(sfx.matmul_acc(np.array([[a for a, _ in t]]), np.array([[w for _, w in t]]),
                              a_bits=a_bits, w_bits=w_bits, k_max=k_max)[0, 0]) for t in tiles]
    assert got == exp


def test_pe_two_complement_kind():
    """kind='tc' (synthesis baseline): codes are two's complement integers."""
    pe = SFxPE(a_bits=4, w_bits=3, acc_bits=12, kind="tc", shadow=False)
    pairs = [(a, w) for a in range(16) for w in range(8)]
    got = _pe_run(pe, [[p] for p in pairs])
    sx = lambda v, b: v - (1 << b) if v >> (b - 1) else v   # noqa: E731
    assert got == [sx(a, 4) * sx(w, 3) for a, w in pairs]


@pytest.mark.parametrize("aw,bw,stages", [(7, 7, 1), (3, 5, 2), (4, 4, 3)])
def test_pipelined_multipliers_exhaustive(aw, bw, stages):
    """stages > 0: the product of the operands presented `stages` cycles earlier."""
    from superfloat.hw.pe import TwosComplementMultiplier
    top = Module()
    top.submodules.lut = lut = SFxMagnitudeMultiplier(a_width=aw, b_width=bw, impl="lut", stages=stages)
    top.submodules.dsp = dsp = SFxMagnitudeMultiplier(a_width=aw, b_width=bw, impl="dsp", stages=stages)
    top.submodules.tc = tc = TwosComplementMultiplier(a_width=aw, b_width=bw, impl="lut", stages=stages)
    top.submodules.tcd = tcd = TwosComplementMultiplier(a_width=aw, b_width=bw, impl="dsp", stages=stages)
    sim, _ = make_sim(top)
    pairs = [(a, b) for a in range(1 << aw) for b in range(1 << bw)]
    sx = lambda v, b: v - (1 << b) if v >> (b - 1) else v   # noqa: E731
    bad = []

    async def tb(ctx):
        for c in range(len(pairs) + stages):
            if c < len(pairs):
                for mul in (lut, dsp, tc, tcd):
                    signed_in = mul in (tc, tcd)
                    ctx.set(mul.a, sx(pairs[c][0], aw) if signed_in else pairs[c][0])
                    ctx.set(mul.b, sx(pairs[c][1], bw) if signed_in else pairs[c][1])
            if c >= stages:
                a, b = pairs[c - stages]
                got = (ctx.get(lut.p), ctx.get(dsp.p), ctx.get(tc.p), ctx.get(tcd.p))
                want_tc = sx(a, aw) * sx(b, bw)
                if got != (a * b, a * b, want_tc, want_tc):
                    bad.append((a, b, got))
            await ctx.tick()

    sim.add_testbench(tb)
    sim.run()
    assert not bad, f"{len(bad)} wrong products, first: {bad[0]}"


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(a_bits=1, w_bits=4, acc_bits=20), ValueError, r"a_bits must be in 2\.\.16"),
    (dict(a_bits=4, w_bits=17, acc_bits=20), ValueError, r"w_bits must be in 2\.\.16"),
    (dict(a_bits=4, w_bits=4, acc_bits=7), ValueError, r"acc_bits must be in 8\.\.64, got 7"),
    (dict(a_bits="4", w_bits=4, acc_bits=20), TypeError, r"a_bits must be an int"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, impl="asic"), ValueError, r"impl must be one of"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, shadow=None), TypeError, r"shadow must be a bool"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, mul_stages=-1), ValueError, r"mul_stages must be in 0\.\.4, got -1"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, kind="fp"), ValueError, r"kind must be one of 'sm', 'tc', got 'fp'"),
])
def test_pe_rejects_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SFxPE(**kwargs)
