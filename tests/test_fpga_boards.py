"""Boards: committed pin/clock constraints match amaranth-boards; a bitstream builds offline."""
from __future__ import annotations

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


def test_constraints_name_the_uart_and_clock():
    pcf = boards.BOARDS["icebreaker"].constraints_path.read_text()
    assert "set_io uart_0__rx__io 6" in pcf and "set_io uart_0__tx__io 9" in pcf
    assert "set_frequency clk12_0__io 12.0" in pcf
    lpf = boards.BOARDS["ulx3s-25f"].constraints_path.read_text()
    assert 'LOCATE COMP "uart_0__rx__io" SITE "M1"' in lpf and 'FREQUENCY PORT "clk25_0__io" 25000000.0 HZ' in lpf


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
    assert "Fmax" in out.err
