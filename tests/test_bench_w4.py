"""``sfx bench w4`` (bench/w4.py) on a tiny model: every row one ``sfx eval --backend both`` with its
command beside its numbers, the method's time, targets judged against the float row; resume."""
from __future__ import annotations

import json

import pytest

import superfloat.bench as bench_registry
from superfloat.bench import w4


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_its_command_and_resumes(tmp_path):
    part = tmp_path / "partial.json"
    data = w4.run(tmp_path, quick=True, partial=part)
    md = (tmp_path / "w4.md").read_text()
    assert json.loads((tmp_path / "w4.json").read_text())["command"] == "sfx bench w4 --quick"
    assert (tmp_path / "w4.png").stat().st_size > 0
    assert [(r["act_bits"], r["method"]) for r in data["rows"]] == [(16, "rtn"), (16, "gptq"), (4, "rotate-gptq"),
                                                                    (4, "rotate-gptq, xmult")]
    for r in data["rows"]:
        assert "`sfx eval " + " ".join(r["args"]) + "`" in md and "--backend both" in " ".join(r["args"])
        assert r["backend"] == "accelerator" and r["fake"]["perplexity"] > 0
        assert r["met"] == (r["delta_pct"] <= w4.TARGETS[r["act_bits"]])
        assert (r["method_seconds"] is None) == (r["method"] == "rtn")
    assert data["rows"][3]["label"].endswith("xmult")
    assert "W4A4 <= +100 % of float: best" in md
    again = w4.run(tmp_path, quick=True, partial=part)  # everything resumed: the same numbers
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in data["rows"]]
    assert "4 of them resumed" in (tmp_path / "w4.md").read_text()


def test_registered_as_a_bench():
    assert bench_registry.BENCHES["w4"] == "superfloat.bench.w4:run"
