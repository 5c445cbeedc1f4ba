"""The ``sfx`` entry point: help, info, bench registry, the sw benchmark's report."""
from __future__ import annotations

import json
import subprocess
import sys

from superfloat import cli
from superfloat.cli import info as cli_info


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out and "bench" in out


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "superfloat.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("superfloat ")


def test_info_reports_versions_and_install_hints(capsys, monkeypatch):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for tool in ("amaranth", "cocotb", "verilator", "iverilog", "torch", "transformers"):
        assert tool in out
    # a missing tool is reported with the command that installs it
    real = cli_info.tool_versions

    def fake():
        return [(n, None if n == "iverilog" else v, h) for n, v, h in real()]

    monkeypatch.setattr(cli_info, "tool_versions", fake)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "iverilog" in out and "MISSING   install: sudo apt-get update && sudo apt-get install iverilog" in out


def test_bench_sw_quick_writes_report(tmp_path):
    from superfloat.bench import sw as bench_sw

    data = bench_sw.run(tmp_path, quick=True)
    md = (tmp_path / "sw_model.md").read_text()
    js = json.loads((tmp_path / "sw_model.json").read_text())
    assert "Produced by `sfx bench sw --quick`" in md
    assert js["command"] == "sfx bench sw --quick"
    assert js["results"]["encode"]["ratio"] == data["encode"]["ratio"] > 0
    assert "versions" in js["machine"]


def test_devtools_usage(capsys):
    """The Makefile's setup step (``python -m superfloat.cli.devtools link-verilator``) names itself."""
    from superfloat.cli import devtools

    assert devtools.main([]) == 2
    assert "usage: python -m superfloat.cli.devtools link-verilator" in capsys.readouterr().err
