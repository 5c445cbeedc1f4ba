"""Boards: committed pin/clock constraints match amaranth-boards; a bitstream builds offline."""
from __future__ import annotations

import re

import pytest

from superfloat.hw.fpga import boards
from superfloat.hw.fpga.uart import divisor_for
from superfloat import cli


@pytest.mark.parametrize("name", list(boards.BOARDS))
def test_committed_constraints_match_amaranth_boards(name):
    path = boards.BOARDS[name].constraints_path
    assert path.is_file(), f"missing {path}: python -m superfloat.hw.fpga.boards --write-constraints"
    assert path.read_text() == boards.generated_constraints(name), (
        f"{path.name} differs from amaranth-boards: python -m superfloat.hw.fpga.boards --write-constraints")


def test_constraints_name_the_uart_and_clock_pin():
    pcf = boards.BOARDS["icebreaker"].constraints_path.read_text()
    assert "set_io uart_0__rx__io 6" in pcf and "set_io uart_0__tx__io 9" in pcf
    assert "set_io clk12_0__io 35" in pcf and "set_frequency" not in pcf   # the PLL's clock comes from --freq
    lpf = boards.BOARDS["ulx3s-25f"].constraints_path.read_text()
    assert 'LOCATE COMP "uart_0__rx__io" SITE "M1"' in lpf and 'LOCATE COMP "clk25_0__io" SITE "G2"' in lpf


@pytest.mark.parametrize("board,clk,baud", [("icebreaker", 48e6, 12_000_000), ("icebreaker", 42e6, 6_000_000),
                                            ("icebreaker", 12e6, 3_000_000), ("ulx3s-25f", 100e6, 3_000_000),
                                            ("ulx3s-25f", 10e6, 2_000_000), ("orangecrab-25f", 125e6, 3_000_000)])
def test_link_baud_is_the_fastest_standard_rate_the_bridge_and_clock_allow(board, clk, baud):
    assert boards.link_baud(board, clk) == baud


def test_pll_settings_from_the_calculators():
    from superfloat.hw.fpga.pll import pll_settings

    p = pll_settings("ice40", 12, 48)
    assert p.fout_mhz == 48.0 and p.params == {"FEEDBACK_PATH": "SIMPLE", "DIVR": 0, "DIVF": 63, "DIVQ": 4,
                                                "FILTER_RANGE": 1}
    e = pll_settings("ecp5", 25, 100)
    assert e.fout_mhz == 100.0 and (e.params["CLKI_DIV"], e.params["CLKFB_DIV"], e.params["CLKOP_DIV"]) == (1, 4, 6)
    assert e.params["FEEDBK_PATH"] == "CLKOP"
    with pytest.raises(ValueError, match="unknown FPGA family 'xc7': choose ice40 or ecp5"):
        pll_settings("xc7", 12, 48)
    with pytest.raises(ValueError, match=r"fout_mhz must be a number in 1..1000 MHz, got 0"):
        pll_settings("ice40", 12, 0)


@pytest.mark.parametrize("fmax,clock", [(32.96, 31.25), (128.17, 121.75), (48.0, 45.5), (10.6, 10.0)])
def test_retry_clock_is_95_percent_of_fmax_rounded_down_to_a_quarter_mhz(fmax, clock):
    # one policy for build_board's rebuild and the bench's board builds
    assert boards.retry_clock(fmax) == clock and clock <= boards.RETRY_FMAX_FRACTION * fmax


@pytest.mark.parametrize("board,fmax,clock,baud", [("icebreaker", 32.67, 30.0, 6_000_000),
                                                   ("icebreaker", 30.79, 24.0, 6_000_000),
                                                   ("icebreaker", 60.0, 48.0, 12_000_000),
                                                   ("ulx3s-25f", 99.0, 93.0, 3_000_000),
                                                   ("ulx3s-25f", 14.0, 12.0, 3_000_000)])
def test_board_retry_clock_buys_the_fastest_link(board, fmax, clock, baud):
    # the highest clock under 95 % of Fmax that makes the fastest standard rate of the bridge
    assert boards.retry_clock(fmax, board) == clock and boards.link_baud(board, clock * 1e6) == baud


@pytest.mark.parametrize("clk,baud,div", [(12e6, 115200, 104), (12e6, 3_000_000, 4), (25e6, 115200, 217),
                                          (48e6, 1_000_000, 48)])
def test_divisor(clk, baud, div):
    assert divisor_for(clk, baud) == div


def test_divisor_errors():
    with pytest.raises(ValueError, match="baud 6000000 is too fast for a 12 MHz clock"):
        divisor_for(12e6, 6_000_000)
    with pytest.raises(ValueError, match=r"baud 2500000 is 4.0% off at 12 MHz \(divisor 5\)"):
        divisor_for(12e6, 2_500_000)


@pytest.mark.fpga
@pytest.mark.slow   # about 45 s; make bench builds all three boards
def test_build_board_icebreaker_bitstream(capsys, tmp_path):
    code = cli.main(["build-board", "--board", "icebreaker", "--rows", "1", "--cols", "1", "--a-bits", "4",
                     "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    path = out.out.strip().splitlines()[-1]
    assert path.endswith("top.bin")
    data = open(path, "rb").read()
    assert len(data) == 104090 and data[:4] == b"\xff\x00\x00\xff"   # UP5K image, iCE40 preamble
    assert "Fmax" in out.err and "from the PLL" in out.err
    # the board's 48 MHz default (12 Mbaud) or, when the design misses it, one rebuild at a clock it reaches
    m = re.search(r"at ([0-9.]+) MHz from the PLL \(Fmax ([0-9.]+) MHz\), UART ([0-9]+) baud", out.err)
    assert m and float(m[2]) >= float(m[1])
    assert ("12000000 baud" in out.err) != ("note: timing not met at the board's default 48 MHz" in out.err)


def test_build_board_rebuilds_at_95_percent_of_fmax_at_most_twice(tmp_path, monkeypatch):
    """Without --clock-mhz a missed default clock is rebuilt at 95 % of the lowest Fmax so far,
    up to boards.REBUILDS times; the messages name every clock."""
    from types import SimpleNamespace

    asked = []

    def fake_flow(il, *, freq_mhz, out_dir, **kw):
        asked.append(freq_mhz)
        fmax = {48.0: 37.49, 30.0: 29.9}.get(freq_mhz, freq_mhz + 0.5)
        return SimpleNamespace(device={"ICESTORM_LC": {"used": 10, "available": 5280}}, fmax_mhz=fmax,
                               met_timing=fmax >= freq_mhz, design={"luts": 8, "ffs": 9, "dsps": 0, "brams": 0},
                               critical_path=None, seconds={"yosys": 1.0},
                               files={"bitstream": tmp_path / "top.bin"})

    monkeypatch.setattr(boards, "run_flow", fake_flow)
    rep = boards.build_board("icebreaker", rows=1, cols=1, a_bits=4, out_dir=tmp_path / "b")
    assert asked[0] == 48.0 and len(asked) == 3 and rep["met_timing"] and rep["rebuilds"] == 2
    assert rep["messages"][0].startswith("timing not met at the board's default 48 MHz (Fmax 37.49 MHz): "
                                         "rebuilt with the PLL at 30 then 24 MHz")
    # 95 % of 37.49 is 35.5: 30 MHz makes 6 Mbaud; 95 % of 29.9 is 28.25: 24 MHz (6 Mbaud, 4 cycles per bit)
    assert rep["first_attempt"]["fmax_mhz"] == 37.49 and rep["clock_mhz"] == asked[-1] == 24.0
    assert rep["baud"] == 6_000_000


def test_build_board_without_the_source_constraints_uses_the_generated_pins(tmp_path, monkeypatch):
    """An installed wheel has no constraints/: the build writes amaranth-boards' pins and says so."""
    seen = {}

    def fake_flow(il, *, constraints, **kw):
        seen["text"] = constraints.read_text()
        raise boards.FlowError("nextpnr", "stopped by the test")

    monkeypatch.setattr(boards, "CONSTRAINTS_DIR", tmp_path / "absent")
    monkeypatch.setattr(boards, "run_flow", fake_flow)
    rep = boards.build_board("icebreaker", rows=1, cols=1, a_bits=4, clock_mhz=24, out_dir=tmp_path / "b")
    assert seen["text"] == boards.generated_constraints("icebreaker")
    assert rep["constraints"] == str(tmp_path / "b" / "icebreaker.pcf") and rep["error"] == "stopped by the test"
    assert any("using the pins amaranth-boards generates" in m for m in rep["messages"])
