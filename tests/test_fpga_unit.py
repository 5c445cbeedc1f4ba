"""hw/fpga without the FPGA tools: DSP budget, comparison PEs (simulated), scan wrapper,
report parsing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from superfloat.hw.fpga import budget, report
from superfloat.hw.fpga.baseline import TwosComplementMultiplier, comparison_accelerator, comparison_array
from superfloat.hw.fpga.wrapper import ScanWrapper
from superfloat.hw.mac_array import TAG_BITS, sum_bits
from superfloat.hw.interface import AccelParams

from hw_stream_helpers import check_multiplier_both_impls

# --------------------------------------------------------------------------- DSP budget


def test_device_dsps():
    assert budget.device_dsps("ice40-up5k") == 8
    assert budget.device_dsps("ecp5-25k") == 28


@pytest.mark.parametrize("target,aw,bw,want", [
    ("ice40-up5k", 3, 3, 0),      # 6-bit product: below synth_ice40's 11-bit threshold
    ("ice40-up5k", 5, 5, 0),
    ("ice40-up5k", 6, 5, 1),
    ("ice40-up5k", 15, 15, 1),
    ("ice40-up5k", 16, 16, 1),
    ("ice40-up5k", 17, 16, 2),
    ("ice40-up5k", 30, 16, 2),
    ("ice40-up5k", 46, 16, 3),
    ("ecp5-25k", 1, 7, 0),
    ("ecp5-25k", 3, 3, 1),
    ("ecp5-25k", 18, 18, 1),
    ("ecp5-25k", 30, 16, 2),
    ("ecp5-25k", 40, 16, 3),
])
def test_dsps_per_multiplier(target, aw, bw, want):
    assert budget.dsps_per_multiplier(target, aw, bw) == want


@pytest.mark.parametrize("target", ["ice40-up5k", "ecp5-25k"])
@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)])
@pytest.mark.parametrize("user", [None, 0, 1, 3, 100])
def test_plan_never_exceeds_device_or_budget(target, bits, shape, user):
    plan = budget.plan_dsp_pes(target, rows=shape[0], cols=shape[1], a_bits=bits, w_bits=bits, budget=user)
    cap = budget.device_dsps(target) if user is None else min(user, budget.device_dsps(target))
    assert plan.dsps_used <= cap
    assert plan.dsps_used == plan.dsp_pes * plan.per_pe + plan.clamp_dsps
    assert 0 <= plan.dsp_pes <= shape[0] * shape[1]
    if plan.per_pe:
        # greedy: no further PE would fit
        assert plan.dsp_pes == shape[0] * shape[1] or plan.dsps_used + plan.per_pe > cap
    assert plan.reason


def test_plan_examples():
    p = budget.plan_dsp_pes("ecp5-25k", rows=8, cols=8, a_bits=8, w_bits=8)   # ECP5: SF8 products in logic
    assert (p.clamp_impl, p.clamp_dsps, p.dsp_pes, p.dsps_used) == ("lut", 0, 0, 0)
    assert "below the 15-bit threshold for a PE DSP on ecp5" in p.reason
    p = budget.plan_dsp_pes("ecp5-25k", rows=8, cols=8, a_bits=16, w_bits=16)
    assert (p.clamp_impl, p.clamp_dsps, p.dsp_pes, p.dsps_used) == ("lut", 0, 28, 28)
    p = budget.plan_dsp_pes("ecp5-25k", rows=8, cols=8, a_bits=16, w_bits=16, clamp="dsp")
    assert (p.clamp_impl, p.clamp_dsps, p.dsp_pes, p.dsps_used) == ("dsp", 3, 25, 28)
    p = budget.plan_dsp_pes("ice40-up5k", rows=8, cols=8, a_bits=4, w_bits=4)
    assert p.dsp_pes == 0 and "below the 11-bit threshold" in p.reason
    p = budget.plan_dsp_pes("ecp5-25k", rows=8, cols=8, a_bits=4, w_bits=4)   # policy: narrow products in logic
    assert (p.dsp_pes, p.clamp_impl, p.dsps_used) == (0, "lut", 0)
    p = budget.plan_dsp_pes("ice40-up5k", rows=8, cols=8, a_bits=7, w_bits=6)   # 6x5 = 11 bits: worth a DSP
    assert p.dsp_pes == 6
    p = budget.plan_dsp_pes("ice40-up5k", rows=8, cols=8, a_bits=8, w_bits=8)
    assert (p.clamp_dsps, p.dsp_pes, p.dsps_used) == (2, 6, 8)
    p = budget.plan_dsp_pes("ice40-up5k", rows=2, cols=2, a_bits=8, w_bits=8, budget=1)
    assert (p.clamp_impl, p.dsp_pes, p.dsps_used) == ("lut", 1, 1)
    p = budget.plan_dsp_pes("ecp5-25k", rows=2, cols=2, a_bits=8, w_bits=8, budget=0)
    assert (p.clamp_impl, p.dsp_pes, p.dsps_used) == ("lut", 0, 0)


def test_plan_errors():
    with pytest.raises(ValueError, match="unknown target 'ice40-hx8k'"):
        budget.plan_dsp_pes("ice40-hx8k", rows=2, cols=2, a_bits=8, w_bits=8)
    with pytest.raises(ValueError, match="DSP budget must be an int >= 0, got -1"):
        budget.plan_dsp_pes("ecp5-25k", rows=2, cols=2, a_bits=8, w_bits=8, budget=-1)
    with pytest.raises(ValueError, match="rows must be an int in 1..64"):
        budget.plan_dsp_pes("ecp5-25k", rows=0, cols=2, a_bits=8, w_bits=8)
    with pytest.raises(ValueError, match="clamp unit's 30x16 multiplier needs 2 MULT18X18D but the DSP budget is 1"):
        budget.plan_dsp_pes("ecp5-25k", rows=2, cols=2, a_bits=8, w_bits=8, budget=1, clamp="dsp")


# --------------------------------------------------------------------------- comparison PEs


@pytest.mark.parametrize("aw,bw", [(2, 2), (2, 3), (3, 2), (4, 4), (3, 5)])
def test_twos_complement_multiplier_exhaustive(aw, bw):
    check_multiplier_both_impls(TwosComplementMultiplier, range(-(1 << (aw - 1)), 1 << (aw - 1)),
                                range(-(1 << (bw - 1)), 1 << (bw - 1)), a_width=aw, b_width=bw)


def test_twos_complement_multiplier_wide_random():
    rng = np.random.default_rng(1)
    top = Module()
    top.submodules.lut = lut = TwosComplementMultiplier(a_width=16, b_width=16, impl="lut")
    cases = [(-32768, -32768), (-32768, 32767), (32767, 32767), (0, -1)]
    cases += [tuple(int(v) for v in rng.integers(-32768, 32768, 2)) for _ in range(200)]

    async def tb(ctx):
        for a, b in cases:
            ctx.set(lut.a, a)
            ctx.set(lut.b, b)
            assert ctx.get(lut.p) == a * b, (a, b)

    sim = Simulator(top)
    sim.add_testbench(tb)
    sim.run()


def test_comparison_designs_differ_only_in_the_pe():
    """(The arrays' function is tested in tests/test_hw_mac_array.py, both kinds.)"""
    sm = comparison_array("sm", rows=2, cols=3, a_bits=5, w_bits=5, k_max=64, overlap_drain=False)
    tc = comparison_array("tc", rows=2, cols=3, a_bits=5, w_bits=5, k_max=64, overlap_drain=False)
    assert (sm.pe_kind, tc.pe_kind) == ("sm", "tc")
    # Same inputs; each accumulates in the bits its own products need exactly (a two's
    # complement product reaches 2**(a+w-2), an SFx one (2**(a-1)-1)*(2**(w-1)-1)).
    assert sm.signature.members["inp"] == tc.signature.members["inp"]
    assert (sm.acc_bits, tc.acc_bits) == (sum_bits(5, 5, 64, "sm"), sum_bits(5, 5, 64, "tc")) == (15, 16)
    assert (sm.dsp_pes, tc.dsp_pes, sm.overlap_drain) == (0, 0, False)
    acc = comparison_accelerator("tc", rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4, k_max=64)
    assert acc.pe_kind == "tc" and acc.signature.members.keys() == {"cmd", "act", "wgt", "par", "res", "busy",
                                                                     "error", "sat_count"}
    for d in (sm, tc, acc):
        d._MustUse__silence = True


def test_comparison_errors():
    with pytest.raises(ValueError, match="kind must be one of 'sm', 'tc', got 'fp'"):
        comparison_array("fp", rows=2, cols=2, a_bits=4, w_bits=4)
    with pytest.raises(ValueError, match="rows must be in 1..64, got 0"):
        comparison_array("sm", rows=0, cols=2, a_bits=4, w_bits=4)


def test_scan_wrapper_counts_every_port_bit():
    core = comparison_array("sm", rows=2, cols=3, a_bits=4, w_bits=6, k_max=256)
    w = ScanWrapper(core)
    w._MustUse__silence = core._MustUse__silence = True   # counted, never elaborated
    # inputs: act, wgt, last, rows_valid (2 bits), tag (2 bits), valid; row_ok.
    # Outputs: ready, out (valid, acc, last, tag), row_take, drain_tag, busy.
    assert w.in_bits == 2 * 4 + 3 * 6 + 1 + 2 + TAG_BITS + 1 + 1
    assert w.out_bits == 1 + (1 + core.acc_bits + 1 + TAG_BITS) + 1 + TAG_BITS + 1
    with pytest.raises(TypeError, match="core must be an amaranth.lib.wiring.Component"):
        ScanWrapper(object())


# --------------------------------------------------------------------------- report parsing


def test_parse_yosys_stat(tmp_path):
    stat = {
        "modules": {
            "\\top": {"num_cells_by_type": {"SB_LUT4": 10, "SB_DFFE": 4, "top.core": 1}},
            "\\top.core": {"num_cells_by_type": {"SB_LUT4": 100, "SB_CARRY": 20, "SB_DFF": 5, "SB_DFFESR": 2,
                                                 "SB_MAC16": 2, "SB_RAM40_4K": 1, "$scopeinfo": 3}},
        },
        "design": {"num_cells_by_type": {"SB_LUT4": 110, "SB_CARRY": 20, "SB_DFF": 5, "SB_DFFESR": 2,
                                         "SB_DFFE": 4, "SB_MAC16": 2, "SB_RAM40_4K": 1, "top.core": 1}},
    }
    p = tmp_path / "stat.json"
    p.write_text("log noise\n" + json.dumps(stat))
    r = report.parse_yosys_stat(p, "ice40")
    core = r["modules"]["top.core"]
    assert (core["luts"], core["ffs"], core["carry"], core["dsps"], core["brams"]) == (100, 7, 20, 2, 1)
    assert (r["design"]["luts"], r["design"]["ffs"]) == (110, 11)
    e = report.cell_counts({"LUT4": 50, "CCU2C": 10, "TRELLIS_FF": 7, "MULT18X18D": 3, "DP16KD": 2,
                            "PFUMX": 9}, "ecp5")
    assert (e["luts"], e["ffs"], e["dsps"], e["brams"]) == (70, 7, 3, 2)


def test_parse_nextpnr_report(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"fmax": {"clk": {"achieved": 52.5, "constraint": 40}, "clk2": {"achieved": 80.0,
                                                                                            "constraint": 40}},
                             "utilization": {"ICESTORM_LC": {"used": 100, "available": 5280}}}))
    r = report.parse_nextpnr_report(p)
    assert r["fmax_mhz"] == 52.5
    assert r["utilization"]["ICESTORM_LC"] == {"used": 100, "available": 5280}


def test_first_error_and_fit_classification(tmp_path):
    log = tmp_path / "nextpnr.log"
    log.write_text("Info: packing\nERROR: Unable to place cell 'x', no BELs remaining to implement cell type "
                   "'ICESTORM_LC'\nInfo: end\n")
    msg = report.first_error(log)
    assert msg.startswith("Unable to place cell 'x'")
    assert report.is_fit_error(msg)
    assert not report.is_fit_error("Failed to route")
    assert report.first_error(tmp_path / "missing.log") is None
    log.write_text("Info: Device utilisation:\nInfo: \t         ICESTORM_LC:    6883/   5280   130%\n"
                   "Info: \t        ICESTORM_RAM:       0/     30     0%\n"
                   "ERROR: Failed to expand region (0, 0) |_> (25, 31) of 6883 ICESTORM_LCs\n")
    assert report.is_fit_error(report.first_error(log))
    assert report.over_capacity(log) == ["ICESTORM_LC 6883/5280 (130 %)"]
    assert report.over_capacity(tmp_path / "missing.log") == []


def test_result_table():
    t = report.format_result_table([{"target": "ice40-up5k", "config": "2x2 SF4", "luts": 321, "ffs": 226,
                                     "dsps": 0, "brams": 0, "fmax_mhz": 50.76, "freq_target_mhz": 40.0,
                                     "met_timing": True, "fits": True}])
    assert "ice40-up5k" in t and "50.8" in t and "LUT4 (core)" in t


# --------------------------------------------------------------------------- docs


def test_fpga_doc_examples():
    import doctest
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "fpga.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# --------------------------------------------------------------------------- protocol and host driver (no HDL)

from superfloat.hw.fpga import host, protocol  # noqa: E402
from superfloat.hw.interface import AccelParams  # noqa: E402


def _lay(**kw):
    return protocol.link_layout(AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=64), **kw)


def test_link_layout_and_frames():
    lay = _lay()
    assert lay.fifo_depth == 512 and lay.credit_chunk == 32
    assert lay.frame_len("status") == 1 and lay.frame_len("act") == 1 + lay.payload_bytes["act"]
    assert protocol.encode_frame(lay, "reset") == b"\x07"
    with pytest.raises(ValueError, match="wgt word 0x10000 does not fit its 16 bits"):
        protocol.encode_frame(lay, "wgt", 1 << 16)
    with pytest.raises(ValueError, match="unknown host frame 'res'"):
        protocol.encode_frame(lay, "res", 0)
    with pytest.raises(ValueError, match="fifo_depth must be an int in"):
        _lay(fifo_depth=8)
    with pytest.raises(ValueError, match="credit_chunk must be an int in 1..255"):
        _lay(credit_chunk=300)


def test_info_and_status_roundtrip():
    lay = _lay(fifo_depth=1024, credit_chunk=16)
    info = protocol.decode_info(protocol.encode_info(lay))
    assert info == {"version": protocol.PROTOCOL_VERSION, "rows": 2, "cols": 2, "a_bits": 8, "w_bits": 8,
                    "out_bits": 8, "k_max": 64, "fifo_depth": 1024, "credit_chunk": 16, "xmult": False}
    xm = protocol.link_layout(AccelParams(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8, k_max=64, xmult=True))
    assert protocol.encode_info(xm)[-1] == 1 and protocol.decode_info(protocol.encode_info(xm))["xmult"] is True
    st = protocol.decode_status(bytes([0b100010]) + (7).to_bytes(4, "little"))
    assert st["error"] and st["aborted"] and not st["busy"] and st["sat_count"] == 7
    with pytest.raises(ValueError, match="STATUS payload must be 5 bytes, got 4"):
        protocol.decode_status(b"\0" * 4)


class _Silent:
    def __init__(self, reply=b""):
        self.written = bytearray()
        self.reply = bytearray(reply)

    def write(self, data):
        self.written += data

    def read(self, n):
        out, self.reply = bytes(self.reply[:n]), self.reply[n:]
        return out


def _x_w():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 5)), rng.integers(0, 256, (2, 5))


def test_run_linear_uart_timeout_says_what_it_waits_for():
    x, w = _x_w()
    t = _Silent()
    with pytest.raises(host.LinkError, match=r"no byte from the board on the transport for 0.2 s \(waiting for the "
                                             r"INFO reply\)"):
        host.run_linear_uart(x, w, a_bits=8, w_bits=8, out_bits=8, transport=t, timeout=0.2)
    assert bytes(t.written) == b"\x07\x06"   # RESET, INFO


def test_run_linear_uart_rejects_a_board_of_other_widths():
    x, w = _x_w()
    other = protocol.link_layout(AccelParams(rows=4, cols=4, a_bits=4, w_bits=4, out_bits=4))
    t = _Silent(bytes([0x84]) + protocol.encode_info(other))
    with pytest.raises(ValueError, match=r"a_bits=8 but the board was built with a_bits=4 \(rows=4, cols=4\)"):
        host.run_linear_uart(x, w, a_bits=8, w_bits=8, out_bits=8, transport=t, timeout=1)


def test_run_linear_uart_argument_errors_are_sfx_errors():
    x, w = _x_w()
    with pytest.raises(ValueError, match="x_codes is \\[T=3, K=5\\] but w_codes is \\[N=2, K=4\\]"):
        host.run_linear_uart(x, w[:, :4], a_bits=8, w_bits=8, out_bits=8, transport=_Silent())


def test_garbage_from_the_board():
    x, w = _x_w()
    with pytest.raises(host.LinkError, match="unexpected byte 0x41 from the board"):
        host.run_linear_uart(x, w, a_bits=8, w_bits=8, out_bits=8, transport=_Silent(b"A"), timeout=1)


def test_serial_port_that_does_not_exist():
    x, w = _x_w()
    with pytest.raises(host.LinkError, match="cannot open /dev/does-not-exist at 115200 baud"):
        host.run_linear_uart(x, w, a_bits=8, w_bits=8, out_bits=8, port="/dev/does-not-exist")


def test_bench_candidate_shapes_and_prediction():
    from superfloat.bench import fpga as bench

    shapes = bench.candidate_shapes()
    pes = [r * c for r, c in shapes]
    assert pes == sorted(pes) and len(set(pes)) == len(pes)          # one shape per PE count
    assert all(r <= c <= 2 * r for r, c in shapes) and (16, 16) in shapes and (8, 8) in shapes
    assert (12, 22) in shapes and (11, 23) not in shapes             # sides from SIDES only
    # logic = 1000 + 40 per PE: 90 % of 5280 = 4752 -> 93 PEs
    assert bench.predict_largest([(16, 1640), (64, 3560)], 5280) == 93
    assert bench.predict_largest([(64, 3560), (16, 1640)], 5280) == 93


def test_bench_board_job_rebuilds_until_timing_is_met_at_most_twice(monkeypatch):
    """A board that misses its clock is rebuilt at 95 % of the lowest Fmax so far, at most
    twice; a shape that does not fit steps down first; a met clock ends the builds."""
    from superfloat.bench import fpga as bench

    calls = []

    def fake(name, r, c, bits, clock, deadline, overlap=None):
        calls.append((r, c, clock, overlap))
        if r * c > 64:
            return {"board": name, "error": "design does not fit", "step": "fit"}
        fmax = {48.0: 40.0, 36.0: 35.5}.get(clock, clock + 1)
        return {"board": name, "met_timing": fmax >= clock, "fmax_mhz": fmax}

    monkeypatch.setattr(bench, "_build_board_cached", fake)
    out = bench._board_job(("icebreaker", 4, (8, 10), None, None, None))
    # 95 % of 40 MHz is 38: 36 MHz makes 6 Mbaud (6 cycles per bit); then 95 % of 35.5 -> 33.5: 30 MHz
    assert calls == [(8, 10, 48.0, None), (6, 12, 48.0, None), (8, 8, 48.0, None), (8, 8, 36.0, None),
                     (8, 8, 30.0, None)]
    assert out["final"]["met_timing"] and len(out["tries"]) == 5
    calls.clear()
    monkeypatch.setattr(bench, "_build_board_cached",
                        lambda *a, **k: calls.append(a[4]) or {"met_timing": False, "fmax_mhz": 30.0})
    out = bench._board_job(("ulx3s-25f", 8, (4, 4), 110.0, None, False))
    # 95 % of the search's Fmax first; then 27 MHz, the highest clock under 28.5 that makes 3 Mbaud
    assert calls == [104.5, 27.0, 27.0] and not out["final"]["met_timing"]


def test_bench_targets_are_judged_from_the_runs():
    """The Targets section computes every verdict from the runs (cells per PE of the bare
    array, everything else against the array, logic, Fmax)."""
    from superfloat.bench import fpga as bench

    plan = {"reason": "no shadow registers"}
    acc = {"target": "ice40-up5k", "kind": "accel", "rows": 8, "cols": 8, "a_bits": 4, "k_max": 16384,
           "core_logic": 3800, "device_logic": "4400/5280", "fmax_mhz": 49.2, "arch_plan": plan,
           "critical_path": {"from": "a", "to": "b", "delay_ns": 20.3, "logic_levels": 5}, "peak_gmacs": 3.1}
    arr = {"target": "ice40-up5k", "kind": "sm-array", "rows": 8, "cols": 8, "a_bits": 4, "core_logic": 2746}
    text = bench._targets([acc, arr], {})
    assert "4400/5280 logic cells (83.3 %, goal <= 90.0 %): **met**" in text
    assert "Fmax 49.2 MHz (goal >= 48): **met**" in text
    assert "2746 logic cells = 42.9 per PE (goal <= 45): **met**" in text
    assert "1054 logic cells = 38.4 % of the array's (goal <= 35.0 %" in text and "**missed**" in text
    assert "8x8 SF8 accelerator on ecp5-25k: **not measured**" in text


def test_link_cost_counts_every_frame():
    from superfloat.hw.fpga.host import link_cost
    from superfloat.hw.fpga.protocol import link_layout
    from superfloat.hw.interface import AccelParams

    r = link_cost(3, 5, 7, rows=2, cols=2, a_bits=4, baud=3_000_000)
    lay = link_layout(AccelParams(rows=2, cols=2, a_bits=4, w_bits=4, out_bits=4))
    tiles = 2 * 3                       # ceil(3/2) row tiles x ceil(5/2) column tiles
    nb = lay.payload_bytes
    up = 2 + (1 + nb["cmd"]) + tiles * (2 * (1 + nb["par"]) + 7 * ((1 + nb["act"]) + (1 + nb["wgt"]))) + 1
    assert r["bytes_to_board"] == up
    assert r["frames"] == {"cmd": 1, "par": tiles * 2, "act": tiles * 7, "wgt": tiles * 7, "res": 3 * 3,
                           "credit": (up - 2) // lay.credit_chunk}
    assert r["bytes_from_board"] == 14 + 9 * (1 + nb["res"]) + 2 * r["frames"]["credit"] + 6
    assert r["line_bytes_per_s"] == 300_000 and r["seconds"] == up / 300_000
    with pytest.raises(ValueError, match="baud must be a positive int, got 0"):
        link_cost(1, 1, 1, rows=1, cols=1, a_bits=4, baud=0)


def test_bench_scope_options(tmp_path, monkeypatch):
    """The bench's scope options: parts are checked, a run past the time budget is not started
    (and says why), a bounded search ends at the bound, the report says what was not run."""
    import time

    from superfloat.bench import fpga as bench

    with pytest.raises(ValueError, match=r"unknown bench parts \['board'\]: choose from targets, compare"):
        bench.run(tmp_path, quick=False, parts=("targets", "board"))
    with pytest.raises(ValueError, match=r"unknown boards \['icebraker'\]: choose from icebreaker, ulx3s-25f"):
        bench.run(tmp_path, quick=False, parts=("boards",), boards_only=("icebraker",))
    with pytest.raises(ValueError, match=r"unknown compare targets \['ecp5'\]: choose from ice40-up5k"):
        bench.run(tmp_path, quick=False, parts=("compare",), compare_targets=("ecp5",))
    with pytest.raises(ValueError, match="workers must be a positive int, got 0"):
        bench.run(tmp_path, quick=False, parts=("targets",), workers=0)
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path), "--searches", "ecp5-25k:5"])
    monkeypatch.setenv("SFX_BUILD_DIR", str(tmp_path / "build"))
    job = dict(target="ecp5-25k", kind="accel", rows=16, cols=16, bits=4, mhz=100.0, deadline=time.time() + 5)
    s = bench._run_job(job)
    assert s["not_run"] and s["step"] == "budget" and "time budget (--budget-min) was spent" in s["error"]
    assert s["config"] == "16x16 SF4" and "deadline" not in s["job"]
    assert not (tmp_path / "build").exists()              # nothing was built
    assert bench.candidate_shapes(256)[-1] == (16, 16)
    text = bench._what([s], [], [], 60.0, dict(parts=["targets"], workers=1, budget_min=80.0, max_pes=256,
                                               searches=[["ecp5-25k", 4]], searches_not_run=[["ice40-up5k", 2]]))
    assert "1 not started for the time budget" in text and "**Partial run.** Parts run: targets; not run: compare, " \
        "largest, boards" in text
    assert "searches not run: ice40-up5k SF2" in text and "bounded at 256 PEs" in text and "1 run(s) at a time" in text
    table = bench._largest_table([{"target": "ecp5-25k", "bits": 4, "rows": 16, "cols": 16, "bounded": True,
                                   "max_pes": 256, "final": {"device_logic": "16000/24288", "fmax_mhz": 101.0,
                                                             "cpu_s": 900.0, "run_wall_s": 1500.0}}],
                                 [("ice40-up5k", 2)])
    assert "search bounded at 256 PEs (larger not tried)" in table and "| 900 / 1500 |" in table
    assert "| ice40-up5k | SF2 | - |" in table and "not run in this report" in table


def test_bench_runs_cheap_comparisons_first_and_reports_what_did_not_run(tmp_path, monkeypatch):
    """With --parts targets,compare the iCE40 comparisons run before the searches and the ECP5
    ones after them (a time budget cuts the dearest); the report lists what was not run."""
    from superfloat.bench import fpga as bench

    order = []

    def fake_job(job):
        order.append((job["target"], job["kind"], job["rows"], job["a_bits"] if "a_bits" in job else job["bits"]))
        s = bench._skipped(job, "not run: the bench's time budget (--budget-min) was spent")
        return s

    def fake_search(args):
        t, b, deadline, max_pes, seeds, place_limit = args
        assert seeds == (1,) and place_limit is None
        order.append((t, "search", b, max_pes))
        return bench._not_run_search(t, b, "not finished: the bench's time budget (--budget-min) was spent")

    monkeypatch.setattr(bench, "_run_job", fake_job)
    monkeypatch.setattr(bench, "_search_job", fake_search)
    bench.run(tmp_path, quick=False, parts=("targets", "compare"), workers=1, budget_min=1.0, max_pes=256,
              command="python -m superfloat.bench.fpga x --parts targets,compare")
    kinds = [o[:2] for o in order]
    assert kinds.index(("ice40-up5k", "tc-array")) < kinds.index(("ecp5-25k", "search")) \
        < kinds.index(("ecp5-25k", "tc-accel"))
    assert ("ecp5-25k", "search", 4, 256) in order and len([k for k in kinds if k[1] == "search"]) == 1
    md = (tmp_path / "fpga.md").read_text()
    assert "Produced by `python -m superfloat.bench.fpga x --parts targets,compare`" in md
    assert "**Partial run.** Parts run: targets, compare; not run: largest, boards" in md
    assert "searches not run: ice40-up5k SF2, ice40-up5k SF4, ice40-up5k SF8, ecp5-25k SF2, ecp5-25k SF8" in md
    assert "not run (time budget)" in md and "8x8 SF8 accelerator on ecp5-25k: **not measured**" in md


def test_bench_search_stops_when_a_check_is_not_run():
    """A largest-shape check that the time budget did not start ends the search as not finished
    (a smaller cached shape must not stand in for it)."""
    from superfloat.bench import fpga as bench

    shapes = bench.candidate_shapes(256)
    seen = []

    def check(i):
        seen.append(shapes[i])
        if shapes[i] == (16, 16):
            raise bench._BudgetSpent
        return True

    with pytest.raises(bench._BudgetSpent):
        bench._walk(shapes, len(shapes) - 1, check)
    assert seen == [(16, 16)]
    fits = {(12, 12), (10, 16)}      # 144 and 160 PEs fit, (12, 14) = 168 does not
    assert shapes[bench._walk(shapes, shapes.index((12, 12)), lambda i: shapes[i] in fits)] == (10, 16)
    assert bench._walk(shapes, 3, lambda i: False) is None


def test_bench_search_tries_the_next_seed_when_place_and_route_fails(monkeypatch):
    """The largest shape's placed run tries the next seed after a nextpnr failure (a stalled
    analytical placer), not after a fit failure; the table names the seed."""
    from superfloat.bench import fpga as bench

    calls = []

    def fake_job(job):
        calls.append((job["rows"], job["cols"], job.get("place", True), job.get("seed", 1)))
        if not job.get("place", True):
            return {"device_logic": f"{60 * job['rows'] * job['cols'] + 1000}/24288", "target": job["target"]}
        if job.get("seed", 1) == 1:
            return {"error": "nextpnr: exited with status -15", "step": "nextpnr", "placed": True, "seed": 1}
        return {"fmax_mhz": 101.0, "device_logic": "16553/24288", "placed": True, "seed": job["seed"]}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    se = bench._search("ecp5-25k", 4, None, 256, (1, 2, 3))
    assert (se["rows"], se["cols"], se["bounded"]) == (16, 16, True)
    assert [c for c in calls if c[2]] == [(16, 16, True, 1), (16, 16, True, 2)]
    table = bench._largest_table([se])
    assert "placed with seed 2; failed placement (seed 1, no shadow registers): nextpnr: exited with status -15" \
        in table


def test_bench_search_places_without_shadow_registers_when_placement_fails(monkeypatch):
    from superfloat.bench import fpga as bench

    calls = []

    def fake_job(job):
        calls.append((job.get("place", True), job.get("seed", 1), job.get("overlap_drain")))
        if not job.get("place", True):
            return {"device_logic": f"{60 * job['rows'] * job['cols'] + 1000}/24288", "target": job["target"]}
        if job.get("overlap_drain") is False:
            return {"fmax_mhz": 104.0, "device_logic": "15000/24288", "placed": True, "overlap_drain": False}
        return {"error": "nextpnr: timed out after 240 s", "step": "nextpnr", "placed": True,
                "seed": job.get("seed", 1), "overlap_drain": True}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    se = bench._search("ecp5-25k", 4, None, 256, (1,), 240.0)
    assert [c for c in calls if c[0]] == [(True, 1, None), (True, 1, False)]
    assert se["fallback"] == "no shadow registers" and se["final"]["fmax_mhz"] == 104.0
    text = bench._targets([], {("ecp5-25k", 4): dict(se, final=dict(se["final"], peak_gmacs=26.6))})
    assert "placed with no shadow registers: with the plan's shadow registers place and route failed " \
        "(seed 1: nextpnr: timed out after 240 s)" in text and "**met**" in text


def test_bench_targets_judge_the_ecp5_goal_shape_beside_the_largest():
    """The 256-PE goal is judged on the 16x16 run itself; the largest array keeps its own verdict."""
    from superfloat.bench import fpga as bench

    shape = {"target": "ecp5-25k", "kind": "accel", "rows": 16, "cols": 16, "a_bits": 4, "fmax_mhz": 114.81,
             "device_logic": "15794/24288", "peak_gmacs": 29.39,
             "critical_path": {"from": "a", "to": "b", "delay_ns": 8.7, "logic_levels": 9}}
    se = {"target": "ecp5-25k", "bits": 4, "rows": 14, "cols": 24,
          "final": {"fmax_mhz": 99.43, "device_logic": "20907/24288", "peak_gmacs": 33.4}}
    text = bench._targets([shape], {("ecp5-25k", 4): se})
    assert "SF4 array of 256 PEs on ecp5-25k**: 16x16 at 114.81 MHz (goal >= 100): **met**" in text
    assert "14x24 (336 PEs, goal >= 256) at 99.43 MHz (goal >= 100): **missed**" in text
    slow = dict(shape, fmax_mhz=97.5)
    assert "16x16 at 97.5 MHz (goal >= 100): **missed**" in bench._targets([slow], {})
    assert "256 PEs on ecp5-25k: **not measured**: nextpnr: stalled" in bench._targets(
        [dict(shape, fmax_mhz=None, error="nextpnr: stalled")], {})


def test_bench_targets_judge_the_best_placement_seed_and_list_every_seed():
    from superfloat.bench import fpga as bench

    plan = {"reason": "no shadow registers"}
    path = {"from": "a", "to": "b", "delay_ns": 20.3, "logic_levels": 5}
    acc = {"target": "ice40-up5k", "kind": "accel", "rows": 8, "cols": 8, "a_bits": 4, "k_max": 16384,
           "core_logic": 3617, "device_logic": "3902/5280", "arch_plan": plan, "critical_path": path,
           "peak_gmacs": 3.3}
    runs = [dict(acc, seed=1, fmax_mhz=42.74), dict(acc, seed=2, fmax_mhz=51.8),
            dict(acc, seed=3, fmax_mhz=None, error="nextpnr: stalled")]
    arr = {"target": "ice40-up5k", "kind": "sm-array", "rows": 8, "cols": 8, "a_bits": 4, "core_logic": 2746}
    text = bench._targets([*runs, arr], {})
    assert "Fmax 51.8 MHz (goal >= 48; best of placement seeds 1: 42.74, 2: 51.8, 3: not placed MHz): **met**" \
        in text
    assert "critical path (seed 2): a -> b" in text
    one = bench._targets([runs[0], arr], {})
    assert "Fmax 42.74 MHz (goal >= 48): **missed**" in one and "seed" not in one.split("critical path")[1][:8]


def test_bench_search_steps_down_when_the_largest_shape_does_not_place(monkeypatch):
    """A shape that packs but whose placement fails: the search places the next smaller
    shapes (at most STEPS_DOWN), and the table says which shape did not place."""
    from superfloat.bench import fpga as bench

    shapes = bench.candidate_shapes()
    placed = []

    def fake_job(job):
        pes = job["rows"] * job["cols"]
        if not job.get("place", True):
            return {"device_logic": f"{25 * pes + 400}/5280", "target": job["target"]}
        placed.append((job["rows"], job["cols"]))
        if len(placed) == 1:
            return {"error": "stalled: no output for 240 s", "step": "nextpnr", "placed": True, "seed": 1,
                    "overlap_drain": False}
        return {"fmax_mhz": 44.0, "device_logic": f"{25 * pes + 400}/5280", "placed": True, "overlap_drain": False}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    se = bench._search("ice40-up5k", 2, None, None, (1,), None)
    first = placed[0]
    assert len(placed) == 2 and shapes.index(placed[1]) == shapes.index(first) - 1
    assert (se["rows"], se["cols"]) == placed[1] and se["final"]["fmax_mhz"] == 44.0
    assert se["stepped_down_from"] == "%dx%d" % first
    table = bench._largest_table([se])
    assert f"{first[0]}x{first[1]} packs but did not place (see the failed placement): a smaller shape" in table
    assert "failed placement (seed 1, no shadow registers): stalled: no output for 240 s" in table

    placed.clear()
    monkeypatch.setattr(bench, "_run_job", lambda job: fake_job(job) if not job.get("place", True) or not placed
                        else (placed.append(1) or {"error": "stalled", "step": "nextpnr", "placed": True}))
    se = bench._search("ice40-up5k", 2, None, None, (1,), None)
    assert len(placed) == 1 + bench.STEPS_DOWN and se["final"].get("error") == "stalled"
