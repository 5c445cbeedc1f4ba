"""``sfx bench accel`` (bench/accel.py) on a tiny model: every row is one ``sfx eval --backend both``
whose command is printed beside its numbers; fake and accelerator-exact share the float pass."""
from __future__ import annotations

import json

import superfloat.bench as bench_registry
from superfloat.bench import accel


def test_quick_bench_writes_every_row_with_its_command(tmp_path):
    data = accel.run(tmp_path, quick=True)
    md = (tmp_path / "accelerator.md").read_text()
    saved = json.loads((tmp_path / "accelerator.json").read_text())
    assert saved["command"] == "sfx bench accel --quick"
    assert (tmp_path / "accelerator.png").stat().st_size > 0
    assert len(data["rows"]) == 5
    for r in data["rows"]:
        assert "`sfx eval " + " ".join(r["args"]) + "`" in md
        assert f"**{r['perplexity']:.3f}**" in md and r["backend"] == "accelerator"
        assert r["float_perplexity"] == data["float_perplexity"] and 0 <= r["top1_agreement"] <= 1
        assert r["time_ratio"] > 0 and r["fake"]["seconds"] > 0
        assert r["cpu_time_ratio"] > 0 and abs(r["cpu_time_ratio"] * r["fake"]["cpu_seconds"] / r["cpu_seconds"] - 1) < 0.03  # ms-rounded
        assert f"(**{r['cpu_time_ratio']:.2f}x**)" in md
    assert data["rows"][-1]["output_calibration"]["out_bits"] == [8]
    assert [(r["out_bits"], r["headroom"]) for r in data["output_rule"]] == [(16, 1), (16, 2)]
    assert "Static output exponents: output width and headroom" in md
    assert "W8A8 accelerator-exact within +2 % of float, top-1 agreement >= 90 %: best" in md
    assert "Accelerator-exact evaluation at most 2x the fake-quantized one" in md


def test_registered_as_a_bench():
    assert bench_registry.BENCHES["accel"] == "superfloat.bench.accel:run"
