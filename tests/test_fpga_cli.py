"""``sfx synth`` / ``sfx build-board``: output format, exit codes and the error messages
of every failure path (bad arguments, design too big, missed --freq, tool timeout)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from superfloat.hw.fpga import flow
from superfloat import cli

TINY = ["--design", "sm-array", "--rows", "1", "--cols", "1", "--a-bits", "2"]


def _run(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- arguments (no tools run)


def test_synth_unknown_target(capsys):
    code, _, err = _run(capsys, ["synth", "--target", "xc7a35t"])
    assert code == 2
    assert "unknown target 'xc7a35t': choose one of ice40-up5k, ecp5-25k" in err


@pytest.mark.parametrize("args,msg", [
    (["--a-bits", "17"], "a_bits must be in 2..16"),
    (["--rows", "0"], "rows must be"),
    (["--dsp-budget", "-1"], "DSP budget must be an int >= 0, got -1"),
    (["--freq", "0"], r"--freq must be in (0, 1000] MHz"),
    (["--k-max", "0"], "k_max"),
    (["--xmult", "--design", "sm-array"], "xmult (the per-row activation multiplier) applies to the SFx accelerator "
                                          "(design 'accel') and must be a bool, got design 'sm-array'"),
])
def test_synth_bad_parameters(capsys, args, msg):
    code, _, err = _run(capsys, ["synth", "--target", "ice40-up5k", *args])
    assert code == 2
    assert msg in err


def test_build_board_unknown_board(capsys):
    code, _, err = _run(capsys, ["build-board", "--board", "arty"])
    assert code == 2
    assert "unknown board 'arty': choose one of icebreaker, ulx3s-25f, orangecrab-25f" in err


def test_build_board_bad_baud(capsys):
    code, _, err = _run(capsys, ["build-board", "--board", "icebreaker", "--baud", "20000000"])
    assert code == 2
    assert "baud 20000000 is too fast for a 48 MHz clock" in err
    code, _, err = _run(capsys, ["build-board", "--board", "icebreaker", "--clock-mhz", "5"])
    assert code == 2
    assert "clock_mhz must be a number in 10..400 MHz, got 5.0" in err


# --------------------------------------------------------------------------- with the tools


@pytest.mark.fpga
def test_synth_json_and_missed_freq(capsys, tmp_path):
    code, out, err = _run(capsys, ["synth", "--target", "ice40-up5k", *TINY, "--freq", "900", "--json",
                                   "--out", str(tmp_path)])
    assert code == 3
    assert "timing not met: Fmax" in err and "< --freq 900 MHz on ice40-up5k (1x1 SF2)" in err
    s = json.loads(out)
    for key in ("target", "fits", "fmax_mhz", "luts", "ffs", "dsps", "brams", "freq_target_mhz", "met_timing",
                "dsp_pes", "seconds"):
        assert key in s, key
    assert s["fits"] is True and s["met_timing"] is False and 0 < s["fmax_mhz"] < 900
    assert s["luts"] > 0 and s["ffs"] > 0 and s["dsps"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["fmax_mhz"] == s["fmax_mhz"]


@pytest.mark.fpga
def test_synth_pack_only_on_ecp5(capsys, tmp_path):
    # --pack-only: utilisation without placement (nextpnr-ecp5 aborted when also asked for
    # the bitstream text of the unplaced cells)
    code, out, err = _run(capsys, ["synth", "--target", "ecp5-25k", *TINY, "--pack-only", "--json",
                                   "--out", str(tmp_path)])
    assert code == 0, err
    s = json.loads(out)
    assert s["placed"] is False and s["fits"] is True and s["fmax_mhz"] is None
    used, avail = map(int, s["device_logic"].split("/"))
    assert 0 < used < avail == 24288


@pytest.mark.fpga
def test_synth_xmult_accelerator_packs_on_ice40(capsys, tmp_path):
    code, out, err = _run(capsys, ["synth", "--target", "ice40-up5k", "--rows", "1", "--cols", "1", "--a-bits", "4",
                                   "--xmult", "--pack-only", "--json",
                                   "--out", str(tmp_path)])
    assert code == 0, err
    s = json.loads(out)
    assert s["xmult"] is True and s["fits"] is True and s["luts"] > 0


@pytest.mark.fpga
def test_synth_does_not_fit(capsys, tmp_path, monkeypatch):
    # A real run on a device shrunk to 10 LUTs: the same check and message as a full-size
    # design on the real device (which takes minutes to synthesize).
    small = replace(flow.TARGETS["ice40-up5k"], capacity={"luts": 10, "ffs": 5280, "dsps": 8, "brams": 30})
    monkeypatch.setitem(flow.TARGETS, "ice40-up5k", small)
    code, out, err = _run(capsys, ["synth", "--target", "ice40-up5k", *TINY, "--out", str(tmp_path)])
    assert code == 4
    assert "design does not fit ice40-up5k: it needs" in err and "LUT4s but the device has 10" in err
    assert "False" in out  # the table still prints, fits = False


@pytest.mark.fpga
def test_synth_tool_timeout(capsys, tmp_path):
    code, _, err = _run(capsys, ["synth", "--target", "ecp5-25k", *TINY, "--timeout", "0.2", "--out", str(tmp_path)])
    assert code == 5
    assert "yosys: " not in err and "timed out after 0.2 s" in err


def test_flow_error_message_and_kill(tmp_path):
    """run_tool kills a hung tool at its timeout and says so (no FPGA tool needed)."""
    import sys
    import time

    t0 = time.perf_counter()
    with pytest.raises(flow.FlowError, match=r"sleep: timed out after 1 s"):
        flow.run_tool("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], log=tmp_path / "l",
                      cwd=tmp_path, timeout=1.0)
    assert time.perf_counter() - t0 < 10
    (tmp_path / "fail.py").write_text("print('Info: x'); print('ERROR: Unable to place cell foo'); raise SystemExit(1)")
    with pytest.raises(flow.FlowError, match="nextpnr: Unable to place cell foo"):
        flow.run_tool("nextpnr", [sys.executable, str(tmp_path / "fail.py")], log=tmp_path / "l2", cwd=tmp_path,
                      timeout=30)


def test_run_tool_stops_a_tool_whose_log_stops_growing(tmp_path, monkeypatch):
    """A tool that prints, then prints nothing for ``stall`` s is stopped as stalled; one that
    keeps printing runs to its end under the same watch."""
    import sys
    import time

    monkeypatch.setattr(flow, "STALL_POLL_S", 0.2)
    t0 = time.perf_counter()
    with pytest.raises(flow.FlowError, match=r"^nextpnr: stalled: no output for 1 s \(stopped after [0-9]+ s\)"):
        flow.run_tool("nextpnr", [sys.executable, "-u", "-c", "print('Info: placing'); import time; time.sleep(60)"],
                      log=tmp_path / "l", cwd=tmp_path, timeout=30, stall=1.0)
    assert time.perf_counter() - t0 < 10
    busy = "import time\nfor i in range(12):\n    print('Info: iteration', i, flush=True); time.sleep(0.25)"
    assert flow.run_tool("nextpnr", [sys.executable, "-c", busy], log=tmp_path / "l2", cwd=tmp_path, timeout=30,
                         stall=1.0) >= 2.5
    assert "iteration 11" in (tmp_path / "l2").read_text()


def test_synthesize_cache_keeps_a_stalled_placement_and_reruns_other_failures(tmp_path, monkeypatch):
    from superfloat.hw.fpga import synth

    calls = []

    def fake_flow(text, *, timeouts, **kw):
        calls.append(timeouts)
        raise flow.FlowError("nextpnr", reasons[len(calls) - 1], None)

    monkeypatch.setattr(synth, "run_flow", fake_flow)
    kw = dict(target="ice40-up5k", rows=1, cols=1, a_bits=4, out_dir=tmp_path, cache=True)
    reasons = ["exited with status 1", "stalled: no output for 240 s (stopped after 300 s)", "-", "-"]
    assert synth.synthesize(**kw)["error"] == "exited with status 1"
    assert synth.synthesize(**kw)["error"].startswith("stalled")      # a plain failure runs again
    again = synth.synthesize(**kw)                                    # a stall does not
    assert again["cached"] and again["error"].startswith("stalled") and len(calls) == 2
    # a run stopped at a time limit is reused by a call with the same or a shorter limit only
    reasons[2:] = ["timed out after 60 s", "timed out after 120 s"]
    (tmp_path / "summary.json").unlink()
    assert synth.synthesize(**kw, timeouts={"nextpnr": 60})["nextpnr_timeout_s"] == 60
    assert synth.synthesize(**kw, timeouts={"nextpnr": 30})["cached"] and len(calls) == 3
    assert synth.synthesize(**kw, timeouts={"nextpnr": 120})["nextpnr_timeout_s"] == 120 and len(calls) == 4


def test_abc9_assertion_reruns_with_split_lut_mapping(tmp_path, monkeypatch):
    """Yosys 0.70's ABC9 reintegration assertion: the flow re-runs once with the LUT mapping
    split (autoname before map_luts) and says so; any other Yosys error is raised at once."""
    scripts = []

    def fake_run_tool(step, argv, *, log, cwd, timeout):
        script = (cwd / argv[-1]).read_text()
        scripts.append(script)
        if "-run map_luts:" not in script:
            (cwd / argv[argv.index("-l") + 1]).write_text(f"ERROR: Assert `{flow.ABC9_ASSERT}' failed in rtlil.cc\n")
            raise flow.FlowError(step, "exited with status 1", log)
        return 1.5

    monkeypatch.setattr(flow, "run_tool", fake_run_tool)
    monkeypatch.setattr(flow, "_tool", lambda name: name)
    messages = []
    t = flow._run_yosys("yosys", flow.get_target("ecp5-25k"), "top", out=tmp_path, script="synth.ys",
                        log="yosys.log", dsp=True, stat_json="stat.json", synth_json="synth.json", extra=(),
                        timeout=10, messages=messages)
    assert t == 1.5 and len(scripts) == 2
    assert "synth_ecp5 -top top -json synth.json\n" in scripts[0]
    assert ("synth_ecp5 -top top -run :map_luts\nopt_clean -purge\nautoname\n"
            "synth_ecp5 -top top -json synth.json -run map_luts:\n") in scripts[1]
    assert messages == ["yosys: Yosys ABC9 reintegration assertion; re-ran with LUT mapping split "
                        "(autoname before map_luts)"]

    def other_error(step, argv, *, log, cwd, timeout):
        (cwd / "yosys.log").write_text("ERROR: something else\n")
        raise flow.FlowError(step, "something else", log)

    assert flow._is_abc9_assert("4.46.15.7. Executing ABC_OPS_REINTEGRATE pass\n<suppressed>\n"
                                "ERROR: Assert `wire' failed in passes/techmap/abc_ops_reintegrate.cc:596.\n")
    assert not flow._is_abc9_assert("ERROR: Assert `x' failed in kernel/other.cc:1.\n")
    monkeypatch.setattr(flow, "run_tool", other_error)
    with pytest.raises(flow.FlowError, match="yosys: something else"):
        flow._run_yosys("yosys", flow.get_target("ice40-up5k"), "top", out=tmp_path, script="synth.ys",
                        log="yosys.log", dsp=True, stat_json="stat.json", synth_json="synth.json", extra=(),
                        timeout=10, messages=[])


def test_build_core_passes_xmult_with_the_architecture_plan():
    from superfloat.hw.fpga.budget import plan_architecture
    from superfloat.hw.fpga.synth import build_core

    arch = plan_architecture("ice40-up5k", a_bits=8, w_bits=4, k_max=64)
    for xmult in (False, True):
        core = build_core("accel", rows=2, cols=2, a_bits=8, w_bits=4, out_bits=8, k_max=64, plan=None, arch=arch,
                          xmult=xmult)
        core._MustUse__silence = True   # inspected, not elaborated
        assert core.xmult is xmult and core.overlap_drain == arch.overlap_drain
