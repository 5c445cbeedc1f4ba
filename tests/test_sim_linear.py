"""``superfloat.sim.run_linear``: the RTL in a simulator against ``sfx.linear``."""
from __future__ import annotations

import numpy as np
import pytest

from superfloat.hw.interface import AccelParams, act_layout, cmd_layout, par_layout, tile_schedule
from superfloat.sim import run_linear
from superfloat.sim.linear import cmd_word, linear_traffic, res_to_codes
from superfloat.sim.scoreboard import LinearScoreboard, ScoreboardMismatch, expected_res_words, first_mismatch
from superfloat.sim.tb_accelerator import CONFIGS
from superfloat.sw import sfx


def group(config: str, simulator: str) -> pytest.MarkDecorator:
    return pytest.mark.xdist_group(f"sim-accel-{config}-{simulator}")


def random_case(seed, t, n, k, a_bits, w_bits, *, mult=True, xexp=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1 << a_bits, (t, k)).astype(sfx.code_dtype(a_bits))
    w = rng.integers(0, 1 << w_bits, (n, k)).astype(sfx.code_dtype(w_bits))
    kw = dict(bias=rng.integers(-5000, 5000, n), shift=rng.integers(-4, 1, n) - (16 if mult else 0) + 14,
              relu=False, rounding="nearest_even")
    if mult:
        kw["mult"] = rng.integers(1 << 15, 1 << 16, n)
    if xexp:
        kw["x_exponent"] = rng.integers(-1, 2, t)
    return x, w, kw


# --------------------------------------------------------------------------- no simulator needed


BAD_ARGS = [
    (dict(a_bits=1), "a_bits"),
    (dict(k_max=8), "exceeds k_max"),
    (dict(rounding="up"), "rounding"),
    (dict(shift=200), "shift"),
    (dict(mult=0), "mult"),
    (dict(x_exponent=[1, 2]), "x_exponent"),
    (dict(bias=1 << 40), "bias"),
    (dict(shift=-100), "right shift"),
]


@pytest.mark.parametrize("bad,fragment", BAD_ARGS, ids=[f for _, f in BAD_ARGS])
def test_arguments_are_checked_like_sfx_linear(bad, fragment):
    x = np.zeros((3, 10), np.uint8)
    w = np.zeros((2, 10), np.uint8)
    kw = dict(a_bits=8, w_bits=8, out_bits=8, k_max=64)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=fragment) as ref:
        sfx.linear(x, w, **kw)
    with pytest.raises(type(ref.value)) as got:
        run_linear(x, w, **kw)
    assert str(got.value) == str(ref.value)


def test_bad_simulator_and_shape():
    x = np.zeros((1, 2), np.uint8)
    with pytest.raises(ValueError, match="simulator must be one of 'verilator', 'icarus', got 'modelsim'"):
        run_linear(x, x, a_bits=8, w_bits=8, out_bits=8, simulator="modelsim")
    with pytest.raises(ValueError, match="rows must be in 1..64, got 0"):
        run_linear(x, x, a_bits=8, w_bits=8, out_bits=8, rows=0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_packing_matches_the_amaranth_layouts(config):
    """linear_traffic's beats equal the layouts' own packing (layout.const(...).as_bits())."""
    p = AccelParams(**CONFIGS[config])
    t, n, k = p.rows + 1, 2 * p.cols + 1, 3
    x, w, kw = random_case(3, t, n, k, p.a_bits, p.w_bits)
    kw["shift"] = kw["shift"] - 14 + p.frac_bits - (p.out_bits - 1) - 2  # keep r in range for any widths
    cmd = {"k": k, "t": t, "n": n, "relu": 0, "rounding": 0, "use_mult": 1}
    if p.xmult:
        kw["xmult"] = np.arange(t) * 1000 + (1 << 15)
        cmd["use_xmult"] = 1
    args = sfx.check_linear_args(x, w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max, **kw)
    tr = linear_traffic(args, p)
    assert tr.cmd == cmd_layout(p).const(cmd).as_bits()
    tiles = tile_schedule(t, n, p.rows, p.cols)
    assert len(tr.par) == len(tiles) * p.cols and len(tr.act) == len(tr.wgt) == len(tiles) * k
    assert tr.tiles == len(tiles)
    for ti, (t0, tv, n0, nv) in enumerate(tiles):
        for j in range(p.cols):
            ch = n0 + min(j, nv - 1)
            lane = {"bias": int(args.bias[n0 + j]) if j < nv else 0, "shift": int(args.shift[ch]),
                    "mult": int(args.mult[ch])}
            assert tr.par[ti * p.cols + j] == par_layout(p).const(lane).as_bits()
        for kk in range(k):
            codes = [int(x[t0 + i, kk]) if i < tv else 0 for i in range(p.rows)]
            exps = [int(args.x_exponent[t0 + i]) if i < tv else 0 for i in range(p.rows)]
            fields = {"codes": codes, "exp": exps}
            if p.xmult:   # rows past T carry the unused-field pattern
                fields["xmult"] = [int(args.xmult[t0 + i]) if i < tv else 0xA5A5 for i in range(p.rows)]
            assert tr.act[ti * k + kk] == act_layout(p).const(fields).as_bits()
            wc = [int(w[n0 + j, kk]) if j < nv else 0 for j in range(p.cols)]
            assert tr.wgt[ti * k + kk] == sum(c << (j * p.w_bits) for j, c in enumerate(wc))
    # res beats round-trip
    ref = sfx.linear(x, w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max, **kw)
    words = expected_res_words(ref, p)
    assert len(words) == tr.res_beats
    codes, padding = res_to_codes(words, t, n, p)
    assert padding == 0 and codes.dtype == ref.dtype and np.array_equal(codes, ref)
    with pytest.raises(ValueError, match="does not fit"):
        cmd_word(p, k=1 << p.k_bits, t=1, n=1)


def test_xmult_needs_an_accelerator_generated_with_it():
    """SPEC section 4: hardware generated without xmult rejects an operation that carries it;
    the host packing refuses it before anything is sent."""
    p = AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=16)
    args = sfx.check_linear_args(np.ones((2, 3), np.uint8), np.ones((2, 3), np.uint8), a_bits=8, w_bits=8,
                                 out_bits=8, k_max=16, shift=-10, xmult=[40000, 50000])
    msg = r"carries xmult .* generated without it: generate it with xmult=True \(sfx verilog --xmult\)"
    with pytest.raises(ValueError, match=msg):
        linear_traffic(args, p)
    with pytest.raises(ValueError, match=msg):
        run_linear(args.x, args.w, a_bits=8, w_bits=8, out_bits=8, k_max=16, shift=-10, xmult=[40000, 50000],
                   rows=2, cols=2, xmult_hw=False)
    with pytest.raises(TypeError, match=r"xmult must be a bool \(generate the per-row activation multiplier\), got int 1"):
        AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, xmult=1)


def test_scoreboard_reports_first_mismatch():
    p = AccelParams(rows=2, cols=3, a_bits=8, w_bits=8, out_bits=8, k_max=64)
    codes = np.arange(3 * 4, dtype=np.uint8).reshape(3, 4)
    sb = LinearScoreboard(p, context="unit")
    op = sb.expect(codes, name="opA")
    words = list(op.words)
    sb.check(words[0])
    bad = words[1] ^ (0x5 << 8)  # lane 1 of beat 1 = Y[1, 1]
    with pytest.raises(ScoreboardMismatch, match=r"opA: res beat 1 \(tile 0, row 1\).*first at Y\[t=1, n=1\]: "
                                                  r"expected code 0x5, got 0x0"):
        sb.check(bad)
    # tile (t0=0, n0=3) has one valid lane: lanes 1, 2 must be 0
    sb2 = LinearScoreboard(p)
    op2 = sb2.expect(codes)
    for wd in op2.words[:2]:
        sb2.check(wd)
    with pytest.raises(ScoreboardMismatch, match=r"padding lane 2 \(channel 5 >= N\)"):
        sb2.check(op2.words[2] | (1 << 16))
    sb3 = LinearScoreboard(p)
    with pytest.raises(ScoreboardMismatch, match="unexpected res beat 0x7: no operation is pending"):
        sb3.check(7)
    got = codes.copy()
    got[2, 3] = 99
    assert first_mismatch(got, codes) == (1, {"t": 2, "n": 3, "expected": 11, "got": 99})


# --------------------------------------------------------------------------- with a simulator


@pytest.mark.sim
@pytest.mark.parametrize("simulator", [pytest.param(s, marks=group("sf8_4x4", s)) for s in ("verilator", "icarus")])
def test_run_linear_matches_sfx(simulator):
    p = CONFIGS["sf8_4x4"]
    x, w, kw = random_case(11, 2 * p["rows"] + 1, p["cols"] + 3, p["k_max"], 8, 8)
    codes, stats = run_linear(x, w, a_bits=8, w_bits=8, out_bits=8, rows=p["rows"], cols=p["cols"],
                              k_max=p["k_max"], simulator=simulator, **kw)
    ref, ref_stats = sfx.linear_with_stats(x, w, a_bits=8, w_bits=8, out_bits=8, k_max=p["k_max"], **kw)
    assert codes.dtype == ref.dtype and codes.shape == ref.shape
    np.testing.assert_array_equal(codes, ref)
    assert stats.mismatches == 0 and stats.padding_nonzero == 0 and not stats.error
    assert stats.saturated == ref_stats.n_saturated == stats.reference_saturated
    assert stats.macs == x.shape[0] * w.shape[0] * x.shape[1]
    assert 0 < stats.utilization <= 1 and stats.cycles > 0 and stats.cycles_per_s > 0
    assert stats.simulator == simulator and stats.waves is None
    # the second call finds the build in the cache
    codes2, stats2 = run_linear(x[:1], w[:1], a_bits=8, w_bits=8, out_bits=8, rows=p["rows"], cols=p["cols"],
                                k_max=p["k_max"], simulator=simulator, relu=True)
    assert stats2.build_cached and stats2.build_dir == stats.build_dir
    np.testing.assert_array_equal(codes2, sfx.linear(x[:1], w[:1], a_bits=8, w_bits=8, out_bits=8,
                                                      k_max=p["k_max"], relu=True))


@pytest.mark.sim
@group("sf16_2x2", "verilator")
def test_run_linear_sf16_uint16():
    p = CONFIGS["sf16_2x2"]
    x, w, kw = random_case(5, 3, 5, 17, 16, 16)
    kw["shift"] = kw["shift"] + 16  # F = 30, Mo = 15
    codes, stats = run_linear(x, w, a_bits=16, w_bits=16, out_bits=16, rows=p["rows"], cols=p["cols"],
                              k_max=p["k_max"], **kw)
    ref = sfx.linear(x, w, a_bits=16, w_bits=16, out_bits=16, k_max=p["k_max"], **kw)
    assert codes.dtype == np.uint16
    np.testing.assert_array_equal(codes, ref)
    assert stats.mismatches == 0


@pytest.mark.sim
@pytest.mark.parametrize("simulator", [pytest.param(s, marks=pytest.mark.xdist_group(f"sim-harness-sf16_2x2_xmult-{s}"))
                                       for s in ("verilator", "icarus")])
def test_run_linear_xmult_wide_products(simulator):
    """run_linear with per-row multipliers (SPEC revision 2) on the accelerator generated with
    xmult, SF16 x SF16: |acc| * mult * xmult up to 70 bits; the row scales come from
    sfx.encode_rows_scaled, as the accelerator-exact backend streams them."""
    p = CONFIGS["sf16_2x2_xmult"]
    rng = np.random.default_rng(21)
    t, n, k = 5, 3, p["k_max"]
    xf = rng.standard_normal((t, k)) * np.array([[0.5], [1.0], [3.0], [0.2], [1.5]])
    x, xexp, xmult = sfx.encode_rows_scaled(xf, 16, np.abs(xf).max(axis=1))
    w = rng.integers(0, 1 << 16, (n, k)).astype(np.uint16)
    w[0] |= 0x7FFF   # all-maximal weights in one channel: the largest accumulators
    kw = dict(bias=rng.integers(-5000, 5000, n), mult=np.array([1, 65535, 40000]), x_exponent=xexp, xmult=xmult,
              shift=np.array([10, -6, -5]), rounding="toward_zero")   # right shifts 33..53
    codes, stats = run_linear(x, w, a_bits=16, w_bits=16, out_bits=16, rows=p["rows"], cols=p["cols"], k_max=k,
                              simulator=simulator, stalls=0.3, seed=5, **kw)
    ref, ref_stats = sfx.linear_with_stats(x, w, a_bits=16, w_bits=16, out_bits=16, k_max=k, **kw)
    np.testing.assert_array_equal(codes, ref)
    assert stats.mismatches == 0 and not stats.error and stats.saturated == ref_stats.n_saturated
    assert np.count_nonzero(ref) == t * n and ref_stats.n_saturated < t * n // 2   # not trivially zero or saturated
