"""SFxAccelerator against superfloat.sw.sfx.linear (SPEC sections 3-6), zero tolerance.

Every stream gets random stalls in most tests; the res sink checks SPEC section 6
(valid held, payload stable until taken) on every cycle.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from amaranth.hdl import Fragment

from superfloat.hw.accelerator import SFxAccelerator
from superfloat.hw.clamp import SFxClampUnit
from superfloat.hw.mac_array import SFxMacArray
from superfloat.hw.pe import SFxMagnitudeMultiplier, SFxPE
from superfloat.hw.interface import AccelParams

from hw_accel_helpers import bad_cmd_beat, check_results, op_beats, random_op, run_ops
from hw_stream_helpers import ARRAY_PARAM_ERRORS, Sink, Source, check_rejects, make_sim, run_streams


def _assert_ok(r, *, error=0):
    check_results(r)
    if r.expected.n_saturated is not None:
        assert r.sat_count == r.expected.n_saturated
    assert r.error == error
    assert r.busy_after == 0


@pytest.mark.parametrize("cfg,shapes,stall,res_stall", [
    # non-square array, partial tiles in T and N, K = 1, mixed flags
    (dict(rows=2, cols=3, a_bits=4, w_bits=5, out_bits=4, k_max=64), [(3, 4, 5), (1, 7, 1), (4, 3, 9)], 0.3, 0.3),
    # 1x1 array, SF2 (ternary weights), k_max = 1: every product its own tile
    (dict(rows=1, cols=1, a_bits=2, w_bits=2, out_bits=2, k_max=1), [(3, 2, 1), (1, 1, 1)], 0.5, 0.0),
    # SF8 with DSP multipliers in some PEs, LUT multiplier in the clamp
    (dict(rows=3, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=16384, dsp_pes=2, clamp_impl="lut"),
     [(5, 3, 7), (2, 5, 4)], 0.2, 0.6),
    # SF16, widest accumulator (k_max = 2**20), output narrower than inputs
    (dict(rows=2, cols=2, a_bits=16, w_bits=16, out_bits=6, k_max=1 << 20, dsp_pes=4, pipelined=True), [(3, 3, 6)],
     0.4, 0.4),
    # tall array, one column; wide output
    (dict(rows=4, cols=1, a_bits=3, w_bits=6, out_bits=16, k_max=5), [(6, 2, 5), (4, 1, 2)], 0.0, 0.7),
    # no shadow registers: the array stalls while a tile drains
    (dict(rows=2, cols=3, a_bits=4, w_bits=4, out_bits=4, k_max=64, overlap_drain=False),
     [(3, 4, 5), (2, 7, 1), (5, 3, 8)], 0.3, 0.3),
    # chunks: reductions longer than chunk_k go through the partial-sum memory
    (dict(rows=2, cols=3, a_bits=4, w_bits=4, out_bits=4, k_max=64, overlap_drain=False, chunk_k=3),
     [(3, 4, 7), (2, 7, 1), (3, 3, 3), (2, 2, 4)], 0.3, 0.3),
    (dict(rows=3, cols=2, a_bits=6, w_bits=5, out_bits=7, k_max=40, chunk_k=4, mul_stages=1, pipelined=True),
     [(4, 3, 9), (2, 2, 40), (1, 3, 5)], 0.2, 0.5),
    (dict(rows=1, cols=1, a_bits=8, w_bits=8, out_bits=8, k_max=16384, chunk_k=2, overlap_drain=False),
     [(2, 3, 5), (1, 1, 2)], 0.3, 0.0),
    # one product per chunk, with shadow registers
    (dict(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=8, chunk_k=1), [(3, 3, 4), (2, 1, 1)], 0.2, 0.2),
    # per-row activation multiplier (SPEC revision 2): W4A8, partial tiles
    (dict(rows=2, cols=3, a_bits=8, w_bits=4, out_bits=8, k_max=64, xmult=True),
     [(3, 4, 5), (5, 2, 3), (2, 7, 1), (4, 4, 6)], 0.3, 0.3),
    # xmult at the widest accumulator: |acc| * mult * xmult needs A + 32 = 84 bits
    (dict(rows=2, cols=2, a_bits=16, w_bits=16, out_bits=16, k_max=1 << 20, dsp_pes=4, pipelined=True,
          clamp_impl="lut", xmult=True), [(3, 3, 6), (2, 3, 2)], 0.4, 0.4),
    # xmult with chunks and no shadow registers
    (dict(rows=3, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=16, chunk_k=3, overlap_drain=False, xmult=True),
     [(4, 3, 7), (2, 2, 2), (3, 1, 5)], 0.3, 0.3),
])
def test_accelerator_matches_linear(cfg, shapes, stall, res_stall):
    dut = SFxAccelerator(**cfg)
    rng = np.random.default_rng(sum(map(ord, repr(cfg))))
    ops = [random_op(dut.params, rng, t, n, k) for t, n, k in shapes]
    ops.append(random_op(dut.params, rng, *shapes[0], big_acc=True))   # largest accumulators
    r = run_ops(dut, ops, stall=stall, res_stall=res_stall, seed=len(shapes))
    _assert_ok(r)


@pytest.mark.parametrize("xmult", [False, True])
def test_accelerator_flag_combinations_back_to_back(xmult):
    """relu x rounding x use_mult x (per-row exponents, or on an accelerator generated with
    xmult, per-row multipliers) in one stream of ops (an op without xmult sends a pattern in
    the field, which must be ignored)."""
    dut = SFxAccelerator(rows=2, cols=2, a_bits=5 + xmult, w_bits=4, out_bits=5 + xmult, k_max=32, xmult=xmult)
    assert dut.xmult is xmult and dut.params.xmult is xmult
    rng = np.random.default_rng(7 + 10 * xmult)
    flag = "use_xmult" if xmult else "use_xexp"
    ops = [random_op(dut.params, rng, 3, 3, 4, relu=relu, rounding=rounding, use_mult=use_mult, **{flag: f})
           for relu in (False, True) for rounding in ("nearest_even", "toward_zero")
           for use_mult in (False, True) for f in (False, True)]
    _assert_ok(run_ops(dut, ops, stall=0.25, seed=3 + 2 * xmult))


def test_accelerator_k_equal_k_max():
    dut = SFxAccelerator(rows=2, cols=2, a_bits=3, w_bits=3, out_bits=4, k_max=24)
    rng = np.random.default_rng(2)
    ops = [random_op(dut.params, rng, 2, 3, 24, big_acc=True), random_op(dut.params, rng, 3, 2, 24)]
    _assert_ok(run_ops(dut, ops, stall=0.1, seed=2))


def test_malformed_commands_set_error_then_good_op_runs():
    dut = SFxAccelerator(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=8)
    p = dut.params
    rng = np.random.default_rng(4)
    bad = [bad_cmd_beat(p, k=0, t=2, n=2), bad_cmd_beat(p, k=9, t=2, n=2), bad_cmd_beat(p, k=15, t=1, n=1),
           bad_cmd_beat(p, k=3, t=0, n=2), bad_cmd_beat(p, k=3, t=2, n=0)]
    good = random_op(p, rng, 3, 3, 5)
    _assert_ok(run_ops(dut, bad + [good], stall=0.3, seed=4), error=1)
    # each kind alone sets the error, and the op after it still computes exactly
    for beat in bad:
        _assert_ok(run_ops(dut, [beat, good], seed=5), error=1)
    _assert_ok(run_ops(dut, [good], seed=6), error=0)


def test_bias_out_of_range_sets_error():
    dut = SFxAccelerator(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=8)
    p = dut.params
    rng = np.random.default_rng(8)
    lim = 1 << (p.acc_bits - 2)
    for b in (lim, -lim, lim + 5, -(1 << (p.acc_bits - 1))):
        op = random_op(p, rng, 2, 3, 2)
        op.bias = np.array([0, 0, b])
        op.check = False   # sfx.linear rejects this bias (ValueError); the RTL flags it
        r = run_ops(dut, [op, random_op(p, rng, 2, 2, 3)], seed=8)
        _assert_ok(r, error=1)
    # |bias| = 2**(A-2) - 1 is legal; padding lanes (channel >= N) are never checked
    op = random_op(p, rng, 2, 3, 2)
    op.bias = np.array([lim - 1, -(lim - 1), 3])
    _assert_ok(run_ops(dut, [op], seed=9, rng_pad=True), error=0)


def test_shift_out_of_range_sets_error():
    """SPEC 4: the hardware supports 0 <= r <= 63 only; outside, it raises the sticky error."""
    dut = SFxAccelerator(rows=1, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=8)
    rng = np.random.default_rng(10)
    op = random_op(dut.params, rng, 1, 2, 2, use_mult=False, use_xexp=False)
    op.shift = np.array([0, dut.frac_bits - 3 + 1])   # r = -1 on channel 1
    op.check = False
    _assert_ok(run_ops(dut, [op], seed=10), error=1)


def test_reset_mid_operation_then_good_op():
    dut = SFxAccelerator(rows=2, cols=3, a_bits=4, w_bits=4, out_bits=3, k_max=64)
    p = dut.params
    rng = np.random.default_rng(11)
    first = op_beats(p, random_op(p, rng, 5, 7, 9), rng)
    good_op = random_op(p, rng, 3, 4, 6)
    good = op_beats(p, good_op, rng)
    srcs = [Source(dut.cmd, name="cmd", stall=0.2, seed=1), Source(dut.par, name="par", stall=0.2, seed=2),
            Source(dut.act, name="act", stall=0.2, seed=3), Source(dut.wgt, name="wgt", stall=0.2, seed=4)]
    sink = Sink(dut.res, name="res", stall=0.3, seed=5)
    sim, rst = make_sim(dut)
    seen = {}

    def load(beats):
        for s, name in zip(srcs, ("cmd", "par", "act", "wgt")):
            s.clear()
            s.extend(getattr(beats, name))
        sink.clear()
        sink.beats.clear()

    async def tb(ctx):
        # A malformed command (error), then part of an op with results in flight.
        load(first)
        srcs[0].queue.appendleft(bad_cmd_beat(p, k=0, t=1, n=1))
        await run_streams(ctx, srcs, [sink], until=lambda: len(sink.beats) >= 2, max_cycles=2000)
        seen["before"] = (ctx.get(dut.busy), ctx.get(dut.error), ctx.get(dut.sat_count))
        ctx.set(rst, 1)
        await ctx.tick()
        ctx.set(rst, 0)
        seen["after_reset"] = (ctx.get(dut.busy), ctx.get(dut.error), ctx.get(dut.sat_count),
                               ctx.get(dut.res.valid))
        load(good)
        await run_streams(ctx, srcs, [sink], max_cycles=5000,
                          until=lambda: len(sink.beats) >= len(good.res) and all(s.done for s in srcs))
        for _ in range(3):
            await ctx.tick()
        seen["end"] = (ctx.get(dut.busy), ctx.get(dut.error), ctx.get(dut.sat_count))

    sim.add_testbench(tb)
    sim.run()
    busy, err, _ = seen["before"]
    assert busy == 1 and err == 1
    assert seen["after_reset"] == (0, 0, 0, 0)
    assert sink.beats == good.res
    assert seen["end"] == (0, 0, good.n_saturated)


def test_utilization_small_array():
    """Drains overlap accumulation: 2x2, T = N = 4, K = 64 at full rate."""
    dut = SFxAccelerator(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=64)
    rng = np.random.default_rng(12)
    r = run_ops(dut, [random_op(dut.params, rng, 4, 4, 64)])
    _assert_ok(r)
    util = r.expected.macs / (4 * r.cycles)
    assert util >= 0.85, f"{r.cycles} cycles, utilization {util:.3f}"


@pytest.mark.parametrize("cols", [1, 3])
def test_drain_runs_at_one_accumulator_per_cycle(cols):
    """K = 1: the time goes into draining tiles through the single clamp unit, which must
    take one accumulator per cycle (the result FIFO and its credits are sized for that)."""
    dut = SFxAccelerator(rows=8, cols=cols, a_bits=4, w_bits=4, out_bits=4, k_max=16)
    rng = np.random.default_rng(14)
    r = run_ops(dut, [random_op(dut.params, rng, 32, 2 * cols, 1)])
    _assert_ok(r)
    elements, tiles = 32 * 2 * cols, 4 * 2
    # one accumulator per cycle, plus the array's hand-over between tiles (capture of the
    # next tile waits for the previous drain: 5 cycles) and the pipeline fill
    assert r.cycles <= elements + 5 * tiles + 20, f"{r.cycles} cycles for {elements} drained accumulators"


def test_utilization_without_overlap():
    """overlap_drain=False: each tile's drain (rows * cols cycles) is added to its K cycles."""
    dut = SFxAccelerator(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=64, overlap_drain=False)
    rng = np.random.default_rng(15)
    r = run_ops(dut, [random_op(dut.params, rng, 4, 4, 64)])
    _assert_ok(r)
    util = r.expected.macs / (4 * r.cycles)
    assert 0.80 <= util < 0.95, f"{r.cycles} cycles, utilization {util:.3f}"


@pytest.mark.slow
def test_utilization_8x8_t64_n64_k1024():
    """The issue's target: T = 64, N = 64, K = 1024 on 8x8 SF8, no stalls, >= 85 %."""
    dut = SFxAccelerator(rows=8, cols=8, a_bits=8, w_bits=8, out_bits=8)
    rng = np.random.default_rng(13)
    r = run_ops(dut, [random_op(dut.params, rng, 64, 64, 1024)], max_cycles=200_000)
    _assert_ok(r)
    util = r.expected.macs / (64 * r.cycles)
    print(f"8x8 T=64 N=64 K=1024: {r.cycles} cycles, utilization {util:.4f}")
    assert util >= 0.85


def test_accelerator_properties():
    dut = SFxAccelerator(rows=3, cols=2, a_bits=4, w_bits=5, out_bits=6, k_max=100, dsp_pes=3, clamp_impl="lut")
    assert (dut.rows, dut.cols, dut.a_bits, dut.w_bits, dut.out_bits, dut.k_max) == (3, 2, 4, 5, 6, 100)
    assert (dut.dsp_pes, dut.clamp_impl, dut.overlap_drain) == (3, "lut", True)
    assert dut.params == AccelParams(rows=3, cols=2, a_bits=4, w_bits=5, out_bits=6, k_max=100)
    assert dut.frac_bits == 7 and dut.acc_bits == 7 + 7 + 2
    with pytest.raises(AttributeError):
        dut.rows = 4
    Fragment.get(dut, None)


@pytest.mark.parametrize("kwargs,exc,match", ARRAY_PARAM_ERRORS + [
    (dict(out_bits=17), ValueError, r"out_bits must be in 2\.\.16"),
    (dict(out_bits="8"), TypeError, r"out_bits must be an int"),
    (dict(a_bits=True), TypeError, r"a_bits must be an int"),
    (dict(k_max=(1 << 20) + 1), ValueError, r"k_max must be in 1\.\.1048576"),
    (dict(k_max=16.0), TypeError, r"k_max must be an int"),
    (dict(dsp_pes=None), TypeError, r"dsp_pes must be an int, got NoneType"),
    (dict(clamp_impl="bram"), ValueError, r"clamp_impl must be one of 'lut', 'dsp', got 'bram'"),
    (dict(overlap_drain="no"), TypeError, r"overlap_drain must be a bool, got str"),
    (dict(xmult=1), TypeError, r"xmult must be a bool, got int 1"),
])
def test_accelerator_rejects_bad_parameters(kwargs, exc, match):
    check_rejects(SFxAccelerator, dict(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=16), kwargs, exc, match)


@pytest.mark.parametrize("cls", [SFxAccelerator, SFxMacArray, SFxClampUnit, SFxPE, SFxMagnitudeMultiplier])
def test_constructors_are_keyword_only(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)


@pytest.mark.sim
def test_x_on_payloads_between_beats_in_a_4state_simulator(tmp_path):
    """Icarus (4-state): the IP testbench drives X on every payload between beats
    (IDLE_X=1); every code must still match sfx.linear. The array zeroes both operands in a
    cycle without a beat (a weight register that kept an X made the tile's sums X), with
    logic and DSP (``*``) multipliers, with and without shadow registers."""
    import subprocess

    from superfloat.hw.ip import write_ip
    from superfloat.sw.tools import find_tool, tool_env

    if find_tool("iverilog") is None or find_tool("vvp") is None:
        pytest.skip("iverilog not found (apt-get install iverilog)")
    for overlap in (True, False):
        root = tmp_path / f"ip-{overlap}"
        write_ip(root, rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=64, dsp_pes=2, overlap_drain=overlap,
                 n_ops=3, seed=5)
        cmd = ("iverilog -g2005 -Psfx_accelerator_tb.IDLE_X=1 -o tb.vvp -s sfx_accelerator_tb rtl/*.v "
               "tb/sfx_accelerator_tb.v && vvp -n tb.vvp")
        proc = subprocess.run(cmd, shell=True, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "PASS:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
