"""docs/tutorial.md is executed: its ``python`` blocks are doctests, grouped by the
``<!-- tutorial-test: KIND -->`` marker of their section. The ``sim`` sections (quantize_ ->
run_linear -> a block on the RTL) run in ``make test``; the ``fpga`` sections (synthesize ->
bitstream, a few minutes of Yosys and nextpnr) are also ``slow``. Both run in a fresh current
directory, which must receive every build output (``build/``)."""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"
MARK = re.compile(r"<!-- tutorial-test: (\w+) -->")


def sections() -> list[tuple[str, str, list[str]]]:
    """``(heading, kind, python blocks)`` of every ``## `` section of the tutorial."""
    out = []
    for part in re.split(r"\n(?=## )", TUTORIAL.read_text())[1:]:
        heading = part.splitlines()[0][3:].strip()
        kinds = MARK.findall(part)
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
        out.append((heading, kinds[0] if len(kinds) == 1 else ",".join(kinds) or None, blocks))
    return out


def run_kind(kind: str) -> doctest.TestResults:
    blocks = [b for _, k, bs in sections() if k == kind for b in bs]
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, f"tutorial[{kind}]", str(TUTORIAL), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(test)
    return runner.summarize(verbose=False)


def test_every_section_is_marked_and_tested():
    secs = sections()
    assert [k for _, k, _ in secs] == ["sim", "sim", "sim", "fpga", "fpga"], secs
    code = "\n".join(b for _, _, bs in secs for b in bs)
    for call in ("quantize_(", "calibrate_outputs_(", "run_linear(", "run_layer(", "on_rtl(", "synthesize(",
                 "build_board("):
        assert call in code, call
    assert all(bs for _, _, bs in secs)


@pytest.mark.sim
@pytest.mark.xdist_group("sim-accel-2x2-sf8-icarus")
def test_tutorial_model_to_rtl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SFX_BUILD_DIR", raising=False)
    monkeypatch.delenv("SFX_SIM_BUILD_DIR", raising=False)
    res = run_kind("sim")
    assert res.attempted > 20 and res.failed == 0, f"{res.failed} tutorial example(s) failed"
    builds = list((tmp_path / "build" / "sim" / "icarus").glob("*/build.json"))
    assert builds, "the simulator build did not go to ./build/sim of the current directory"


@pytest.mark.fpga
@pytest.mark.slow   # about 3 minutes of Yosys + nextpnr on 2 loaded cores
def test_tutorial_synthesis_and_bitstream(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SFX_BUILD_DIR", raising=False)
    res = run_kind("fpga")
    assert res.attempted >= 6 and res.failed == 0, f"{res.failed} tutorial example(s) failed"
    assert list((tmp_path / "build" / "fpga" / "board").glob("icebreaker-*/top.bin"))
    assert list((tmp_path / "build" / "fpga" / "synth" / "ice40-up5k").glob("accel-2x2-*/summary.json"))
    assert list((tmp_path / "build" / "fpga" / "synth" / "ice40-up5k").glob("accel-2x2-*/flow/design.il"))
