"""SFxMacArray against superfloat.sw.sfx.matmul_acc, with random stalls on both streams."""
from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import Fragment

from superfloat.hw.interface import pack_lanes
from superfloat.hw.mac_array import DRAIN_LATENCY, SFxMacArray, mac_array_in_layout
from superfloat.sw import sfx

from hw_stream_helpers import Sink, Source, make_sim, pack, run_streams


def _tile_beats(arr: SFxMacArray, x: np.ndarray, w: np.ndarray) -> list[int]:
    """Beats of one tile: x is [rows_valid, K] activation codes, w is [cols, K] weight codes."""
    lay = mac_array_in_layout(arr.rows, arr.cols, arr.a_bits, arr.w_bits)
    rv, k = x.shape
    xt = np.zeros((k, arr.rows), dtype=np.int64)
    xt[:, :rv] = x.T
    acts = pack_lanes(xt, arr.a_bits)
    wgts = pack_lanes(w.T, arr.w_bits)
    return [pack(lay, {"act": [0] * arr.rows, "wgt": [0] * arr.cols, "last": s == k - 1, "rows_valid": rv}) | acts[s] | (wgts[s] << (arr.rows * arr.a_bits))
            for s in range(k)]


def _run_tiles(arr: SFxMacArray, tiles, *, stall=0.0, out_stall=0.0, seed=0):
    beats = [b for x, w in tiles for b in _tile_beats(arr, x, w)]
    n_out = sum(x.shape[0] * arr.cols for x, _ in tiles)
    src = Source(arr.inp, beats, stall=stall, seed=seed, name="inp")
    snk = Sink(arr.out, stall=out_stall, seed=seed + 1, name="out")
    sim, _ = make_sim(arr)
    info = {}

    async def tb(ctx):
        info["cycles"] = await run_streams(ctx, [src], [snk], until=lambda: len(snk.beats) == n_out and src.done,
                                           max_cycles=20 * (len(beats) + n_out) + 100)
        await ctx.tick()
        info["busy"] = ctx.get(arr.busy)

    sim.add_testbench(tb)
    sim.run()
    A = arr.acc_bits
    raw = np.array(snk.beats, dtype=object)
    acc = [int(v) & ((1 << A) - 1) for v in raw]
    acc = [v - (1 << A) if v >> (A - 1) else v for v in acc]
    last = [int(v) >> A for v in raw]
    return acc, last, info


def _expected(arr, tiles):
    acc, last = [], []
    for x, w in tiles:
        y = sfx.matmul_acc(x, w, a_bits=arr.a_bits, w_bits=arr.w_bits, k_max=arr.k_max)
        acc.extend(int(v) for v in y.reshape(-1))
        last.extend([0] * (y.size - 1) + [1])
    return acc, last


def _random_tiles(arr, rng, ks, rows_valid=None):
    tiles = []
    for i, k in enumerate(ks):
        rv = arr.rows if rows_valid is None else rows_valid[i]
        tiles.append((rng.integers(0, 1 << arr.a_bits, (rv, k)), rng.integers(0, 1 << arr.w_bits, (arr.cols, k))))
    return tiles


@pytest.mark.parametrize("rows,cols,a_bits,w_bits,k_max,dsp_pes,stall,out_stall,overlap", [
    (2, 3, 4, 4, 16, 0, 0.0, 0.0, True),
    (3, 2, 8, 8, 64, 6, 0.3, 0.5, True),
    (1, 1, 2, 2, 4, 1, 0.5, 0.5, True),
    (2, 2, 16, 3, 1 << 20, 1, 0.2, 0.2, True),
    (1, 4, 5, 7, 9, 2, 0.0, 0.8, True),
    (2, 3, 4, 4, 16, 0, 0.0, 0.0, False),
    (3, 2, 6, 5, 64, 2, 0.4, 0.4, False),
    (1, 1, 2, 2, 4, 0, 0.3, 0.6, False),
])
def test_mac_array_matches_matmul_acc(rows, cols, a_bits, w_bits, k_max, dsp_pes, stall, out_stall, overlap):
    arr = SFxMacArray(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max, dsp_pes=dsp_pes,
                      overlap_drain=overlap)
    rng = np.random.default_rng(rows * 100 + cols)
    ks = [1, min(k_max, 5), 1, min(k_max, 3), min(k_max, 12)]
    rv = [rows, max(1, rows - 1), 1, rows, rows]
    tiles = _random_tiles(arr, rng, ks, rv)
    acc, last, info = _run_tiles(arr, tiles, stall=stall, out_stall=out_stall, seed=rows + cols)
    exp_acc, exp_last = _expected(arr, tiles)
    assert acc == exp_acc
    assert last == exp_last
    assert info["busy"] == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_mac_array_extreme_sums_fill_the_accumulator(overlap):
    """K = k_max with every product at its largest magnitude, both signs: the accumulator
    width of SPEC section 3 holds the exact sum."""
    arr = SFxMacArray(rows=2, cols=2, a_bits=4, w_bits=4, k_max=16, overlap_drain=overlap)
    k = 16
    pos = (np.full((2, k), 7), np.array([np.full(k, 7), np.full(k, 15)]))      # +-K * 49
    neg = (np.full((2, k), 15), np.array([np.full(k, 15), np.full(k, 7)]))     # +-K * 49
    tiles = [pos, neg]
    acc, last, _ = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    assert max(abs(v) for v in acc) == 16 * 49


def test_mac_array_full_rate_and_overlapped_drain():
    """With no stall and K >= rows * cols, one beat enters per cycle, plus one idle cycle
    per tile boundary; the drain of one tile overlaps the next."""
    arr = SFxMacArray(rows=2, cols=2, a_bits=3, w_bits=3, k_max=8)
    rng = np.random.default_rng(3)
    tiles = _random_tiles(arr, rng, [8, 8, 8])
    acc, last, info = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    # 24 beats and 2 idle cycles: the last beat is taken in cycle 26, the tile's first
    # result is valid DRAIN_LATENCY cycles later, its 4th result 3 cycles after that.
    assert info["cycles"] == 24 + 2 + DRAIN_LATENCY + 3


def test_mac_array_without_overlap_stalls_during_drain():
    """overlap_drain=False: no beat enters from a tile's last beat to the end of its drain."""
    arr = SFxMacArray(rows=2, cols=2, a_bits=3, w_bits=3, k_max=8, overlap_drain=False)
    rng = np.random.default_rng(3)
    tiles = _random_tiles(arr, rng, [8, 8, 8])
    acc, last, info = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    # per tile: 8 beats, DRAIN_LATENCY - 1 cycles to the first result, 4 results
    assert info["cycles"] == 3 * (8 + DRAIN_LATENCY - 1 + 4)


def test_mac_array_per_pe_multiplier_choice():
    arr = SFxMacArray(rows=2, cols=3, a_bits=4, w_bits=4, k_max=16, dsp_pes=4)
    assert arr.dsp_pes == 4
    assert [arr.pe_impl(i, j) for i in range(2) for j in range(3)] == ["dsp"] * 4 + ["lut"] * 2
    assert (arr.rows, arr.cols, arr.a_bits, arr.w_bits, arr.k_max) == (2, 3, 4, 4, 16)
    assert arr.acc_bits == sfx.accumulator_bits(4, 4, 16)
    assert arr.overlap_drain is True
    with pytest.raises(AttributeError):
        arr.dsp_pes = 1
    Fragment.get(arr, None)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rows=0), ValueError, r"rows must be in 1\.\.64, got 0"),
    (dict(cols=65), ValueError, r"cols must be in 1\.\.64, got 65"),
    (dict(rows=2.0), TypeError, r"rows must be an int, got float"),
    (dict(a_bits=17), ValueError, r"a_bits must be in 2\.\.16"),
    (dict(w_bits=1), ValueError, r"w_bits must be in 2\.\.16"),
    (dict(k_max=0), ValueError, r"k_max must be in 1\.\.1048576, got 0"),
    (dict(dsp_pes=5), ValueError, r"dsp_pes must be in 0\.\.4, got 5"),
    (dict(dsp_pes=-1), ValueError, r"dsp_pes must be in 0\.\.4, got -1"),
    (dict(dsp_pes=True), TypeError, r"dsp_pes must be an int, got bool"),
    (dict(overlap_drain=1), TypeError, r"overlap_drain must be a bool, got int"),
])
def test_mac_array_rejects_bad_parameters(kwargs, exc, match):
    args = dict(rows=2, cols=2, a_bits=4, w_bits=4, k_max=16, dsp_pes=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        SFxMacArray(**args)
