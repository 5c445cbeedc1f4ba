"""SFxMagnitudeMultiplier (both implementations, exhaustive) and SFxPE against superfloat.sw.sfx."""
from __future__ import annotations

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment, Module
from amaranth.sim import Simulator

from superfloat.hw.pe import SFxMagnitudeMultiplier, SFxPE
from superfloat.sw import sfx

from hw_stream_helpers import make_sim


def _run_comb(dut, tb):
    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("a_width,b_width", [(aw, bw) for aw in range(1, 5) for bw in range(1, 5)] + [(7, 7), (3, 7)])
def test_multiplier_exhaustive_both_impls(a_width, b_width):
    top = Module()
    top.submodules.lut = lut = SFxMagnitudeMultiplier(a_width=a_width, b_width=b_width, impl="lut")
    top.submodules.dsp = dsp = SFxMagnitudeMultiplier(a_width=a_width, b_width=b_width, impl="dsp")
    bad = []

    async def tb(ctx):
        for a in range(1 << a_width):
            for b in range(1 << b_width):
                for mul in (lut, dsp):
                    ctx.set(mul.a, a)
                    ctx.set(mul.b, b)
                pl, pd = ctx.get(lut.p), ctx.get(dsp.p)
                if pl != a * b or pd != a * b:
                    bad.append((a, b, pl, pd))

    _run_comb(top, tb)
    assert not bad, f"{len(bad)} wrong products, first (a, b, lut, dsp): {bad[0]}"


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


def _pe_run(pe, tiles, shadow=True):
    """Feed ``tiles`` (lists of (a_code, w_code)), one product per cycle and one idle
    cycle after each tile; return the value moved to the shadow register for each tile
    (``shadow=False``: the accumulator, read just before ``clear``)."""
    sim, _ = make_sim(pe)
    got = []
    sched = []   # per cycle: (a, w, last) or None (idle)
    for t in tiles:
        sched += [(a, w, k == len(t) - 1) for k, (a, w) in enumerate(t)] + [None]
    sched += [None, None]

    async def tb(ctx):
        for c, step in enumerate(sched):
            if step is not None:
                ctx.set(pe.a, step[0])
                ctx.set(pe.w, step[1])
            prev = sched[c - 1] if c >= 1 else None      # its product is accumulated now
            prev2 = sched[c - 2] if c >= 2 else None     # its sum is complete now
            ctx.set(pe.acc_en, prev is not None)
            clear = prev2 is not None and prev2[2]
            ctx.set(pe.clear, clear)
            if clear and not shadow:
                got.append(ctx.get(pe.chain_out))
            await ctx.tick()
            if clear and shadow:
                got.append(ctx.get(pe.chain_out))

    sim.add_testbench(tb)
    sim.run()
    return got


@pytest.mark.parametrize("impl", ["lut", "dsp"])
def test_pe_every_product_sf3_sf4(impl):
    """Every (activation, weight) code pair of SF3 x SF4 as a one-step tile (negative zeros included)."""
    a_bits, w_bits = 3, 4
    A = sfx.accumulator_bits(a_bits, w_bits, 4)
    pe = SFxPE(a_bits=a_bits, w_bits=w_bits, acc_bits=A, impl=impl)
    pairs = [(a, w) for a in range(1 << a_bits) for w in range(1 << w_bits)]
    got = _pe_run(pe, [[pair] for pair in pairs])
    x = np.array([[a] for a, _ in pairs])
    w = np.array([[w] for _, w in pairs])
    exp = [int(sfx.matmul_acc(x[i:i + 1], w[i:i + 1], a_bits=a_bits, w_bits=w_bits, k_max=4)[0, 0])
           for i in range(len(pairs))]
    assert got == exp


@pytest.mark.parametrize("impl,shadow", [("lut", True), ("dsp", True), ("lut", False)])
def test_pe_dot_products_against_matmul_acc(impl, shadow):
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
    got = _pe_run(SFxPE(a_bits=a_bits, w_bits=w_bits, acc_bits=A, impl=impl, shadow=shadow),
                  [[(int(a), int(w)) for a, w in t] for t in tiles], shadow=shadow)
    exp = [int(sfx.matmul_acc(np.array([[a for a, _ in t]]), np.array([[w for _, w in t]]),
                              a_bits=a_bits, w_bits=w_bits, k_max=k_max)[0, 0]) for t in tiles]
    assert got == exp


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(a_bits=1, w_bits=4, acc_bits=20), ValueError, r"a_bits must be in 2\.\.16"),
    (dict(a_bits=4, w_bits=17, acc_bits=20), ValueError, r"w_bits must be in 2\.\.16"),
    (dict(a_bits=4, w_bits=4, acc_bits=7), ValueError, r"acc_bits must be in 8\.\.64, got 7"),
    (dict(a_bits="4", w_bits=4, acc_bits=20), TypeError, r"a_bits must be an int"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, impl="asic"), ValueError, r"impl must be one of"),
    (dict(a_bits=4, w_bits=4, acc_bits=20, shadow=None), TypeError, r"shadow must be a bool"),
])
def test_pe_rejects_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SFxPE(**kwargs)
