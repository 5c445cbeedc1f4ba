"""``sfx bench wasq-targets`` (bench/wasq_targets.py) on a tiny model: every row is one
``sfx eval`` whose command is printed beside its number, and the targets are judged from them."""
from __future__ import annotations

import json

import superfloat.bench as bench_registry
from superfloat.bench import wasq_targets as bench_targets


def test_quick_bench_writes_every_row_with_its_command(tmp_path):
    data = bench_targets.run(tmp_path, quick=True)
    md = (tmp_path / "wasq_targets.md").read_text()
    saved = json.loads((tmp_path / "wasq_targets.json").read_text())
    assert saved["command"] == "sfx bench wasq-targets --quick"
    assert [r["label"] for r in data["rows"]] == [label for label, _, _ in bench_targets.ROWS]
    for r in data["rows"]:
        cmd = "`sfx eval " + " ".join(r["args"]) + "`"
        assert cmd in md and f"{r['perplexity']:.3f}" in md
        assert r["tokens"] > 0 and r.get("hardware_executable", True)  # vanilla rows: plain SFx, no flag
    assert data["rows"][0]["delta_pct"] == 0.0 and data["rows"][0]["weight_bits"] is None
    assert data["rows"][2]["method"] == "awq" and data["rows"][5]["method"] == "smoothquant"
    assert "SF8 weight-only within 0.5 % of float: best hardware-executable method" in md
    assert "W8A8 within 3 % of float: best hardware-executable method" in md


def test_registered_as_a_bench():
    assert bench_registry.BENCHES["wasq-targets"] == "superfloat.bench.wasq_targets:run"
