"""``sfx bench fasteropt`` (bench/fasteropt.py) on a tiny model with tiny budgets:
the report is written, fasteropt reproduces opt bit for bit on every selection, and the
speed-up fields are numbers (no timing assertions: the real run is ``sfx bench fasteropt``)."""
from __future__ import annotations

import json
import math

import superfloat.bench as sfx_bench
from superfloat.bench import fasteropt as bench_fasteropt


def test_quick_bench_writes_report_and_fasteropt_equals_opt(tmp_path):
    data = bench_fasteropt.run(tmp_path, quick=True)
    md = (tmp_path / "fasteropt.md").read_text()
    saved = json.loads((tmp_path / "fasteropt.json").read_text())
    assert saved["command"] == "sfx bench fasteropt --quick"
    assert "Produced by `sfx bench fasteropt --quick`" in md and "## fasteropt against opt" in md
    rows = data["selections"]
    assert [r["key"] for r in rows] == ["top", "attn-out", "last-block"]
    for r in rows:
        assert r["first_block"] > 0  # a deep first trained block: there is a prefix to cache
        assert all(x["first_trained_block"] == r["first_block"] for x in r["runs"] if x["method"] == "fasteropt")
        assert r["max_abs_weight_diff"] == 0.0 and r["identical"] and r["loss_curves_identical"]
        assert r["opt_repeats_identical"]
        for k in ("speedup_wall", "speedup_cpu", "predicted_speedup_naive", "predicted_speedup_measured_p"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, k
        assert [x["method"] for x in r["runs"]] == ["opt", "fasteropt", "fasteropt", "opt"]
    assert saved["results"]["selections"][0]["max_abs_weight_diff"] == 0.0


def test_predicted_speedup_formula():
    assert bench_fasteropt.predicted_speedup(0.0, 3) == 1.0
    assert math.isclose(bench_fasteropt.predicted_speedup(0.5, 3), 3 / 2)
    assert math.isclose(bench_fasteropt.predicted_speedup(0.7, 1), 1.0)


def test_registered_as_a_bench():
    assert sfx_bench.BENCHES["fasteropt"] == "superfloat.bench.fasteropt:run"
