"""SFxMacArray against superfloat.sw.sfx.matmul_acc, with random stalls on the input and
on the row grants of the drain."""
from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.hdl import Fragment

from superfloat.hw.interface import pack_lanes
from superfloat.hw.mac_array import TAG_BITS, SFxMacArray, mac_array_in_layout, sum_bits, xor_tree_levels
from superfloat.sw import sfx

from hw_stream_helpers import ARRAY_PARAM_ERRORS, Source, check_rejects, make_sim, pack, raw


def _tile_beats(arr: SFxMacArray, x: np.ndarray, w: np.ndarray) -> list[int]:
    """Beats of one tile: x is [rows_valid, K] activation codes, w is [cols, K] weight codes."""
    lay = mac_array_in_layout(arr.rows, arr.cols, arr.a_bits, arr.w_bits)
    rv, k = x.shape
    xt = np.zeros((k, arr.rows), dtype=np.int64)
    xt[:, :rv] = x.T
    acts = pack_lanes(xt, arr.a_bits)
    wgts = pack_lanes(w.T, arr.w_bits)
    return [pack(lay, {"act": [0] * arr.rows, "wgt": [0] * arr.cols, "last": s == k - 1, "rows_valid": rv})
            | acts[s] | (wgts[s] << (arr.rows * arr.a_bits)) for s in range(k)]


def _run_tiles(arr: SFxMacArray, tiles, *, stall=0.0, grant_stall=0.0, seed=0, max_rows_out=None):
    """Feed the tiles' beats (random input stalls); grant drain rows with probability
    1 - grant_stall, at most ``max_rows_out`` granted rows outstanding (rows whose last value
    has not come out). Returns (accumulators, last flags, info)."""
    beats = [b for x, w in tiles for b in _tile_beats(arr, x, w)]
    n_out = sum(x.shape[0] * arr.cols for x, _ in tiles)
    src = Source(arr.inp, beats, stall=stall, seed=seed, name="inp")
    rng = random.Random(seed + 1)
    sim, _ = make_sim(arr)
    got, lasts, info = [], [], {"max_outstanding": 0}
    A = arr.acc_bits
    lay_w = len(raw(arr.out.payload))

    async def tb(ctx):
        outstanding = 0     # rows granted and not finished
        cycle = 0
        while not (len(got) == n_out and src.done):
            cycle += 1
            assert cycle < 40 * (len(beats) + n_out) + 200, f"stuck: {len(got)} of {n_out} values"
            src.drive(ctx)
            ok = int(rng.random() >= grant_stall and (max_rows_out is None or outstanding < max_rows_out))
            ctx.set(arr.row_ok, ok)
            _, _, ready, take, valid, payload = await ctx.tick().sample(
                arr.inp.ready, arr.row_take, arr.out.valid, raw(arr.out.payload))
            src.update(ready)
            if take:
                assert ok, "a row started without a grant"
                outstanding += 1
            info["max_outstanding"] = max(info["max_outstanding"], outstanding)
            if valid:
                v = payload & ((1 << A) - 1)
                got.append(v - (1 << A) if v >> (A - 1) else v)
                lasts.append((payload >> A) & 1)
                if len(got) % arr.cols == 0:
                    outstanding -= 1
        info["cycles"] = cycle
        await ctx.tick()
        info["busy"] = ctx.get(arr.busy)
        assert lay_w == A + 1 + TAG_BITS

    sim.add_testbench(tb)
    sim.run()
    return got, lasts, info


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


@pytest.mark.parametrize("rows,cols,a_bits,w_bits,k_max,dsp_pes,mul_stages,stall,grant_stall,overlap", [
    (2, 3, 4, 4, 16, 0, 0, 0.0, 0.0, True),
    (3, 2, 8, 8, 64, 6, 1, 0.3, 0.5, True),
    (1, 1, 2, 2, 4, 1, 0, 0.5, 0.5, True),
    (2, 2, 16, 3, 1 << 20, 1, 2, 0.2, 0.2, True),
    (1, 4, 5, 7, 9, 2, 0, 0.0, 0.8, True),
    (5, 4, 4, 4, 64, 0, 0, 0.1, 0.3, True),     # 20 PEs: two XOR levels, a partial group
    (2, 3, 4, 4, 16, 0, 0, 0.0, 0.0, False),
    (3, 2, 6, 5, 64, 2, 1, 0.4, 0.4, False),
    (1, 1, 2, 2, 4, 0, 0, 0.3, 0.6, False),
    (4, 5, 4, 4, 32, 0, 0, 0.2, 0.2, False),
])
def test_mac_array_matches_matmul_acc(rows, cols, a_bits, w_bits, k_max, dsp_pes, mul_stages, stall, grant_stall,
                                      overlap):
    arr = SFxMacArray(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, k_max=k_max, dsp_pes=dsp_pes,
                      overlap_drain=overlap, mul_stages=mul_stages)
    rng = np.random.default_rng(rows * 100 + cols)
    ks = [1, min(k_max, 5), 1, min(k_max, 3), min(k_max, 12)]
    rv = [rows, max(1, rows - 1), 1, rows, rows]
    tiles = _random_tiles(arr, rng, ks, rv)
    acc, last, info = _run_tiles(arr, tiles, stall=stall, grant_stall=grant_stall, seed=rows + cols)
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
    tiles = [pos, neg, pos]
    acc, last, _ = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    assert max(abs(v) for v in acc) == 16 * 49


def test_mac_array_two_complement_pes():
    """pe_kind='tc' (the synthesis baseline): the codes are two's complement integers."""
    arr = SFxMacArray(rows=2, cols=3, a_bits=4, w_bits=5, k_max=16, pe_kind="tc")
    rng = np.random.default_rng(9)
    tiles = _random_tiles(arr, rng, [5, 16, 1])
    acc, _, _ = _run_tiles(arr, tiles, stall=0.2)

    def signed(v, b):
        return np.where(v >> (b - 1), v - (1 << b), v)

    exp = []
    for x, w in tiles:
        exp.extend(int(v) for v in (signed(x, 4) @ signed(w, 5).T).reshape(-1))
    assert acc == exp


def test_mac_array_full_rate_and_overlapped_drain():
    """With no stall, one beat enters per cycle plus one idle cycle per tile; the drain of
    one tile (one value per cycle) overlaps the next tile's accumulation."""
    arr = SFxMacArray(rows=2, cols=2, a_bits=3, w_bits=3, k_max=8)
    rng = np.random.default_rng(3)
    tiles = _random_tiles(arr, rng, [8, 8, 8])
    acc, last, info = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    # 24 beats and 2 idle cycles: the last beat enters in cycle 26. Its sums are complete
    # (and move to the shadows) 1 + pe_latency cycles later, when the first row starts;
    # the four values follow readout_latency + 1 cycles after that, one per cycle.
    last_in = 24 + 2
    assert info["cycles"] == last_in + 1 + arr.pe_latency + arr.readout_latency + 4


def test_mac_array_without_overlap_stalls_during_drain():
    """overlap_drain=False: no beat enters from a tile's last beat to the end of its drain."""
    arr = SFxMacArray(rows=2, cols=2, a_bits=3, w_bits=3, k_max=8, overlap_drain=False)
    rng = np.random.default_rng(3)
    tiles = _random_tiles(arr, rng, [8, 8, 8])
    acc, last, info = _run_tiles(arr, tiles)
    assert acc == _expected(arr, tiles)[0]
    # per tile: 8 beats; the sums are complete 1 + pe_latency cycles after the last one and
    # are read in 4 cycles; the next tile's first beat enters right after the last read.
    per_tile = 8 + 1 + arr.pe_latency + 4
    last_in = 2 * per_tile + 8
    assert info["cycles"] == last_in + 1 + arr.pe_latency + arr.readout_latency + 4


def test_mac_array_rows_wait_for_grants():
    """A consumer that grants one row at a time gets every value, in order."""
    arr = SFxMacArray(rows=3, cols=4, a_bits=4, w_bits=4, k_max=16)
    rng = np.random.default_rng(5)
    tiles = _random_tiles(arr, rng, [2, 16, 1], [3, 2, 3])
    acc, _, info = _run_tiles(arr, tiles, grant_stall=0.5, max_rows_out=1)
    assert acc == _expected(arr, tiles)[0]
    assert info["max_outstanding"] == 1


def test_sum_bits_is_exact_and_below_spec_a():
    """The array's accumulators hold any sum of k products (no bias: it is added after the
    array), exactly, in at most SPEC's A - 1 bits."""
    for a, w in ((2, 2), (4, 4), (8, 8), (4, 8), (16, 16), (3, 7)):
        for k in (1, 2, 3, 511, 512, 16384, 1 << 20):
            bits = sum_bits(a, w, k)
            big = k * ((1 << (a - 1)) - 1) * ((1 << (w - 1)) - 1)
            assert -(1 << (bits - 1)) <= -big and big < (1 << (bits - 1))
            assert bits == a + w or big >= (1 << (bits - 2))       # not one bit more than needed
            assert bits <= max(a + w, sfx.accumulator_bits(a, w, k) - 1)
    assert sum_bits(4, 4, 512, "tc") == (512 * 64).bit_length() + 1


def test_xor_tree_levels():
    assert [xor_tree_levels(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 256)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_mac_array_per_pe_multiplier_choice():
    arr = SFxMacArray(rows=2, cols=3, a_bits=4, w_bits=4, k_max=16, dsp_pes=4)
    assert arr.dsp_pes == 4
    assert [arr.pe_impl(i, j) for i in range(2) for j in range(3)] == ["dsp"] * 4 + ["lut"] * 2
    assert (arr.rows, arr.cols, arr.a_bits, arr.w_bits, arr.k_max) == (2, 3, 4, 4, 16)
    assert arr.acc_bits == sum_bits(4, 4, 16) == 11   # 16 * 49 = 784 needs 10 bits + sign
    assert (arr.overlap_drain, arr.mul_stages, arr.pe_kind, arr.pe_latency) == (True, 0, "sm", 2)
    with pytest.raises(AttributeError):
        arr.dsp_pes = 1
    Fragment.get(arr, None)


@pytest.mark.parametrize("kwargs,exc,match", ARRAY_PARAM_ERRORS + [
    (dict(dsp_pes=True), TypeError, r"dsp_pes must be an int, got bool"),
    (dict(overlap_drain=1), TypeError, r"overlap_drain must be a bool, got int"),
    (dict(mul_stages=5), ValueError, r"mul_stages must be in 0\.\.4, got 5"),
    (dict(pe_kind="int"), ValueError, r"pe_kind must be one of 'sm', 'tc', got 'int'"),
])
def test_mac_array_rejects_bad_parameters(kwargs, exc, match):
    check_rejects(SFxMacArray, dict(rows=2, cols=2, a_bits=4, w_bits=4, k_max=16, dsp_pes=0), kwargs, exc, match)
