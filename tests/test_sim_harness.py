"""The in-simulation stream harness (``sim/harness.py``, ``sim/tb_harness.py``) on Verilator and Icarus.

* host-side packing: the vectorized ``$readmemh`` beats equal ``linear_traffic``'s (itself
  built on ``hw/interface.py``), and ``res_codes`` inverts the ``res`` packing;
* every configuration of ``tb_accelerator.CONFIGS`` runs the harness regression tests (random
  batches with seeded stalls on every stream, long result back-pressure, reset in the middle of
  an operation, malformed commands, bias out of range; every code against ``sfx.linear``);
* a short ``verify`` run (the scale verification of ``sfx bench rtl``) and self-tests: a
  flipped expected code and a wrong payload make the bench fail.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from superfloat.hw.interface import AccelParams
from superfloat.sim import runner
from superfloat.sim.harness import (Stalls, batch_beats, expand_beats, linear_beats, pack_beats, raw_beats, res_codes,
                                    words_bytes)
from superfloat.sim.linear import build_harness, params_env, run_linear
from superfloat.sim.packing import linear_traffic
from superfloat.sim.scoreboard import expected_res_words, linear_kwargs
from superfloat.sim.tb_accelerator import CONFIGS, random_args
from superfloat.sim.tb_harness import HARNESS_TESTS
from superfloat.sw import sfx

TB = "superfloat.sim.tb_harness"


def group(config: str, simulator: str) -> pytest.MarkDecorator:
    return pytest.mark.xdist_group(f"sim-harness-{config}-{simulator}")


@pytest.mark.parametrize("config", list(CONFIGS) + ["sf8_8x8"])
def test_packing_matches_linear_traffic(config):
    c = CONFIGS.get(config, dict(rows=8, cols=8, a_bits=8, w_bits=8, out_bits=8, k_max=16384))
    p = AccelParams(**c)
    rng = random.Random(5)
    ops = [random_args(rng, p, use_mult=bool(i & 1), use_xexp=bool(i & 2)) for i in range(12)]
    for a in ops:
        tr = linear_traffic(a, p)
        beats = linear_beats(a, p)
        for s in ("par", "act", "wgt"):
            assert expand_beats(beats, s) == getattr(tr, s), s
        assert expand_beats(beats, "cmd") == [tr.cmd]
        assert beats.counts == {"cmd": 1, "par": len(tr.par), "act": len(tr.act), "wgt": len(tr.wgt),
                                "res": tr.res_beats}
        # each activation / weight block is stored once
        assert beats.words["act"] == -(-a.T // p.rows) * a.K and beats.words["wgt"] == -(-a.N // p.cols) * a.K
        ref = sfx.linear(a.x, a.w, **linear_kwargs(a))
        nd = -(-(p.out_bits * p.cols) // 4)
        text = "".join(f"{w:0{nd}x}\n" for w in expected_res_words(ref, p))
        codes, pad = res_codes(text, a.T, a.N, p)
        assert np.array_equal(codes, ref) and codes.dtype == ref.dtype and pad == 0
    # a batch sends the operations back to back
    both = batch_beats([linear_beats(a, p) for a in ops[:3]])
    for s in ("par", "act", "wgt"):
        assert expand_beats(both, s) == sum((getattr(linear_traffic(a, p), s) for a in ops[:3]), [])
    with pytest.raises(ValueError, match=r"3 res beats for an operation that has"):
        res_codes("0\n0\n0\n", p.rows + 5, 1, p)


def test_pack_beats_layout():
    """Most significant byte first, ceil(width / 8) bytes, lanes two's complement, odd widths masked."""
    got = pack_beats([(np.array([[1, -1, 5]]), 4, 0), (np.array([[-2]]), 8, 12)], 20, 1)
    assert got.tolist() == [[0x0f, 0xe5, 0xf1]]
    assert pack_beats([(np.array([[0x1234, -1]]), 16, 0)], 32, 1).tolist() == [[0xff, 0xff, 0x12, 0x34]]
    assert pack_beats([(np.array([[3], [1]]), 2, 1)], 3, 2).tolist() == [[0x06], [0x02]]
    assert words_bytes([0x1abc, 0x3], 13).tolist() == [[0x1a, 0xbc], [0x00, 0x03]]
    p = AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=16)
    r = raw_beats({"cmd": [5], "wgt": [1, 2, 3]}, p, res=4)
    assert r.counts == {"cmd": 1, "par": 0, "act": 0, "wgt": 3, "res": 4} and expand_beats(r, "wgt") == [1, 2, 3]


def test_stalls_are_checked():
    with pytest.raises(ValueError, match=r"stall probability of act must be in 0..1, got 1.5"):
        Stalls({"act": 1.5}).cfg()
    with pytest.raises(ValueError, match=r"longest stall of res must be in 1..256 cycles, got 300"):
        Stalls.uniform(0.1, 4, res_max_len=300).cfg()
    assert Stalls.uniform(0.5, 6).cfg()["thr_wgt"] == 32768 and Stalls.uniform(0.5, 6).cfg()["mask_wgt"] == 7


CASES = [pytest.param(c, s, marks=[pytest.mark.sim, group(c, s)], id=f"{c}-{s}") for c in CONFIGS
         for s in runner.SIMULATORS]


@pytest.mark.parametrize("config,simulator", CASES)
def test_harness_benches(config, simulator, tmp_path):
    p = AccelParams(**CONFIGS[config])
    b = build_harness(p, simulator=simulator)
    r = runner.run(b, TB, testcase=list(HARNESS_TESTS) + ["verify"],
                   env={"SFX_SIM_PARAMS": params_env(p), "SFX_SIM_NOPS": "6", "SFX_SIM_SEED": "3",
                        "SFX_SIM_VERIFY_CODES": "2000"}, run_dir=tmp_path / "run")
    assert r.tests == len(HARNESS_TESTS) + 1 and r.failed == 0
    v = json.loads((tmp_path / "run" / "sfx_verify.json").read_text())
    assert v["codes"] >= 2000 and v["seed"] == 3 and v["operations"] > 0


@pytest.mark.sim
@group("sf8_4x4", "verilator")
def test_harness_scoreboard_catches_a_wrong_code():
    """Self-test: with one expected code flipped, the harness bench must fail and name the element."""
    p = AccelParams(**CONFIGS["sf8_4x4"])
    b = build_harness(p, simulator="verilator")
    with pytest.raises(runner.SimulationFailed, match=r"Y\[t=0, n=0\]: expected code 0x[0-9a-f]+, got 0x"):
        runner.run(b, TB, testcase="h_random_batches",
                   env={"SFX_SIM_PARAMS": params_env(p), "SFX_SIM_INJECT": "flip", "SFX_SIM_NOPS": "2"})


@pytest.mark.sim
@pytest.mark.parametrize("simulator", [pytest.param(s, marks=group("sf8_4x4", s)) for s in runner.SIMULATORS])
def test_run_linear_harness_with_stalls_equals_percycle(simulator):
    """Same codes with the harness (with and without stalls) and the per-cycle path; without
    stalls the same cycle count; the seed is in the stats."""
    p = AccelParams(**CONFIGS["sf8_4x4"])
    a = random_args(random.Random(9), p, use_mult=True, use_xexp=True, t=9, n=6, k=40)
    kw = dict(**linear_kwargs(a), rows=p.rows, cols=p.cols, simulator=simulator)
    kw["k_max"] = p.k_max
    c_h, s_h = run_linear(a.x, a.w, **kw)
    c_p, s_p = run_linear(a.x, a.w, **kw, engine="percycle")
    c_s, s_s = run_linear(a.x, a.w, **kw, stalls=0.3, seed=77)
    ref = sfx.linear(a.x, a.w, **linear_kwargs(a))
    for c, s in ((c_h, s_h), (c_p, s_p), (c_s, s_s)):
        assert np.array_equal(c, ref) and s.mismatches == 0 and s.saturated == s.reference_saturated
    assert s_h.cycles == s_p.cycles and s_h.engine == "harness" and s_p.engine == "percycle"
    assert s_s.cycles > s_h.cycles and s_s.seed == 77 and "act 0.30x6" in s_s.stalls
    with pytest.raises(ValueError, match=r"engine must be one of 'harness', 'percycle', got 'x'"):
        run_linear(a.x, a.w, **kw, engine="x")


def test_sfx_verify_rejects_a_bad_configuration(capsys):
    from superfloat.cli import main

    assert main(["verify", "--config", "4x4", "--codes", "10"]) == 2
    assert "configuration '4x4' is not RxC-aAwWoO[-kK][-x] (e.g. 8x8-a8w8o8" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"codes must be a positive int, got 0"):
        from superfloat.sim.verify import parse_config, verify_config

        verify_config(parse_config("4x4-a8w8o8-k64"), simulator="verilator", codes=0, seed=1)
    from superfloat.sim.verify import SHIPPED_CONFIGS, config_name

    p = parse_config("2x3-a8w4o8-k64-x")
    assert p.xmult and (p.rows, p.cols, p.w_bits, p.k_max) == (2, 3, 4, 64) and config_name(p) == "2x3-a8w4o8-k64-x"
    assert all(config_name(parse_config(n)) == n for n in SHIPPED_CONFIGS)


@pytest.mark.sim
@group("sf8_4x4", "verilator")
def test_sfx_verify_cli(capsys):
    """``sfx verify`` on the sf8_4x4 array: codes, seed, regression tests in the JSON."""
    from superfloat.cli import main

    assert main(["verify", "--config", "4x4-a8w8o8-k64", "--codes", "600", "--seed", "9", "--json"]) == 0
    (st,) = json.loads(capsys.readouterr().out)
    assert st["codes"] >= 600 and st["seed"] == 9 and st["tests_passed"] == st["tests"] == len(HARNESS_TESTS) + 1
    assert st["config"] == "4x4-a8w8o8-k64" and st["features"]["k_max"] >= 1
