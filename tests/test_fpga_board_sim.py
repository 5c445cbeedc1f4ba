"""The board top's UART link in an HDL simulator: the host driver's bytes on ``rx``, its
results from ``tx``, equal to sfx.linear (sim/tb_board.py, Verilator and Icarus)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from superfloat.hw.fpga.board_top import UARTBridge
from superfloat.sim import runner
from superfloat.sw import sfx

pytestmark = [pytest.mark.sim, pytest.mark.xdist_group("fpga_board_sim")]

SIM_DIR = Path(__file__).resolve().parent.parent / "sim"
HW_DIR = Path(__file__).resolve().parent.parent / "hw" / "fpga"
BENCH_SOURCES = [SIM_DIR / "tb_board.py", SIM_DIR / "streams.py", HW_DIR / "host.py", HW_DIR / "protocol.py"]

DIVISOR = 4
IDLE_TIMEOUT = 3000


def _cases(rng, bits, k_max):
    """Operations covering tiling remainders, relu, both roundings, mult, per-row exponents,
    bias and saturation."""
    a = w = o = bits
    f = (a - 1) + (w - 1)
    out = []

    def rand_codes(shape, bits_):
        return rng.integers(0, 1 << bits_, shape)

    specs = [
        dict(T=3, N=3, K=5),
        dict(T=1, N=5, K=1, relu=True),
        dict(T=4, N=2, K=7, rounding="toward_zero", xexp=True),
        dict(T=2, N=3, K=4, mult=True, bias=True),
        dict(T=5, N=4, K=3, bias=True, saturate=True),
    ]
    for s in specs:
        T, N, K = s["T"], s["N"], s["K"]
        x, wc = rand_codes((T, K), a), rand_codes((N, K), w)
        kw = dict(a_bits=a, w_bits=w, out_bits=o, k_max=k_max, relu=s.get("relu", False),
                  rounding=s.get("rounding", "nearest_even"))
        ff = f + (16 if s.get("mult") else 0)
        hi = ff - (o - 1)                  # shift + xexp must stay <= hi (r >= 0)
        if s.get("saturate"):
            kw["shift"] = int(hi)          # r = 0: large accumulators saturate
        else:
            kw["shift"] = rng.integers(hi - 3, hi - 1, N).tolist()
        if s.get("xexp"):
            kw["x_exponent"] = rng.integers(-1, 2, T).tolist()
        if s.get("mult"):
            kw["mult"] = rng.integers(1 << 15, 1 << 16, N).tolist()
        if s.get("bias"):
            lim = 1 << (sfx.accumulator_bits(a, w, k_max) - 3)
            kw["bias"] = rng.integers(-lim, lim, N).tolist()
        out.append({"x": x.tolist(), "w": wc.tolist(), "kw": kw, "approx_bytes": 40 * (T * N * K + 10)})
    return out


CONFIGS = [
    pytest.param("verilator", dict(rows=2, cols=2, bits=4), id="verilator-2x2-SF4"),
    pytest.param("icarus", dict(rows=2, cols=3, bits=8), id="icarus-2x3-SF8"),
    pytest.param("verilator", dict(rows=3, cols=2, bits=6), id="verilator-3x2-SF6", marks=pytest.mark.slow),
]


K_MAX = 64


def _board_results(simulator, cfg, cases, tmp_path):
    """Build (cached by parameters) the board's UART bridge for ``cfg`` and run the host
    driver's sessions of ``cases`` through it; the bench's per-case results."""
    try:
        runner.check_simulator(simulator)
    except runner.SimulatorNotFound as e:
        pytest.skip(str(e))
    bridge = UARTBridge(rows=cfg["rows"], cols=cfg["cols"], a_bits=cfg["bits"], w_bits=cfg["bits"],
                        out_bits=cfg["bits"], k_max=K_MAX, divisor=DIVISOR, fifo_depth=64, credit_chunk=16,
                        idle_timeout=IDLE_TIMEOUT, xmult=cfg.get("xmult", False))
    b = runner.build(bridge, name="sfx_board", simulator=simulator, bench_sources=BENCH_SOURCES,
                     params={"design": "UARTBridge", **cfg, "k_max": K_MAX, "divisor": DIVISOR, "fifo_depth": 64,
                             "credit_chunk": 16, "idle_timeout": IDLE_TIMEOUT})
    out = tmp_path / "out.json"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"divisor": DIVISOR, "idle_timeout": IDLE_TIMEOUT, "cases": cases, "out": str(out)}))
    runner.run(b, "superfloat.sim.tb_board", env={"SFX_BOARD_JOB": str(job)})
    return json.loads(out.read_text())["cases"]


@pytest.mark.parametrize("simulator,cfg", CONFIGS)
def test_linear_over_uart_equals_sfx(simulator, cfg, tmp_path):
    rng = np.random.default_rng(cfg["rows"] * 100 + cfg["bits"])
    cases = _cases(rng, cfg["bits"], K_MAX)
    res = _board_results(simulator, cfg, cases, tmp_path)
    assert len(res) == len(cases)
    for case, r in zip(cases, res):
        want, st = sfx.linear_with_stats(np.array(case["x"]), np.array(case["w"]), **case["kw"])
        assert np.array_equal(np.array(r["codes"]), want)
        assert r["stats"]["n_saturated"] == st.n_saturated
        assert r["stats"]["bytes_sent"] > 0 and r["stats"]["status"]["busy"] is False
    # the saturation case really saturates, and the small FIFO forced credit frames
    assert res[-1]["stats"]["n_saturated"] > 0
    assert sum(r["stats"]["credit_frames"] for r in res) > 0


def _json(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def test_model_layer_over_uart_uses_the_static_output_exponents(tmp_path):
    """The host driver runs a quantized layer with the same LINEAR operations as the
    accelerator-exact backend and co-simulation (``layer_call``: the layer's calibrated static
    output exponents, streamed row exponents, bias in accumulator units): the board's codes
    equal the backend's, code for code."""
    import torch

    from superfloat.sim import layer_call
    from superfloat.sw.wasq import WASQConfig, quantize_, quantized_layers
    from superfloat.sw.wasq.accelerator import calibrate_outputs_
    from test_cosim import CALIB_TEXT, micro_model

    model = micro_model("opt")  # biases: one operation per row exponent
    quantize_(model, WASQConfig(weight_bits=4, act_bits=4, scale_kind="pow2"))
    calibrate_outputs_(model, [torch.tensor([list(CALIB_TEXT.encode()[:60])])], out_bits=4)
    layer = quantized_layers(model)["model.decoder.layers.0.self_attn.q_proj"]
    u = np.random.default_rng(5).standard_normal((3, layer.in_features))
    x = torch.tensor(u * np.array([[0.5], [4.0], [0.5]]), dtype=torch.float32)  # two row exponents
    call = layer_call(layer, x, rows=2, cols=2, k_max=K_MAX, simulator="verilator")
    assert len(call.ops) >= 2  # several row exponents, several operations
    cases = [{"x": _json(kw.pop("x_codes")), "w": _json(kw.pop("w_codes")),
              "kw": {k: _json(v) for k, v in kw.items()}, "approx_bytes": 40 * (len(op.rows_index) * 32 * 32 + 10)}
             for kw, op in zip(call.linear_kwargs(), call.ops)]
    res = _board_results("verilator", dict(rows=2, cols=2, bits=4), cases, tmp_path)
    got = call.assemble([np.array(r["codes"]) for r in res])
    assert np.array_equal(got, call.backend_codes())


def test_model_layer_with_per_row_float_scales_over_uart(tmp_path):
    """act_scale='float' (SPEC revision 2): the host driver streams each row's 16-bit
    multiplier to a board built with xmult; the board's INFO reports it, and its codes equal
    the accelerator-exact backend's. A board without xmult is refused before any beat."""
    import torch

    from superfloat.hw.fpga.host import LinkSession
    from superfloat.hw.fpga.protocol import BOARD, encode_info, link_layout
    from superfloat.hw.interface import AccelParams
    from superfloat.sim import layer_call
    from superfloat.sw.wasq import WASQConfig, quantize_, quantized_layers
    from superfloat.sw.wasq.accelerator import calibrate_outputs_
    from test_cosim import CALIB_TEXT, micro_model

    model = micro_model("llama")
    quantize_(model, WASQConfig(weight_bits=4, act_bits=8, act_scale="float"))
    calibrate_outputs_(model, [torch.tensor([list(CALIB_TEXT.encode()[:60])])], out_bits=8)
    layer = quantized_layers(model)["model.layers.0.mlp.down_proj"]
    u = np.random.default_rng(6).standard_normal((3, layer.in_features))
    x = torch.tensor(u * np.array([[0.3], [5.0], [1.1]]), dtype=torch.float32)
    call = layer_call(layer, x, rows=2, cols=2, k_max=K_MAX, a_bits=8, w_bits=8, simulator="verilator")
    assert call.array.xmult and len(call.ops) == 1 and call.ops[0].args.xmult is not None
    kw = call.linear_kwargs()[0]
    cases = [{"x": _json(kw.pop("x_codes")), "w": _json(kw.pop("w_codes")),
              "kw": {k: _json(v) for k, v in kw.items()}, "approx_bytes": 40 * (3 * 64 * 64 + 10)}]
    res = _board_results("verilator", dict(rows=2, cols=2, bits=8, xmult=True), cases, tmp_path)
    assert res[0]["stats"]["board"]["xmult"] is True
    assert np.array_equal(call.assemble([np.array(res[0]["codes"])]), call.backend_codes())
    # a board built without xmult: the session refuses the operation when it reads INFO
    sess = LinkSession(np.array(cases[0]["x"]), np.array(cases[0]["w"]), **cases[0]["kw"])
    sess.connect_bytes()
    plain = link_layout(AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=K_MAX))
    with pytest.raises(ValueError, match=r"carries xmult .* built without it: rebuild it with sfx build-board --xmult"):
        sess.feed(bytes([BOARD["info"]]) + encode_info(plain))
