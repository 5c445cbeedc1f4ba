"""``sfx cosim`` on Verilator and Icarus: a micro model end to end on a 4x4 array (k_max 64,
the array of tests/test_sim_accelerator.py's ``sf8_4x4``, so the builds are shared).

Every linear layer of the forward pass runs on the RTL from the layers' programs (calibrated
static output exponents from the checkpoint); the RTL codes must equal ``sfx.linear``'s, and
every layer output, the logits and the perplexity the accelerator backend's, exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from superfloat.sim import cosim as cs
from superfloat.sw import sfx

from test_cosim import _program_and_input, micro_checkpoint

pytestmark = pytest.mark.sim

ARRAY = dict(rows=4, cols=4, k_max=64)


def group(simulator: str) -> pytest.MarkDecorator:
    return pytest.mark.xdist_group(f"sim-accel-sf8_4x4-{simulator}")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosim-sim")
    return {
        "llama8": micro_checkpoint(root / "llama8", "llama", weight_bits=8, act_bits=8),  # float scales: mult path
        "opt4": micro_checkpoint(root / "opt4", "opt", weight_bits=4, act_bits=8, scale_kind="pow2"),  # bias
        "opt8": micro_checkpoint(root / "opt8", "opt", weight_bits=8, act_bits=8),  # bias and mult
    }


def _check_bit_exact(rep: dict, n_layers: int) -> None:
    assert rep["mismatches"] == 0, [l["first_mismatch"] for l in rep["layers"] if l["mismatches"]]
    assert rep["codes_compared"] == sum(l["T"] * l["N"] for l in rep["layers"]) > 0
    assert rep["forward"]["logits_identical"] and rep["forward"]["argmax_identical"] and rep["bit_exact"]
    assert rep["layers_simulated"] == n_layers and not rep["rtl_error_flags"]
    assert rep["calls_differing_from_accelerator"] == 0
    for l in rep["layers"]:
        assert l["cycles"] > 0 and 0 < l["utilization"] <= 1 and l["equal_to_accelerator"]
        assert l["saturated"] == l["saturated_reference"]
    assert rep["cosine"] > 0.95  # SF8 outputs: the layer's function, up to output rounding


@pytest.mark.parametrize("simulator", [pytest.param("verilator", marks=group("verilator")),
                                       pytest.param("icarus", marks=group("icarus"))])
def test_whole_forward_pass_on_the_rtl(ckpts, simulator):
    """Llama (W8A8, float scales -> mult) with every linear layer on the RTL; on Verilator also the
    perplexity of a text with every layer on the RTL, equal to the backend's."""
    rep = cs.cosim(ckpts["llama8"], "all", simulator=simulator, tokens=5, jobs=2 if simulator == "verilator" else 1,
                   **ARRAY)
    _check_bit_exact(rep, 14)
    assert rep["arrays"] == ["4x4 a8w8o8 k_max=64"] and rep["output_exponents"] == "static, calibrated (checkpoint)"
    assert rep["cycles"] == sum(l["cycles"] for l in rep["layers"])
    if simulator == "verilator":
        rep = cs.cosim(ckpts["llama8"], "all", simulator=simulator, data="shakespeare", max_tokens=12, **ARRAY)
        _check_bit_exact(rep, 14)
        assert rep["perplexity"]["identical"] and rep["perplexity"]["rtl"]["tokens"] == 11


@group("verilator")
@pytest.mark.parametrize("simulator", [pytest.param(s, marks=pytest.mark.xdist_group(f"sim-xmult-4x4-{s}"))
                                       for s in ("verilator", "icarus")])
def test_whole_forward_with_per_row_float_scales_on_an_xmult_array(tmp_path, simulator):
    """W8A8 with act_scale='float' (a 16-bit multiplier per token, SPEC revision 2): every
    linear layer on the RTL generated with xmult, bit-exact against sfx.linear and the backend."""
    ck = micro_checkpoint(tmp_path / "xmult", "llama", weight_bits=8, act_bits=8, act_scale="float")
    rep = cs.cosim(ck, "all", simulator=simulator, tokens=4, **ARRAY)
    _check_bit_exact(rep, 14)
    assert rep["arrays"] == ["4x4 a8w8o8 k_max=64 xmult"]


def test_cli_json_block_with_biases_and_widened_sf4_weights(ckpts, capsys):
    """OPT (SF4 pow2 weights widened onto the 8-bit array, SF8 dynamic activations, biases): one
    decoder block (attention + MLP) through ``sfx cosim --json``."""
    from superfloat.cli import main

    code = main(["cosim", "-c", str(ckpts["opt4"]), "--layer", "model.decoder.layers.1", "--tokens", "6",
                 "--rows", "4", "--cols", "4", "--k-max", "64", "--w-bits", "8", "--json",
                 "--no-progress"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("mismatches", "codes_compared", "cycles", "utilization", "max_abs_error", "cosine"):
        assert key in rep
    _check_bit_exact(rep, 6)
    assert rep["forward"]["block_output"]["identical_to_accelerator"]
    assert all(l["bias"] and l["activation_source"] == "layer" for l in rep["layers"])


@group("verilator")
def test_bias_groups_and_mult_on_the_rtl(ckpts):
    """A layer with a bias and a folded float scale, rows of several exponents: one operation
    per exponent, each exact against sfx.linear, the assembled codes equal to the backend's."""
    prog, x = _program_and_input(ckpts["opt8"], "model.decoder.layers.0.fc1")
    call = cs.program_ops("fc1", prog, x, cs.ArrayConfig(**ARRAY))
    assert len(call.ops) >= 3 and all(op.args.mult is not None and op.args.bias is not None for op in call.ops)
    eng = cs.SessionEngine(1)
    try:
        results = [f.result() for f in [eng.submit(op) for op in call.ops]]
    finally:
        eng.close()
    assert [r.mismatches for r in results] == [0] * len(call.ops)
    for op, r in zip(call.ops, results):
        assert np.array_equal(r.codes, sfx.linear(op.args.x, op.args.w, a_bits=8, w_bits=8, out_bits=8,
                                                  bias=op.args.bias, shift=op.args.shift, mult=op.args.mult,
                                                  x_exponent=op.args.x_exponent, k_max=64))
        assert r.stats.cycles > 0 and r.stats.saturated == r.stats.reference_saturated
    assert np.array_equal(call.assemble(results), prog.codes(x)[0].numpy())


@group("verilator")
def test_session_matches_run_linear():
    """The session transport gives run_linear's codes and cycle counts for the same operation."""
    from superfloat.sim import run_linear

    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (5, 40)).astype(np.uint8)
    w = rng.integers(0, 256, (6, 40)).astype(np.uint8)
    kw = dict(a_bits=8, w_bits=8, out_bits=8, bias=rng.integers(-3000, 3000, 6), shift=rng.integers(-2, 2, 6) - 2,
              mult=rng.integers(1 << 15, 1 << 16, 6), x_exponent=rng.integers(-1, 2, 5), k_max=64)
    kw["shift"] = kw["shift"] + 16
    want, st = run_linear(x, w, rows=4, cols=4, **kw)
    args = sfx.check_linear_args(x, w, **kw)
    with cs.RTLSession(cs.ArrayConfig(**ARRAY)) as s:
        got, st2 = s.run(args)
        again, st3 = s.run(args)  # a second operation in the same session: same result (reset between)
    assert np.array_equal(got, want) and np.array_equal(again, want)
    assert st2.mismatches == st.mismatches == 0
    assert st2.cycles == st3.cycles == st.cycles and st2.saturated == st3.saturated == st.saturated


def test_blas_thread_limit_nests_and_restores():
    """RTLSession computes its reference on one OpenBLAS thread; overlapping limits (several
    sessions in threads) restore the original count once the last one is done."""
    import threading

    from superfloat.sim.engines import _BlasThreads

    np.ones((64, 64)) @ np.ones((64, 64))  # OpenBLAS loaded
    funcs = _BlasThreads._find()
    if not funcs:
        pytest.skip("numpy does not use OpenBLAS here")
    get = funcs[0][0]
    start = get()
    _BlasThreads.limit(1)
    _BlasThreads.limit(1)
    assert get() == 1
    _BlasThreads.restore()
    assert get() == 1
    _BlasThreads.restore()
    assert get() == start

    def worker():
        for _ in range(500):
            _BlasThreads.limit(1)
            _BlasThreads.restore()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert get() == start and _BlasThreads._users == 0
